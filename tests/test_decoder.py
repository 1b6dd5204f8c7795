"""DeCap's decoder and the decoder registry: teacher forcing, search through ragcap.generation,
persistence with a recorded kind, and loading older and damaged directories."""

from __future__ import annotations

import json

import pytest
import torch

from ragcap.decoders import DECODERS, ClipCapDecoder, DeCapConfig, DeCapDecoder, decoder_class, load_decoder
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions, search

EMBEDDER = EmbedderInfo(spec="test:tiny", dim=16)


@pytest.fixture(scope="module")
def model() -> DeCapDecoder:
    torch.manual_seed(0)
    config = DeCapConfig(embed_dim=16, n_layer=2, n_head=2, n_embd=64, max_tokens=8, dropout=0.0)
    return DeCapDecoder(config, EMBEDDER).eval()


def prefixes(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def test_forward_predicts_one_token_per_input(model):
    logits = model(prefixes(3), torch.zeros(3, 5, dtype=torch.long))
    assert logits.shape == (3, 5, 49408)


def test_right_padding_does_not_change_a_captions_logits(model):
    short = model.tokenizer.encode("a dog")
    long = model.tokenizer.encode("two dogs running on a sandy beach")
    sot = model.config.sot_id
    x = prefixes(2)
    alone = model(x[:1], torch.tensor([[sot] + short]))
    padded = torch.tensor([[sot] + short + [0] * (len(long) - len(short)), [sot] + long])
    batched = model(x, padded)
    torch.testing.assert_close(batched[0, : len(short) + 1], alone[0], rtol=1e-5, atol=1e-5)


def test_greedy_batched_equals_one_at_a_time(model):
    x = prefixes(6)
    together = model.generate(x)
    assert together == [model.generate(x[i : i + 1])[0] for i in range(6)]
    assert all(len(model.tokenizer.encode(c)) <= 8 for c in together)


def test_greedy_is_the_default_and_equals_teacher_forced_argmax(model):
    """The KV-cached search must pick, at every step, the argmax of the teacher-forced logits."""
    x = prefixes(3)
    found = search(model.stepper(), model.prepare(x), model.search_defaults(SearchOptions()))
    for row, (best,) in zip(x, found):
        ids = best.tokens
        inputs = torch.tensor([[model.config.sot_id] + ids])
        logits = model(row.unsqueeze(0), inputs)[0]
        logits[:, model.config.sot_id] = -float("inf")
        expected = logits.argmax(-1).tolist()
        assert ids == expected[: len(ids)]
        assert len(ids) == 8 or expected[len(ids)] == model.config.eot_id


def test_scores_are_the_models_mean_token_log_prob(model):
    x = prefixes(3)
    for beam in (1, 3):
        found = search(model.stepper(), model.prepare(x), model.search_defaults(SearchOptions(beam=beam, max_tokens=6)))
        ids = [row[0].tokens for row in found]
        ended = [len(row) < 6 for row in ids]
        torch.testing.assert_close(model.score(x, ids, ended), torch.tensor([row[0].score for row in found]), rtol=1e-4, atol=1e-4)


def test_n_best_and_samples(model):
    x = prefixes(2)
    best3 = model.caption(x, SearchOptions(num_return=3))  # widens the default greedy to a beam of 3
    assert [len(row) for row in best3] == [3, 3]
    assert all([c.score for c in row] == sorted((c.score for c in row), reverse=True) for row in best3)
    assert [row[0].text for row in best3] == [row[0].text for row in model.caption(x, SearchOptions(beam=3))]
    sampled = model.caption(x, SearchOptions(sample=True, num_return=4, seed=3, temperature=1.5))
    assert sampled == model.caption(x, SearchOptions(sample=True, num_return=4, seed=3, temperature=1.5))


def test_lengths_beyond_training_and_bad_shapes_are_refused(model):
    with pytest.raises(ModelError, match="max_tokens"):
        model.generate(prefixes(1), SearchOptions(max_tokens=9))
    with pytest.raises(ModelError, match="shape"):
        model.generate(torch.zeros(2, 5))


def test_save_load_round_trip_records_the_kind(model, tmp_path):
    model.save(tmp_path / "dec")
    assert sorted(p.name for p in (tmp_path / "dec").iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "dec" / "config.json").read_text())["kind"] == "decap"
    loaded = load_decoder(tmp_path / "dec", device="cpu")
    assert isinstance(loaded, DeCapDecoder) and loaded.config == model.config and loaded.embedder == EMBEDDER
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.gpt.lm_head.weight.data_ptr() == loaded.gpt.transformer.wte.weight.data_ptr()  # still tied
    x = prefixes(3)
    assert loaded.generate(x, SearchOptions(beam=2)) == model.generate(x, SearchOptions(beam=2))


