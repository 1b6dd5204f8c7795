"""`ragcap train-clipcap` end to end: text-only (CapDec-style) and paired training on real data,
resume after a kill, refused inputs, and every decoding option of both kinds through caption and eval."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.decoders import load_decoder
from ragcap.train import _split
from tests.conftest import shared_path

runner = CliRunner()


def ragcap(*args, ok: bool = True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def random_lm(out, width: int, layers: int = 1, dropout: bool = True):
    """`ragcap models save-random-lm` with the real GPT-2 tokenizer; without dropout on request, so
    a tiny model can memorise its captions in few epochs."""
    ragcap("models", "save-random-lm", out, "--tokenizer", shared_path("models", "gpt2-tokenizer"),
           "--layers", layers, "--width", width, "--heads", 2)
    if not dropout:
        config = json.loads((out / "config.json").read_text())
        config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        (out / "config.json").write_text(json.dumps(config))
    return out


def manifest_rows(n: int) -> list[dict]:
    manifest = shared_path("data", "coco", "images", "manifest.jsonl")
    return [json.loads(line) for line in manifest.read_text().splitlines()][:n]


# Settings under which a 1-layer, width-64 GPT-2 without dropout memorises its captions (measured:
# 50/50 text-only in 80 epochs but 37-49/50 in 60; 20/20 paired in 120, 1/20 in 80 at lr 4e-3).
OVERFIT = ["--train-lm", "--lr", "3e-3", "--warmup-steps", "10", "--val-fraction", "0", "--json"]


@pytest.fixture(scope="module")
def overfit_lm(tmp_path_factory):
    return random_lm(tmp_path_factory.mktemp("overfit") / "lm", width=64, dropout=False)


@pytest.mark.slow
def test_text_only_training_reproduces_real_coco_captions(tiny_clip_dir, overfit_lm, tmp_path):
    """CapDec's setting without noise: 50 real COCO captions, each reproduced from its own text
    embedding by an MLP mapping and a tiny GPT-2 trained through the CLI."""
    coco = shared_path("data", "coco", "captions_val2017.json")
    ragcap("ingest", "coco-captions", coco, "-c", "coco", "-m", tiny_clip_dir, "--limit", "50")
    trained = json.loads(ragcap("train-clipcap", "-c", "coco", "-o", tmp_path / "clipcap", "--lm", overfit_lm, "--mapping", "mlp",
                                "--epochs", "80", "--batch-size", "10", *OVERFIT).stdout)
    assert trained["captions"] == 50 and trained["paired"] == 0
    assert trained["epochs"][-1]["train_loss"] < trained["epochs"][0]["train_loss"] / 10

    ragcap("export", "coco", tmp_path / "coco.parquet")
    stored = pq.read_table(tmp_path / "coco.parquet").column("caption").to_pylist()
    texts = [a for c in stored for a in ("--text", c)]
    result = ragcap("caption", *texts, "-c", "coco", "--mode", "vd", "--decoder", tmp_path / "clipcap", "--json")
    generated = {line["text"]: line["caption"] for line in map(json.loads, result.stdout.splitlines())}
    decoder = load_decoder(tmp_path / "clipcap")
    exact = sum(generated[c] == decoder.target_text(c) for c in stored)
    assert exact >= 0.9 * len(stored), f"only {exact}/{len(stored)} reproduced"


@pytest.mark.slow
def test_paired_training_captions_real_photographs(tiny_clip_dir, overfit_lm, tmp_path):
    """ClipCap's setting: 20 real photographs with their first human caption, encoded once by
    embed-images, trained through the CLI, captioned from the images themselves (vd)."""
    rows = manifest_rows(20)
    images = shared_path("data", "coco", "images")
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({**r, "references": r["references"][:1]}) + "\n" for r in rows))
    ragcap("embed-images", refs, "--images", images, "-o", tmp_path / "features.parquet", "-m", tiny_clip_dir)
    trained = json.loads(ragcap("train-clipcap", "--features", tmp_path / "features.parquet", "-o", tmp_path / "clipcap", "--lm", overfit_lm,
                                "--epochs", "120", "--batch-size", "5", *OVERFIT).stdout)
    assert trained["captions"] == trained["paired"] == 20

    paths = [images / r["file"] for r in rows]
    result = ragcap("caption", *paths, "--mode", "vd", "--decoder", tmp_path / "clipcap", "-m", tiny_clip_dir, "--json")
    generated = {os.path.basename(line["file"]): line["caption"] for line in map(json.loads, result.stdout.splitlines())}
    decoder = load_decoder(tmp_path / "clipcap")
    exact = sum(generated[r["file"]] == decoder.target_text(r["references"][0]) for r in rows)
    assert exact >= 18, f"only {exact}/20 reproduced"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_clip_dir):
    """A tiny LM, features of 6 real photographs, and a collection of other images' captions."""
    root = tmp_path_factory.mktemp("tiny")
    rows = manifest_rows(12)
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    images = shared_path("data", "coco", "images")
    ragcap("embed-images", refs, "--images", images, "-o", root / "features.parquet", "-m", tiny_clip_dir)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": c, "image": r["image_id"]}) + "\n" for r in rows[6:] for c in r["references"]))
    return {"root": root, "lm": random_lm(root / "lm", width=32), "refs": refs, "images": images, "rows": rows[:6],
            "features": root / "features.parquet", "corpus": corpus}


