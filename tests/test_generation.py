"""ragcap.generation: one search for every decoder kind, checked against transformers' generate."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ragcap.decoders.lm import LMInput, LMStepper
from ragcap.decoders.lm_prompt import left_padded
from ragcap.errors import OptionError
from ragcap.generation import SearchOptions, search


@pytest.fixture(scope="module")
def lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # A small vocabulary makes stop tokens and ties between beams likely, the hard cases.
    config = GPT2Config(vocab_size=40, n_positions=64, n_layer=2, n_embd=32, n_head=2, eos_token_id=3, bos_token_id=3)
    return GPT2LMHeadModel(config).eval()


PROMPTS = [[5, 9, 2, 7], [11], [4, 4, 8, 20, 21, 1, 6], [13, 14]]  # different lengths: left padding
_rng = torch.Generator().manual_seed(3)
MANY_PROMPTS = PROMPTS + [torch.randint(4, 40, (int(n),), generator=_rng).tolist() for n in torch.randint(1, 9, (12,), generator=_rng)]


def ours(lm, prompts, options):
    cond = left_padded(prompts, lm.get_input_embeddings(), torch.device("cpu"))
    return search(LMStepper(lm), cond, options)


def hf(lm, prompts, **kwargs):
    """transformers' generate on the same left-padded batch; the new tokens up to the first stop."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = lm.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, do_sample=False, **kwargs)
    rows = out[:, width:].tolist()
    stops = kwargs["eos_token_id"]
    return [row[: next((i for i, t in enumerate(row) if t in stops), len(row))] for row in rows]


@pytest.mark.parametrize("beam,alpha", [(1, 0.0), (3, 0.0), (3, 1.0), (5, 0.0)])
def test_same_captions_as_transformers_generate(lm, beam, alpha):
    stops = (3, 17)
    options = SearchOptions(beam=beam, max_tokens=12, length_alpha=alpha, num_return=min(beam, 2), stop_ids=stops)
    found = ours(lm, MANY_PROMPTS, options)
    extra = dict(num_beams=beam, early_stopping=True, length_penalty=alpha) if beam > 1 else {}
    expected = hf(lm, MANY_PROMPTS, max_new_tokens=12, eos_token_id=list(stops), num_return_sequences=options.num_return, **extra)
    assert [h.tokens for row in found for h in row] == expected


def test_beam_scores_are_length_normalised_log_probs(lm):
    """A returned score is the sum of the model's log-probs (stop token included) / length ** alpha."""
    options = SearchOptions(beam=3, max_tokens=8, length_alpha=1.0, num_return=3, stop_ids=(3,))
    for prompt, row in zip(PROMPTS, ours(lm, PROMPTS, options)):
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
        for h in row:
            seq = h.tokens + ([3] if len(h.tokens) < 8 else [])
            with torch.no_grad():
                logits = lm(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1 : -1]
            total = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq).unsqueeze(1)).sum()
            assert h.score == pytest.approx(total.item() / len(seq), abs=1e-4)


def test_wide_beam_finds_the_exact_best(lm):
    """With more beams than possible captions nothing is pruned: beam search returns the best
    caption by length-normalised score, checked by brute force on a 3-word vocabulary."""
    allowed, stop = [5, 6, 7], 3

    class Restricted(LMStepper):
        def __init__(self, model):
            super().__init__(model, logits_fn=self.restrict)

        @staticmethod
        def restrict(logits):
            mask = torch.full_like(logits, -math.inf)
            mask[:, allowed + [stop]] = 0.0
            return logits + mask

    @torch.no_grad()
    def score(prompt, seq):
        logits = Restricted.restrict(lm(torch.tensor([prompt + seq])).logits[0, len(prompt) - 1 : -1])
        return float(torch.log_softmax(logits, -1).gather(1, torch.tensor(seq).unsqueeze(1)).sum()) / len(seq)

    options = SearchOptions(beam=64, max_tokens=3, length_alpha=1.0, stop_ids=(stop,))
    for prompt in PROMPTS[:2]:
        found = search(Restricted(lm), left_padded([prompt], lm.get_input_embeddings(), torch.device("cpu")), options)[0][0]
        candidates = [list(s) + [stop] for n in range(3) for s in itertools.product(allowed, repeat=n)]
        candidates += [list(s) for s in itertools.product(allowed, repeat=3)]
        best = max(candidates, key=lambda seq: score(prompt, seq))
        assert found.tokens == [t for t in best if t != stop]
        assert found.score == pytest.approx(score(prompt, best), abs=1e-5)