def test_decoders_saved_before_kinds_existed_still_load(model, tmp_path):
    model.save(tmp_path / "dec")
    meta = json.loads((tmp_path / "dec" / "config.json").read_text())
    old = {"format": "ragcap-decoder/1", "decoder": meta["config"], "embedder": meta["embedder"]}
    (tmp_path / "dec" / "config.json").write_text(json.dumps(old))
    assert load_decoder(tmp_path / "dec").config == model.config


def test_load_reports_missing_corrupt_unknown_and_foreign_directories(model, tmp_path):
    with pytest.raises(ModelError, match="not a trained decoder"):
        load_decoder(tmp_path / "nothing")
    model.save(tmp_path / "dec")
    config = tmp_path / "dec" / "config.json"
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "kind": "mystery"}))
    with pytest.raises(ModelError, match="unknown decoder kind 'mystery'.*decap"):
        load_decoder(tmp_path / "dec")
    config.write_text(json.dumps({**meta, "config": {**meta["config"], "flux_capacitor": 1}}))
    with pytest.raises(ModelError, match="unknown decap config keys.*flux_capacitor"):
        load_decoder(tmp_path / "dec")
    config.write_text(json.dumps(meta))
    (tmp_path / "dec" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="model.safetensors cannot be loaded"):
        load_decoder(tmp_path / "dec")
    config.write_text(json.dumps({"kind": "decap"}))
    with pytest.raises(ModelError, match="not a valid decoder config"):
        load_decoder(tmp_path / "dec")


def test_weights_of_another_size_are_named_on_one_short_line(model, tmp_path):
    # torch lists every mismatched key over many lines; the error a user sees is one line.
    model.save(tmp_path / "dec")
    other = DeCapDecoder(DeCapConfig(embed_dim=16, n_layer=3, n_head=2, n_embd=32, max_tokens=8), EMBEDDER)
    other.save(tmp_path / "other")
    (tmp_path / "other" / "model.safetensors").replace(tmp_path / "dec" / "model.safetensors")
    with pytest.raises(ModelError, match="model.safetensors cannot be loaded.*Unexpected key") as err:
        load_decoder(tmp_path / "dec")
    assert "\n" not in str(err.value) and len(str(err.value)) < 600


def test_compatibility_message_names_both_embedders(model, tmp_path):
    model.save(tmp_path / "dec")
    loaded = load_decoder(tmp_path / "dec")
    loaded.check_embedder(EMBEDDER, "coco")  # same embedder: fine
    with pytest.raises(ModelError) as err:
        loaded.check_embedder(EmbedderInfo(spec="ViT-B-32:openai", dim=512), "coco")
    message = str(err.value)
    assert "test:tiny" in message and "ViT-B-32:openai" in message and "coco" in message
    assert str(tmp_path / "dec") in message and "ragcap train-decoder" in message


def test_registry_names_every_kind_by_its_recorded_name():
    assert all(decoder_class(name).kind == name for name in DECODERS)
    assert decoder_class("clipcap") is ClipCapDecoder and decoder_class("decap") is DeCapDecoder


def test_tokenizer_normalises_and_drops_specials(model):
    tok = model.tokenizer
    assert tok.normalise("A  Dog  RUNS. <end_of_text>") == "a dog runs ."
    assert tok.eot_id not in tok.encode("x <end_of_text> y")


def test_caption_tokenizer_decodes_as_open_clips_simple_tokenizer():
    """CaptionTokenizer reads CLIP's vocabulary from the BPE file itself (no open_clip import to
    caption): the same id -> token table as SimpleTokenizer, and the same text for any ids."""
    import random

    from open_clip.tokenizer import SimpleTokenizer

    from ragcap.decoders.tokenizers import CaptionTokenizer

    ours, theirs = CaptionTokenizer(), SimpleTokenizer()
    assert ours.vocab_size == theirs.vocab_size and (ours.sot_id, ours.eot_id) == (theirs.sot_token_id, theirs.eot_token_id)
    assert all(ours._tokens[i] == theirs.decoder[i] for i in range(theirs.vocab_size))
    rng = random.Random(0)
    for _ in range(500):  # arbitrary ids: partial UTF-8 sequences, specials anywhere
        ids = [rng.randrange(theirs.vocab_size) for _ in range(rng.randrange(30))]
        specials = (theirs.sot_token_id, theirs.eot_token_id)
        assert ours.decode(ids) == " ".join(theirs.decode([i for i in ids if i not in specials]).split())
    for caption in ("A café's crème brûlée, 2 × 3 🙂", "a dog runs"):
        assert ours.decode(theirs.encode(caption)) == " ".join(theirs.decode(theirs.encode(caption)).split())