def ingest_corpus(tiny, clip, collection="others"):
    ragcap("ingest", "jsonl", tiny["corpus"], "-c", collection, "-m", clip, "--text-field", "text", "--id-field", "image")
    return collection


def test_killed_training_resumes_to_the_same_weights(tiny, tiny_clip_dir, tmp_path, ragcap_home):
    """SIGKILL a real `ragcap train-clipcap` (transformer mapping, frozen LM, paired and noisy text
    data together) after its first checkpoint; --resume ends with the weights of a straight run."""
    ingest_corpus(tiny, tiny_clip_dir)
    args = ["train-clipcap", "--features", tiny["features"], "-c", "others", "--lm", tiny["lm"], "--mapping", "transformer",
            "--prefix-length", "4", "--clip-length", "3", "--mapping-layers", "2", "--noise", "0.016", "--epochs", "6",
            "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--val-fraction", "0.2", "--json"]
    killed = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "ragcap.cli", *map(str, args), "-o", str(killed)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and child.poll() is None and not (killed / "train_log.jsonl").exists():
        time.sleep(0.02)
    assert child.poll() is None, "the training ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    epochs_done = len((killed / "train_log.jsonl").read_text().splitlines())
    assert epochs_done < 6 and not (killed / "config.json").exists()

    resumed = json.loads(ragcap(*args, "-o", killed, "--resume", "--keep-checkpoint").stdout)
    straight = json.loads(ragcap(*args, "-o", tmp_path / "straight").stdout)
    assert not (tmp_path / "straight" / "checkpoint.pt").exists()  # removed once the run completed
    assert resumed["epochs"] == straight["epochs"] and all(row["val_loss"] is not None for row in straight["epochs"])
    a, b = load_decoder(killed).state_dict(), load_decoder(tmp_path / "straight").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Frozen LM: the checkpoint holds the mapping network only.
    saved = torch.load(killed / "checkpoint.pt", weights_only=True)["model"]
    assert saved and all(name.startswith("mapping.") for name in saved)


def test_inputs_of_another_embedder_and_bad_options_are_refused(tiny, tiny_clip_dir, tmp_path):
    from tests.helpers import make_tiny_clip

    other = make_tiny_clip(tmp_path / "other-clip", seed=7)
    ingest_corpus(tiny, other, "other-embedder")
    result = ragcap("train-clipcap", "--features", tiny["features"], "-c", "other-embedder", "-o", tmp_path / "x", "--lm", tiny["lm"], ok=False)
    assert result.exit_code == 1
    assert f"holds features of local:{tiny_clip_dir.resolve()}" in result.output and f"local:{other.resolve()}" in result.output

    common = ["--lm", tiny["lm"], "--epochs", "1", "--batch-size", "8", "--val-fraction", "0"]
    ragcap("train-clipcap", "--features", tiny["features"], "-o", tmp_path / "run", "--keep-checkpoint", *common)
    result = ragcap("train-clipcap", "-c", "other-embedder", "-o", tmp_path / "run", "--resume", *common, ok=False)
    assert result.exit_code == 1 and "was trained on vectors of" in result.output

    checks = [
        (["-o", tmp_path / "y"], "nothing to train on"),
        (["-c", "other-embedder", "--parquet", tiny["features"], "-o", tmp_path / "y"], "at most one of --collection"),
        (["--features", tiny["features"], "--noise", "-1", "-o", tmp_path / "y"], "--noise is a variance"),
        (["--features", tiny["features"], "--mapping", "lstm", "-o", tmp_path / "y"], "unknown ClipCap mapping 'lstm'"),
        (["--features", tiny["corpus"], "-o", tmp_path / "y"], "is not a features file"),
        (["--features", tiny["features"], "-o", tmp_path / "run"], "already holds a decoder"),
    ]
    for args, message in checks:
        result = ragcap("train-clipcap", *args, "--lm", tiny["lm"], ok=False)
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output


def test_held_out_split_keeps_an_images_captions_together():
    groups = [f"image:{i // 5}" for i in range(50)] + [f"text:{i}" for i in range(10)]
    train, held_out = _split(len(groups), 0.2, seed=3, groups=groups)
    assert len(held_out) and sorted(np.concatenate([train, held_out]).tolist()) == list(range(60))
    assert not {groups[i] for i in train} & {groups[i] for i in held_out}


