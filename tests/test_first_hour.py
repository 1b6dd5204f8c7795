"""What a first-time user meets: CLI conventions, inputs checked before any model loads, the hub
failing fast offline, portable local models, the default embedder, training feedback, doctor."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.embedder_info import EmbedderInfo

runner = CliRunner()
CAPTIONS = [f"a {c} {a} in the {p}" for c in ("dog", "cat", "bird") for a in ("sits", "runs", "sleeps") for p in ("park", "house")]


def ragcap(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n")
    return path


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the error must come first."""
    import ragcap.embed

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(ragcap.embed, "_load_open_clip", refuse)
    monkeypatch.setattr(ragcap.embed, "_load_sentence_transformer", refuse)


@pytest.fixture
def offline_hub(monkeypatch):
    """A hub that cannot be reached: decided afresh, and the hub libraries' offline switch restored after."""
    from huggingface_hub import constants

    from ragcap.hub import hub_reachable

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()


# ---------------------------------------------------------------------------- CLI conventions


def test_short_help_version_and_defaults_in_help():
    from ragcap import __version__

    assert ragcap("--version").stdout.strip() == f"ragcap {__version__}"
    short, long = ragcap("train-decoder", "-h"), ragcap("train-decoder", "--help")
    assert short.exit_code == 0 and short.stdout == long.stdout
    assert "<bool>" not in long.stdout and "--preset" in long.stdout
    for shown in ("decap 10, small 2", "decap 64, small 128", "decap 3e-4, small 1e-3", "[default: decap]"):
        assert shown in " ".join(long.stdout.split()), shown
    assert "Exit status" in ragcap("-h").stdout


