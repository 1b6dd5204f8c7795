"""ragcap.decoders.gpt: GPT-2 as DeCap's decoder runs it, held equal to transformers' GPT2LMHeadModel."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from ragcap.decoders.gpt import GPT, GPTConfig, GPTStepper
from ragcap.decoders.lm import LMInput, LMStepper
from ragcap.generation import SearchOptions, search

CONFIG = GPTConfig(vocab_size=97, n_positions=24, n_embd=48, n_layer=3, n_head=4)


def twins(seed: int = 0) -> tuple[GPT2LMHeadModel, GPT]:
    """A random GPT2LMHeadModel and a GPT holding its very tensors (loaded strictly: same names and shapes)."""
    torch.manual_seed(seed)
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=CONFIG.vocab_size, n_positions=CONFIG.n_positions, n_embd=CONFIG.n_embd,
                                        n_layer=CONFIG.n_layer, n_head=CONFIG.n_head)).eval()
    ours = GPT(CONFIG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def test_the_hidden_states_and_logits_equal_gpt2lmheadmodels():
    theirs, ours = twins()
    embeds = torch.randn(3, 9, CONFIG.n_embd)
    with torch.inference_mode():
        expected = theirs.transformer(inputs_embeds=embeds).last_hidden_state
        hidden = ours(embeds)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.lm_head(hidden), theirs.lm_head(expected), rtol=1e-5, atol=1e-5)


def test_the_output_layer_is_the_token_embedding():
    ours = GPT(CONFIG)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert set(ours.state_dict()) == set(GPT2LMHeadModel(GPT2Config(n_layer=CONFIG.n_layer)).state_dict())


def test_stepping_with_the_cache_equals_running_the_whole_sequence():
    _, ours = twins()
    embeds = torch.randn(4, 2, CONFIG.n_embd)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, 5))
    stepper = GPTStepper(ours)
    with torch.inference_mode():
        whole = ours.lm_head(ours(torch.cat([embeds, ours.transformer.wte(tokens)], dim=1)))
        logits, cache = stepper.start(LMInput(embeds))
        stepped = [logits]
        for i in range(tokens.shape[1]):
            stepped.append(stepper.step(tokens[:, i], cache))
        torch.testing.assert_close(torch.stack(stepped, dim=1), whole[:, 1:], rtol=1e-5, atol=1e-5)
        # select keeps, reorders and repeats rows: row r of the result continues row rows[r]
        rows = torch.tensor([2, 2, 0])
        cache = stepper.select(cache, rows)
        nxt = torch.randint(0, CONFIG.vocab_size, (3,))
        again = ours.lm_head(ours(torch.cat([embeds[rows], ours.transformer.wte(torch.cat([tokens[rows], nxt[:, None]], 1))], 1)))
        torch.testing.assert_close(stepper.step(nxt, cache), again[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beam", [1, 3])
def test_search_writes_what_it_writes_with_gpt2lmheadmodel(beam):
    theirs, ours = twins(1)
    embeds = torch.randn(5, 2, CONFIG.n_embd)
    options = SearchOptions(beam=beam, max_tokens=12, length_alpha=1.0, stop_ids=(3,))
    found = search(GPTStepper(ours), LMInput(embeds), options)
    expected = search(LMStepper(theirs), LMInput(embeds), options)
    assert [[h.tokens for h in row] for row in found] == [[h.tokens for h in row] for row in expected]
    assert [h.score for row in found for h in row] == pytest.approx([h.score for row in expected for h in row], abs=1e-4)


def test_inputs_longer_than_the_position_table_are_refused():
    from ragcap.errors import ModelError

    with pytest.raises(ModelError, match="25 positions is longer than the decoder.s 24-position"):
        GPT(CONFIG)(torch.zeros(1, CONFIG.n_positions + 1, CONFIG.n_embd))


def test_padded_conditionings_are_refused_not_misread():
    from ragcap.errors import ModelError

    _, ours = twins()
    with pytest.raises(ModelError, match="unpadded"):
        GPTStepper(ours).start(LMInput(torch.zeros(2, 3, CONFIG.n_embd), mask=torch.ones(2, 3)))


def test_dropout_acts_in_training_only():
    _, ours = twins()
    embeds = torch.randn(2, 6, CONFIG.n_embd)
    with torch.no_grad():
        assert torch.equal(ours(embeds), ours(embeds))
        ours.train()
        assert not torch.allclose(ours(embeds), ours(embeds))


def test_a_new_model_is_initialised_as_gpt2_is():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, n_positions=64, n_embd=256, n_layer=8, n_head=4))
    block = model.transformer.h[0]
    # N(0, 0.02), and the projections into the residual stream N(0, 0.02 / sqrt(2 * 8)) = N(0, 0.005)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.005, rel=0.05)
    assert block.attn.c_attn.bias.abs().max().item() == 0 and block.ln_1.weight.min().item() == 1


def test_decoding_a_saved_decap_decoder_does_not_import_transformers_or_dynamo(tmp_path):
    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.embedder_info import EmbedderInfo

    DeCapDecoder(DeCapConfig(embed_dim=16, n_layer=1, n_head=2, n_embd=32, max_tokens=5), EmbedderInfo("test", 16)).save(tmp_path / "dec")
    script = textwrap.dedent(f"""
        import sys, torch
        from ragcap.decoders import load_decoder
        captions = load_decoder({str(tmp_path / "dec")!r}, device="cpu").generate(torch.randn(2, 16))
        assert len(captions) == 2
        print(sorted(m for m in ("transformers", "open_clip", "torchvision", "torch._dynamo") if m in sys.modules))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
