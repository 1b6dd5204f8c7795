"""Text-only decoder training: loss, logs, checkpoints and resume, and caption memorisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ragcap.decoders import load_decoder
from ragcap.decoders.tokenizers import CaptionTokenizer
from ragcap.embedder_info import EmbedderInfo
from ragcap.errors import ModelError, OptionError
from ragcap.train import TrainConfig, train_decoder

CAPTIONS = [
    "a dog runs on the beach",
    "two cats sleep on a sofa",
    "a man rides a red bicycle",
    "a plate of food with broccoli",
    "a train stops at the station",
    "children play football in a park",
    "a bird sits on a wooden fence",
    "a woman holds an umbrella in the rain",
]
TINY = TrainConfig(epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, val_fraction=0.25, n_layer=1, n_head=2, n_embd=32, max_tokens=12, dropout=0.1, device="cpu")


def unit_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


EMBEDDER = EmbedderInfo(spec="test:random", dim=16)
VECTORS = unit_vectors(len(CAPTIONS), 16)


def test_training_lowers_the_loss_and_writes_a_loadable_decoder(tmp_path):
    steps = []
    config = TrainConfig(**{**TINY.__dict__, "epochs": 4, "noise_std": 0.05})
    result = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", config, progress=lambda s, t, loss: steps.append((s, t)))
    assert steps == [(s, 8) for s in range(1, 9)]  # 6 training captions / batch 4 = 2 steps x 4 epochs
    log = [json.loads(line) for line in (tmp_path / "dec" / "train_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3, 4] and log == result["epochs"]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert all(row["val_loss"] is not None for row in log)
    decoder = load_decoder(tmp_path / "dec")
    assert decoder.embedder == EMBEDDER and decoder.config.n_embd == 32
    assert len(decoder.generate(torch.from_numpy(VECTORS[:2]))) == 2


def test_resume_after_interruption_gives_the_same_weights(tmp_path):
    class Interrupted(Exception):
        pass

    def stop_in_second_epoch(step, total, loss):
        if step == 3:  # first step of epoch 2: epoch 1's checkpoint is on disk
            raise Interrupted

    train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "straight", TINY)
    with pytest.raises(Interrupted):
        train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "resumed", TINY, progress=stop_in_second_epoch)
    result = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "resumed", TINY, resume=True)
    assert [row["epoch"] for row in result["epochs"]] == [1, 2]
    a = load_decoder(tmp_path / "straight").state_dict()
    b = load_decoder(tmp_path / "resumed").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_the_time_per_epoch_is_estimated_before_training_without_changing_the_weights(tmp_path):
    config = TrainConfig(**{**TINY.__dict__, "noise_std": 0.05})  # dropout and noise draw from torch's RNG
    events = []
    timed = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "timed", config, keep_checkpoint=True,
                          on_estimate=events.append, progress=lambda step, total, loss: events.append(step))
    estimate = events[0]
    assert events[1:] == [1, 2, 3, 4]  # announced once, before the first step
    assert estimate["steps_per_epoch"] == 2 and estimate["epochs"] == 2
    assert estimate["expected_epoch_s"] > 0 and timed["expected_epoch_s"] == estimate["expected_epoch_s"]
    plain = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "plain", config, estimate=False)
    assert plain["expected_epoch_s"] is None
    assert [row["train_loss"] for row in plain["epochs"]] == [row["train_loss"] for row in timed["epochs"]]
    a = load_decoder(tmp_path / "timed").state_dict()
    b = load_decoder(tmp_path / "plain").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Resuming a finished run trains nothing, so it estimates nothing.
    finished = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "timed", config, resume=True, on_estimate=events.append)
    assert finished["expected_epoch_s"] is None and len(events) == 5


def test_refuses_to_overwrite_or_resume_a_different_run(tmp_path):
    one_epoch = TrainConfig(**{**TINY.__dict__, "epochs": 1})
    train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", one_epoch, keep_checkpoint=True)
    with pytest.raises(ModelError, match="already holds"):
        train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", TINY)
    with pytest.raises(ModelError, match=r"other captions or settings \(--epochs 1, now 2\)"):
        train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", TINY, resume=True)
    with pytest.raises(ModelError, match=r"other captions or settings \(the same settings, other data\)"):
        train_decoder(CAPTIONS[:-1], VECTORS[:-1], EMBEDDER, tmp_path / "dec", one_epoch, resume=True)
    # --noise is given as a variance: the change is named as one (it said "--noise (as a
    # standard deviation) 0.0, now 0.1264..." to a user who had typed --noise 0.016).
    noisy = TrainConfig(**{**one_epoch.__dict__, "noise_std": 0.016 ** 0.5})
    with pytest.raises(ModelError, match=r"other captions or settings \(--noise 0, now 0.016\)"):
        train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", noisy, resume=True)


def test_a_completed_run_removes_its_checkpoint_and_reports_each_epoch(tmp_path):
    rows = []
    result = train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", TINY, on_epoch=rows.append)
    assert rows == result["epochs"] and [r["epoch"] for r in rows] == [1, 2]
    assert (tmp_path / "dec" / "model.safetensors").exists() and not (tmp_path / "dec" / "checkpoint.pt").exists()
    with pytest.raises(ModelError, match="completed decoder and no checkpoint"):
        train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", TINY, resume=True)


@pytest.mark.parametrize("given,message", [
    ({"batch_size": 0}, "--batch-size must be at least 1, not 0"),
    ({"epochs": 0}, "--epochs must be at least 1, not 0"),
    ({"n_head": 3, "n_embd": 64}, "--width 64 is not divisible by --heads 3"),
    ({"lr": -1.0}, "--lr must be above 0, not -1.0"),
    ({"lr": float("nan")}, "--lr must be above 0, not nan"),
    ({"dropout": 1.5}, "--dropout must be at least 0 and below 1, not 1.5"),
    ({"max_tokens": 0}, "--max-tokens must be at least 1, not 0"),
    ({"n_layer": 0}, "--layers must be at least 1, not 0"),
    ({"label_smoothing": -1.0}, "--label-smoothing must be at least 0 and below 1, not -1.0"),
    ({"warmup_steps": -5}, "--warmup-steps must be at least 0, not -5"),
    ({"val_fraction": 1.0}, "--val-fraction must be at least 0 and below 1, not 1.0"),
    ({"seed": -1}, "--seed must be at least 0, not -1"),  # was 'unexpected ValueError ... a bug in ragcap'
])
def test_settings_out_of_range_are_refused_before_training(given, message):
    """Issue rows: --batch-size 0 died dividing by zero, --heads 3 of width 64 in a reshape, and
    --epochs 0 wrote an untrained decoder as if trained."""
    from ragcap.train import preset, with_overrides

    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        with_overrides(preset("small"), **given)


def test_rejects_vectors_that_do_not_match(tmp_path):
    with pytest.raises(ModelError, match="shape"):
        train_decoder(CAPTIONS, VECTORS[:3], EMBEDDER, tmp_path / "dec", TINY)
    with pytest.raises(ModelError, match="no captions"):
        train_decoder([], VECTORS[:0], EMBEDDER, tmp_path / "dec", TINY)


def test_pruned_vocabulary_covers_the_captions_and_decodes_to_the_same_text(tmp_path):
    train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "dec", TINY)
    pruned = load_decoder(tmp_path / "dec", device="cpu")
    full = CaptionTokenizer()
    used = set().union(*(full.clip_ids(c) for c in CAPTIONS))
    assert pruned.config.vocab_size == len(used | {full.sot_id, full.eot_id}) < full.vocab_size
    assert pruned.gpt.lm_head.out_features == pruned.config.vocab_size
    for caption in CAPTIONS:
        assert pruned.tokenizer.decode(pruned.tokenizer.encode(caption)) == full.normalise(caption)
    with pytest.raises(ModelError, match="vocabulary"):
        pruned.tokenizer.encode("zebra xylophone quantum")
    train_decoder(CAPTIONS, VECTORS, EMBEDDER, tmp_path / "full", TrainConfig(**{**TINY.__dict__, "prune_vocab": False}))
    assert load_decoder(tmp_path / "full").config.vocab_size == full.vocab_size


@pytest.mark.parametrize("kind,given,message", [
    # A 0 used to be taken as "the default" and trained, exit 0; the others failed after the LM
    # loaded, naming no flag ('ClipCap prefix_length, clip_length, ... must be >= 1').
    ("clipcap", {"prefix_length": 0}, "--prefix-length must be at least 1, not 0"),
    ("clipcap", {"mapping_layers": 0}, "--mapping-layers must be at least 1, not 0"),
    ("clipcap", {"max_tokens": 0}, "--max-tokens must be at least 1, not 0"),
    ("smallcap", {"cross_attention_width": 0}, "--cross-attention-width must be at least 1, not 0"),
    ("smallcap", {"k": 0}, "--k must be at least 1, not 0"),
])
def test_clipcap_and_smallcap_sizes_out_of_range_are_refused_by_flag(kind, given, message):
    from ragcap.train import ClipCapTrainConfig, SmallCapTrainConfig, with_overrides

    config = ClipCapTrainConfig() if kind == "clipcap" else SmallCapTrainConfig()
    with pytest.raises(OptionError, match=message):
        with_overrides(config, **given)