def _command_paths(command, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_help_names_values_instead_of_typer_types():
    import typer

    paths = list(_command_paths(typer.main.get_command(app)))
    assert ("models", "import") in paths and len(paths) > 15
    helps = {}
    for path in paths:
        result = ragcap(*path, "--help")
        assert result.exit_code == 0, path
        helps[path] = " ".join(result.stdout.split())
        for noise in ("<str>", "<int>", "<float>", "<path>", "<bool>", "<list", "<Path"):
            assert noise not in result.stdout, (path, noise)
    for path, shown in (
        (("train-decoder",), "--layers LAYERS"), (("train-decoder",), "-o, --out DIR"), (("train-decoder",), "--parquet FILE"),
        (("train-decoder",), "--wait SECONDS"), (("ingest",), "--qdrant-url QDRANT_URL"), (("ingest",), "{SOURCE} [PATHS]..."),
        (("ingest",), "PATHS... Files"), (("caption",), "-c, --collection COLLECTION"), (("caption",), "--decoder DIR"),
    ):
        assert shown in helps[path], (path, shown)


def test_help_shows_the_choices_the_commands_accept():
    from ragcap.caption import MEMORY_SEARCHES
    from ragcap.decoders.clipcap import MAPPINGS
    from ragcap.report import CAPTION_FORMATS
    from ragcap.store import VECTOR_DTYPES
    from ragcap.train import PRESETS

    def shown(*args):
        return ragcap(*args, "--help").stdout

    assert f"--preset [{'|'.join(PRESETS)}]" in shown("train-decoder")
    assert f"--mapping [{'|'.join(MAPPINGS)}]" in shown("train-clipcap") and f"--mapping [{'|'.join(MAPPINGS)}]" in shown("models", "import")
    assert f"--format [{'|'.join(CAPTION_FORMATS)}]" in shown("caption")
    assert f"--memory [{'|'.join(MEMORY_SEARCHES)}]" in shown("caption")
    assert f"--vector-dtype [{'|'.join(VECTOR_DTYPES)}]" in shown("ingest")


def test_embed_images_help_names_its_own_default_model():
    """Issue row: embed-images, which takes no collection, said -m defaults to "the collection's"."""
    text = " ".join(ragcap("embed-images", "--help").stdout.split())
    assert "the collection's" not in text and "the one --out records" in text and "$RAGCAP_MODEL" in text


# ---------------------------------------------------------------------------- fail fast


def test_a_missing_corpus_file_is_reported_before_the_model_loads(tmp_path, tiny_clip_dir, no_model_loads):
    result = ragcap("ingest", "text", tmp_path / "captions_train2017.jsn", "-c", "typo", "-m", tiny_clip_dir)
    assert result.exit_code == 1 and "captions_train2017.jsn: no such file" in result.output


def test_an_empty_corpus_is_an_error_without_loading_the_model(tmp_path, tiny_clip_dir, no_model_loads):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = ragcap("ingest", "text", empty, "-c", "empty", "-m", tiny_clip_dir)
    assert result.exit_code == 1 and "nothing to ingest" in result.output and "is it empty?" in result.output
    assert "--source" not in result.output  # no flag that does not exist
    assert "empty" not in ragcap("collections").stdout.split()


def test_hub_names_fail_in_seconds_offline_naming_the_offline_way(corpus, offline_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    started = time.monotonic()
    result = ragcap("ingest", "text", corpus, "-c", "hub", "-m", "ViT-B-32:openai")
    assert result.exit_code == 1
    assert "127.0.0.1 cannot be reached" in result.output and "ragcap models save-random ViT-B-32 DIR" in result.output
    assert time.monotonic() - started < 60  # no download retries (they took 72 s)


def test_offline_by_setting_too(corpus, offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = ragcap("ingest", "text", corpus, "-c", "hub", "-m", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert result.exit_code == 1 and "HF_HUB_OFFLINE is set" in result.output and "--model DIR" in result.output


@pytest.fixture
def memory(corpus, tiny_clip_dir):
    result = ragcap("ingest", "text", corpus, "-c", "mem", "-m", tiny_clip_dir)
    assert result.exit_code == 0, result.output
    return "mem"


def test_every_mode_resource_is_checked_before_the_first_model_load(memory, tmp_path, offline_hub, monkeypatch, no_model_loads):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    out = tmp_path / "out.jsonl"
    missing_lm = ragcap("caption", image, "-c", memory, "--mode", "clipre,prompt", "--lm", "gpt2", "-o", out)
    assert missing_lm.exit_code == 1 and "ragcap models save-random-lm" in missing_lm.output
    assert not out.exists() and not (tmp_path / "out.jsonl.partial").exists()  # nothing half-written
    no_decoder = ragcap("caption", image, "-c", memory, "--mode", "pd")
    assert no_decoder.exit_code == 1 and "--decoder DIR" in no_decoder.output
    bad_decoder = ragcap("caption", image, "-c", memory, "--mode", "pd", "--decoder", tmp_path)
    assert bad_decoder.exit_code == 1 and "is not a trained decoder" in bad_decoder.output


def test_captioning_an_empty_folder_is_an_error(memory, tmp_path, no_model_loads):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    result = ragcap("caption", tmp_path / "photos", "-c", memory, "--mode", "clipre")
    assert result.exit_code == 1 and "no images in this folder" in result.output
    result = ragcap("caption", str(tmp_path / "photos" / "*.jpg"), "-c", memory, "--mode", "clipre")
    assert result.exit_code == 1 and "no file matches" in result.output


# ---------------------------------------------------------------------------- portable collections


def test_a_moved_model_keeps_its_collections_and_a_changed_one_is_refused(corpus, tmp_path, monkeypatch):
    from tests.helpers import make_tiny_clip

    original = make_tiny_clip(tmp_path / "clip", seed=3)
    assert ragcap("ingest", "text", corpus, "-c", "portable", "-m", original).exit_code == 0
    moved = tmp_path / "elsewhere" / "clip"
    shutil.copytree(original, moved)
    shutil.rmtree(original)

    gone = ragcap("search", "a dog", "-c", "portable", "--k", "1")
    assert gone.exit_code == 1 and "not there any more" in gone.output and "--model DIR" in gone.output
    found = ragcap("search", "a dog", "-c", "portable", "--k", "1", "-m", moved)
    assert found.exit_code == 0 and found.stdout.split("  ", 1)[1].strip() in CAPTIONS
    monkeypatch.setenv("RAGCAP_MODEL", str(moved))
    assert ragcap("search", "a dog", "-c", "portable", "--k", "1").exit_code == 0
    assert ragcap("ingest", "text", corpus, "-c", "portable").exit_code == 0  # adds to it with the moved model

    changed = make_tiny_clip(tmp_path / "changed", seed=4)  # same path layout, other weights
    refused = ragcap("search", "a dog", "-c", "portable", "-m", changed)
    assert refused.exit_code == 1 and "config or weights differ" in refused.output


def test_records_without_a_digest_still_match_by_spec():
    old = EmbedderInfo.from_dict({"spec": "local:/models/clip", "dim": 32})
    assert old.matches(EmbedderInfo("local:/models/clip", 32, digest="sha256:abc"))
    assert not old.matches(EmbedderInfo("local:/other/clip", 32, digest="sha256:abc"))
    moved = EmbedderInfo("local:/new/clip", 32, digest="sha256:abc")
    assert moved.matches(EmbedderInfo("local:/models/clip", 32, digest="sha256:abc"))
    assert not moved.matches(EmbedderInfo("local:/new/clip", 32, digest="sha256:def"))
    assert "digest" not in EmbedderInfo("ViT-B-32:openai", 512).to_dict()  # hub records unchanged


def test_ragcap_model_is_the_default_embedder_of_new_collections(corpus, tiny_clip_dir, monkeypatch):
    monkeypatch.setenv("RAGCAP_MODEL", str(tiny_clip_dir))
    result = ragcap("ingest", "text", corpus, "-c", "defaulted", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["embedder"] == f"local:{tiny_clip_dir.resolve()}"


def test_an_export_loads_back_without_naming_its_caption_column(memory, tmp_path, no_model_loads):
    out = tmp_path / "new" / "folder" / "mem.parquet"  # missing folders are made
    assert ragcap("export", memory, out).exit_code == 0
    result = ragcap("ingest", "parquet", out, "-c", "copy", "--vector-field", "vector", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stored"] == len(CAPTIONS)


# ---------------------------------------------------------------------------- training feedback


@pytest.mark.slow
def test_train_decoder_prints_its_pace_and_each_epoch_and_removes_the_checkpoint(memory, tmp_path):
    small = ["--preset", "small", "--epochs", "2", "--layers", "1", "--heads", "2", "--width", "32", "--batch-size", "4", "--device", "cpu"]
    result = ragcap("train-decoder", "-c", memory, "--out", tmp_path / "dec", *small)
    assert result.exit_code == 0, result.output
    assert "s per step, about" in result.stderr and "per epoch" in result.stderr
    expected = re.search(r"train-decoder: expected ~\d+ s per epoch \(\d+ steps\), ~\d+ s for 2 epochs", result.stderr)
    assert expected and expected.start() < result.stderr.index("epoch 1: training loss")  # before training
    for epoch in (1, 2):
        assert f"epoch {epoch}: training loss " in result.stderr
    assert "held-out loss" in result.stderr
    assert not (tmp_path / "dec" / "checkpoint.pt").exists() and (tmp_path / "dec" / "model.safetensors").exists()
    config = json.loads((tmp_path / "dec" / "config.json").read_text())["config"]
    assert (config["n_layer"], config["n_embd"]) == (1, 32)  # the flags override the preset

    kept = ragcap("train-decoder", "-c", memory, "--out", tmp_path / "kept", *small, "--epochs", "1", "--keep-checkpoint", "--json")
    assert kept.exit_code == 0 and (tmp_path / "kept" / "checkpoint.pt").exists()
    assert json.loads(kept.stdout)["expected_epoch_s"] > 0
    assert ragcap("train-decoder", "-c", memory, "--out", tmp_path / "x", "--preset", "huge").exit_code == 1


def test_presets():
    from ragcap.errors import ModelError
    from ragcap.train import TrainConfig, preset

    assert preset("decap") == TrainConfig()
    small = preset("small")
    assert (small.n_layer, small.n_embd, small.epochs) == (2, 256, 2)
    with pytest.raises(ModelError, match="decap, small"):
        preset("tiny")


# ---------------------------------------------------------------------------- doctor


def test_doctor_reports_the_machine_and_the_store(memory, offline_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = ragcap("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    import torch

    assert report["packages"]["torch"] == torch.__version__.split("+")[0]
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert report["hub"] == {"host": "huggingface.co", "reachable": False, "why_not": "HF_HUB_OFFLINE is set"}
    assert report["store"]["kind"] == "embedded" and report["store"]["free_gb"] > 0
    assert {"name": "mem", "points": len(CAPTIONS), "status": "ok"} in report["store"]["collections"]
    assert (report["java"]["path"] is None) == (shutil.which("java") is None)
    text = ragcap("doctor")
    assert text.exit_code == 0 and "1 collections" in text.stdout and "offline (HF_HUB_OFFLINE is set)" in text.stdout


def test_doctor_warns_when_the_default_model_cannot_be_used(tiny_clip_dir, tmp_path, offline_hub, monkeypatch):
    """RAGCAP_MODEL with a typo or without weights, or the built-in default offline, used to pass
    doctor unremarked and fail at the first ingest."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RAGCAP_MODEL", str(tmp_path / "clip-randm"))
    report = json.loads(ragcap("doctor", "--json").stdout)
    assert report["default_model"]["from"] == "RAGCAP_MODEL" and "clip-randm" in report["default_model"]["problem"]
    assert any(w.startswith("the default model (from RAGCAP_MODEL) cannot be used: ") for w in report["warnings"])
    assert not any("no model is cached" in w for w in report["warnings"])  # one warning for one problem
    (tmp_path / "half").mkdir()
    shutil.copy(tiny_clip_dir / "open_clip_config.json", tmp_path / "half")
    monkeypatch.setenv("RAGCAP_MODEL", str(tmp_path / "half"))
    assert "no weights" in json.loads(ragcap("doctor", "--json").stdout)["default_model"]["problem"]
    monkeypatch.setenv("RAGCAP_MODEL", str(tiny_clip_dir))  # a usable local model: offline is no problem
    report = json.loads(ragcap("doctor", "--json").stdout)
    assert report["default_model"]["problem"] is None
    assert not any("default model" in w or "no model is cached" in w for w in report["warnings"])