def test_sampling_is_reproducible_with_a_seed_and_varies_without(lm):
    options = SearchOptions(beam=1, max_tokens=10, length_alpha=1.0, sample=True, num_return=4, seed=7, stop_ids=(3,))
    first = ours(lm, PROMPTS, options)
    assert [[h.tokens for h in row] for row in first] == [[h.tokens for h in row] for row in ours(lm, PROMPTS, options)]
    assert all(len(row) == 4 for row in first)
    assert len({tuple(h.tokens) for row in first for h in row}) > len(PROMPTS)  # samples differ


def test_top_k_one_and_tiny_top_p_are_greedy(lm):
    greedy = ours(lm, PROMPTS, SearchOptions(beam=1, max_tokens=10, length_alpha=1.0, stop_ids=(3,)))
    for knob in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = ours(lm, PROMPTS, SearchOptions(beam=1, max_tokens=10, length_alpha=1.0, sample=True, seed=1, stop_ids=(3,), **knob))
        assert [row[0].tokens for row in sampled] == [row[0].tokens for row in greedy]


def test_top_k_only_draws_from_the_k_likeliest(lm):
    options = SearchOptions(beam=1, max_tokens=1, length_alpha=1.0, sample=True, top_k=2, num_return=64, seed=0)
    prompt = PROMPTS[0]
    likeliest = set(lm(torch.tensor([prompt])).logits[0, -1].topk(2).indices.tolist())
    drawn = {h.tokens[0] for h in ours(lm, [prompt], options)[0]}
    assert drawn <= likeliest and len(drawn) == 2


def test_greedy_batch_equals_one_at_a_time(lm):
    options = SearchOptions(beam=1, max_tokens=12, length_alpha=1.0, stop_ids=(3,))
    together = ours(lm, PROMPTS, options)
    assert together == [ours(lm, [p], options)[0] for p in PROMPTS]


def test_conditioning_on_embeddings_alone(lm):
    """Kinds like DeCap and ClipCap condition on embeddings, not tokens: no mask, no ids."""
    embeds = torch.randn(3, 2, 32, generator=torch.Generator().manual_seed(0))
    options = SearchOptions(beam=2, max_tokens=6, length_alpha=1.0, stop_ids=(3,))
    together = search(LMStepper(lm), LMInput(embeds), options)
    assert together == [search(LMStepper(lm), LMInput(embeds[i : i + 1]), options)[0] for i in range(3)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(beam=0), "beam"),
        (dict(beam=3, sample=True), "exclude"),
        (dict(num_return=0), "number of captions"),
        (dict(sample=True, temperature=0), "temperature"),
        (dict(sample=True, top_p=1.5), "top_p"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(OptionError, match=message):
        SearchOptions(**kwargs)


def test_n_best_needs_beams_or_samples():
    with pytest.raises(OptionError, match="beam of at least 3"):
        SearchOptions(beam=2, num_return=3).with_defaults(beam=1, max_tokens=5, length_alpha=1.0)
    assert SearchOptions(num_return=3).with_defaults(beam=1, max_tokens=5, length_alpha=1.0).beam == 3
    assert SearchOptions(num_return=3, sample=True).with_defaults(beam=3, max_tokens=5, length_alpha=1.0).beam == 1