# ---------------------------------------------------------------------------- decoding options

SAMPLING = [["--top-k", "5", "--seed", "3"], ["--top-p", "0.9", "--seed", "3"], ["--temperature", "1.5", "--seed", "3"]]
OPTIONS = [[], ["--beam", "3"], ["--max-tokens", "4"], *SAMPLING]


@pytest.fixture(scope="module")
def decoders(tiny, tiny_clip_dir):
    """A random decoder of each kind for the tiny CLIP (their captions are noise; the options are not)."""
    from ragcap.decoders import ClipCapConfig, ClipCapDecoder, DeCapConfig, DeCapDecoder
    from ragcap.decoders.lm import load_causal_lm
    from ragcap.embed import load_embedder

    info = load_embedder(str(tiny_clip_dir)).info
    torch.manual_seed(0)
    DeCapDecoder(DeCapConfig(embed_dim=info.dim, n_layer=1, n_head=2, n_embd=32, max_tokens=10), info).save(tiny["root"] / "decap")
    tokenizer, lm = load_causal_lm(tiny["lm"])
    ClipCapDecoder(ClipCapConfig(embed_dim=info.dim, prefix_length=4, max_tokens=10), info, lm, tokenizer).save(tiny["root"] / "clipcap")
    return {"decap": tiny["root"] / "decap", "clipcap": tiny["root"] / "clipcap"}


def captions_by_image(result, key="file") -> dict:
    out: dict = {}
    for line in map(json.loads, result.stdout.splitlines()):
        out.setdefault(os.path.basename(line[key]), {})[line["mode"]] = line.get("captions") or line["caption"]
    return out


@pytest.mark.parametrize("kind", ["decap", "clipcap"])
def test_every_decoding_option_through_caption_and_eval(kind, decoders, tiny, tiny_clip_dir):
    collection = ingest_corpus(tiny, tiny_clip_dir)
    paths = [tiny["images"] / r["file"] for r in tiny["rows"][:3]]
    common = ["-c", collection, "--mode", "pd,nnd,vd", "--decoder", decoders[kind], "--k", "8"]
    caption = lambda *o: captions_by_image(ragcap("caption", *paths, *common, "--json", *o))  # noqa: E731
    by_option = {tuple(o): caption(*o) for o in OPTIONS}
    assert all(len(found) == 3 and all(len(modes) == 3 for modes in found.values()) for found in by_option.values())
    for option in SAMPLING:
        assert caption(*option) == by_option[tuple(option)]  # seeded: the same captions again
    assert by_option[("--top-k", "5", "--seed", "3")] != caption("--top-k", "5", "--seed", "4")
    assert all(len(c.split()) <= 4 for modes in by_option[("--max-tokens", "4")].values() for c in modes.values())

    best = caption("--num-captions", "3", "--beam", "3")
    for image, modes in best.items():
        for mode, alternatives in modes.items():
            assert len(alternatives) == 3 and alternatives[0]["caption"] == by_option[("--beam", "3")][image][mode]
            assert [a["score"] for a in alternatives] == sorted((a["score"] for a in alternatives), reverse=True)

    refs = tiny["root"] / "eval-refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in tiny["rows"][:3]))
    images = tiny["root"] / "eval-images"
    images.mkdir(exist_ok=True)
    for path in paths:
        (images / path.name).write_bytes(path.read_bytes())
    # eval decodes as caption does, given the same modes (a seed fixes the samples of a batch)
    # and options. One mode: each scored mode costs seconds of Java.
    eval_args = ["-c", collection, "--mode", "vd", "--decoder", decoders[kind], "--json"]
    files = {str(r["image_id"]): r["file"] for r in tiny["rows"]}
    every_option = (["--beam", "3", "--max-tokens", "6"], ["--top-k", "5", "--top-p", "0.9", "--temperature", "1.5", "--seed", "3", "--max-tokens", "6"])
    for option in every_option:
        report = json.loads(ragcap("eval", refs, "--images", images, *eval_args, "--no-spice", *option).stdout)
        assert set(report["scores"]) == {"vd"} and report["images_scored"] == 3
        captioned = captions_by_image(ragcap("caption", *paths, *eval_args, *option))
        assert {files[key]: modes for key, modes in report["captions"].items()} == captioned


def test_noise_that_is_not_a_number_is_refused_as_a_variance(tmp_path):
    result = ragcap("train-clipcap", "-c", "nothing", "-o", tmp_path / "out", "--noise", "nan", ok=False)
    assert result.exit_code == 1 and "--noise is a variance and must be >= 0, got nan" in result.output
    assert not (tmp_path / "out").exists()
