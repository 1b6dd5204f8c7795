"""ClipCap's decoder: ClipCap's shapes, its stop rule, batched search, persistence, frozen LM."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ragcap.decoders import ClipCapConfig, ClipCapDecoder, load_decoder
from ragcap.decoders.clipcap import mapping_network
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions, search
from tests.conftest import shared_path

EMBEDDER = EmbedderInfo(spec="test:tiny", dim=16)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from ragcap.decoders.lm_prompt import save_random_lm

    return save_random_lm(tmp_path_factory.mktemp("lm"), shared_path("models", "gpt2-tokenizer"), n_layer=1, n_embd=32, n_head=2)


def make(lm_dir, mapping: str = "mlp", **config) -> ClipCapDecoder:
    from ragcap.decoders.lm import load_causal_lm

    tokenizer, lm = load_causal_lm(lm_dir)
    torch.manual_seed(0)
    settings = dict(embed_dim=16, mapping=mapping, prefix_length=4, clip_length=3, mapping_layers=2, max_tokens=12) | config
    return ClipCapDecoder(ClipCapConfig(**settings), EMBEDDER, lm, tokenizer).eval()


@pytest.fixture(scope="module", params=["mlp", "transformer"])
def decoder(request, lm_dir) -> ClipCapDecoder:
    return make(lm_dir, request.param)


def prefixes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def test_mapping_networks_have_clipcaps_shapes():
    """ClipCap (train.py): MLP 512 -> 3840 -> 7680 for GPT-2 small and prefix 10; transformer:
    Linear(dim, 40 * 768), 40 constants, 8 layers of 8 heads with a 2x MLP."""
    with torch.device("meta"):
        mlp = mapping_network(ClipCapConfig(embed_dim=512), 768)
        transformer = mapping_network(ClipCapConfig(embed_dim=640, mapping="transformer", prefix_length=40, clip_length=40), 768)
    assert [tuple(p.shape) for p in mlp.parameters()] == [(3840, 512), (3840,), (7680, 3840), (7680,)]
    assert isinstance(mlp[1], torch.nn.Tanh)
    assert transformer.linear.weight.shape == (40 * 768, 640) and transformer.prefix_const.shape == (40, 768)
    assert len(transformer.layers) == 8 and transformer.layers[0].self_attn.num_heads == 8
    assert transformer.layers[0].linear1.weight.shape == (2 * 768, 768) and transformer.layers[0].norm_first


def test_prefix_is_prefix_length_embeddings_of_the_lms_width(decoder):
    assert decoder.prefix_embeds(prefixes(3)).shape == (3, 4, 32)
    with pytest.raises(ModelError, match="shape"):
        decoder.prefix_embeds(torch.zeros(2, 5))


def test_greedy_batched_equals_one_at_a_time(decoder):
    x = prefixes(5)
    assert decoder.generate(x) == [decoder.generate(x[i : i + 1])[0] for i in range(5)]
    beam = SearchOptions(beam=3)
    assert decoder.generate(x, beam) == [decoder.generate(x[i : i + 1], beam)[0] for i in range(5)]


def test_greedy_follows_teacher_forced_argmax_and_ends_at_the_first_stop_token(lm_dir):
    """The KV-cached search picks the argmax of the teacher-forced logits at every step, and a
    caption ends at the first stop token, which is not part of its text. ClipCap's stop token is
    '.', which a random LM hardly ever writes, so the rule is exercised with a token it does write."""
    free = make(lm_dir)
    assert free.config.stop_token == "." and free.stop_id == free.tokenizer.encode(".")[0]
    x = prefixes(6)
    unstopped = [row[0].tokens for row in search(free.stepper(), free.prepare(x), free.search_defaults(SearchOptions()))]
    for row, ids in zip(x, unstopped):
        logits = free.teacher_forced_logits(row.unsqueeze(0), torch.tensor([ids]))[0]
        assert ids == logits.argmax(-1).tolist()

    stop = unstopped[0][3]
    stopping = make(lm_dir, stop_token=free.tokenizer.decode([stop]))
    assert stopping.stop_id == stop
    expected = [ids[: ids.index(stop)] if stop in ids else ids for ids in unstopped]
    found = search(stopping.stepper(), stopping.prepare(x), stopping.search_defaults(SearchOptions()))
    assert [row[0].tokens for row in found] == expected
    assert stopping.generate(x) == [stopping.detokenize(ids) for ids in expected]


def test_sampling_is_seeded_and_n_best_is_ranked(decoder):
    x = prefixes(2)
    options = SearchOptions(sample=True, seed=4, num_return=3, top_p=0.9, temperature=1.3)
    assert decoder.caption(x, options) == decoder.caption(x, options)
    best = decoder.caption(x, SearchOptions(num_return=3))
    assert all([c.score for c in row] == sorted((c.score for c in row), reverse=True) for row in best)


def test_length_cap_is_clipcaps_entry_length_and_checked(lm_dir):
    assert ClipCapConfig(embed_dim=16).max_tokens == 67
    decoder = make(lm_dir, max_tokens=5)
    found = search(decoder.stepper(), decoder.prepare(prefixes(3)), decoder.search_defaults(SearchOptions()))
    assert [len(row[0].tokens) for row in found] == [5, 5, 5]  # a random LM never writes '.' here
    with pytest.raises(ModelError, match="max_tokens"):
        decoder.generate(prefixes(1), SearchOptions(max_tokens=6))


def test_training_targets_end_with_the_stop_token(lm_dir):
    decoder = make(lm_dir, max_tokens=8)
    tokenizer = decoder.tokenizer
    targets = decoder.training_targets(["A dog runs on the beach. ", "two  cats", "one two three four five six seven eight nine"])
    assert targets[0].tolist() == tokenizer.encode("A dog runs on the beach.") + [-100]
    assert targets[1].tolist()[:4] == tokenizer.encode("two cats.") + [-100]
    assert targets[2].tolist() == tokenizer.encode("one two three four five six seven eight")  # cut: no stop token
    assert decoder.target_text(" A dog  runs. ") == "A dog runs"


def test_saved_directory_loads_on_its_own(decoder, tmp_path, lm_dir):
    decoder.save(tmp_path / "clipcap")
    meta = json.loads((tmp_path / "clipcap" / "config.json").read_text())
    assert meta["kind"] == "clipcap" and meta["config"]["mapping"] == decoder.config.mapping
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "clipcap", moved)  # nothing may point back at the LM it was built from
    loaded = load_decoder(moved, device="cpu")
    assert isinstance(loaded, ClipCapDecoder) and loaded.config == decoder.config and loaded.embedder == EMBEDDER
    for (name, a), (_, b) in zip(decoder.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm.lm_head.weight.data_ptr() == loaded.lm.transformer.wte.weight.data_ptr()  # still tied
    x = prefixes(3)
    for options in (SearchOptions(), SearchOptions(beam=3)):
        assert loaded.generate(x, options) == decoder.generate(x, options)


def test_a_decoder_without_its_lm_files_says_what_is_missing(lm_dir, tmp_path):
    # Before: no lm/ gave a hub "Repo id must be in the form" error; no tokenizer files, a
    # tokenizer of special tokens only and "no token for the stop token '.'".
    make(lm_dir).save(tmp_path / "clipcap")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "clipcap" / "lm" / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="tokenizer in '.*lm' is empty"):
        load_decoder(tmp_path / "clipcap")
    shutil.rmtree(tmp_path / "clipcap" / "lm")
    with pytest.raises(ModelError, match="clipcap is incomplete: lm/config.json is missing"):
        load_decoder(tmp_path / "clipcap")


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_int8_captions_and_stays_near_fp32(lm_dir, mapping, tmp_path):
    from ragcap.int8 import ProjectedAttention

    make(lm_dir, mapping).save(tmp_path / "clipcap")
    exact, low = load_decoder(tmp_path / "clipcap", "cpu"), load_decoder(tmp_path / "clipcap", "cpu", precision="int8")
    # The mapping's attention too (nn.TransformerEncoderLayer's fused path must give way to it).
    assert (mapping == "transformer") == any(isinstance(m, ProjectedAttention) for m in low.modules())
    x = prefixes(3)
    with torch.inference_mode():
        near, far = exact.prefix_embeds(x), low.prefix_embeds(x)
    assert torch.nn.functional.cosine_similarity(near.flatten(1), far.flatten(1)).min() > 0.99 and not torch.equal(near, far)
    assert [len(c) for c in low.caption(x)] == [1, 1, 1]


def test_frozen_lm_gets_no_gradient_and_no_dropout(lm_dir):
    decoder = make(lm_dir).freeze_lm()
    decoder.train()
    assert not decoder.lm.training and decoder.mapping.training
    assert not any(p.requires_grad for p in decoder.lm.parameters())
    assert all(p.requires_grad for p in decoder.mapping.parameters())
    decoder.freeze_lm(False).train()
    assert decoder.lm.training and all(p.requires_grad for p in decoder.lm.parameters())
