"""The config file: flag > environment variable > file > built-in default, and clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from ragcap.api import DEFAULT_MODEL, default_model
from ragcap.cli import app
from ragcap.config import setting
from ragcap.errors import ConfigError
from ragcap.util import default_device

runner = CliRunner()


def ragcap(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def config_file(ragcap_home):
    return ragcap_home / "config.toml"


def test_each_setting_comes_from_the_env_then_the_file_then_the_built_in_default(config_file, monkeypatch):
    assert default_model() == DEFAULT_MODEL and setting("qdrant_url") == (None, "built-in")
    config_file.write_text('model = "/models/clip"\nqdrant_url = "http://qdrant:6333"\ndevice = "meta"\n')
    assert default_model() == "/models/clip"
    assert setting("qdrant_url") == ("http://qdrant:6333", str(config_file))
    assert default_device() == torch.device("meta") and default_device("cpu") == torch.device("cpu")  # an argument wins
    monkeypatch.setenv("RAGCAP_MODEL", "ViT-L-14:openai")
    monkeypatch.setenv("RAGCAP_DEVICE", "cpu")
    assert default_model() == "ViT-L-14:openai" and setting("model")[1] == "RAGCAP_MODEL"
    assert default_device() == torch.device("cpu")


def test_ragcap_config_names_another_file(tmp_path, config_file, monkeypatch):
    config_file.write_text('model = "home"\n')
    other = tmp_path / "team.toml"
    other.write_text('model = "team"\n')
    monkeypatch.setenv("RAGCAP_CONFIG", str(other))
    assert setting("model") == ("team", str(other))
    monkeypatch.setenv("RAGCAP_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="RAGCAP_CONFIG names .*missing.toml, which does not exist"):
        default_model()


def test_the_flag_wins_over_the_file(config_file, tmp_path, tiny_clip_dir):
    config_file.write_text(f'model = "{tmp_path / "no-such-model"}"\n')
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a dog runs\na cat sleeps\n")
    result = ragcap("ingest", "text", corpus, "-c", "flag", "-m", tiny_clip_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["embedder"].startswith("local:")
    result = ragcap("ingest", "text", corpus, "-c", "from-file")  # the file's model: a missing directory
    assert result.exit_code == 1 and "no-such-model" in result.output


@pytest.mark.parametrize(("text", "message"), [
    ('model = "a"\ndevice = "cpu\n', "not valid TOML: .*line 2"),
    ('model = "a"\n\nmodle = "b"\n', "line 3: unknown key 'modle'; the keys are model, qdrant_url, qdrant_api_key, device"),
    ('device = 0\n', "line 1: device must be a non-empty string"),
    ('model = "a"\n[store]\nurl = "x"\n', "line 2: unknown key 'store'"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_line(config_file, text, message):
    config_file.write_text(text)
    result = ragcap("collections")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith(f"ragcap: error: {config_file}: ")
    assert re.search(message, result.output), result.output


def test_doctor_shows_the_file_in_effect_and_its_values(config_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert f"config        {config_file} (none: built-in defaults)" in ragcap("doctor").stdout
    config_file.write_text('model = "/models/clip"\nqdrant_api_key = "secret"\ndevice = "cpu"\n')
    text = ragcap("doctor")
    assert text.exit_code == 0, text.output
    assert f"config        {config_file}: model = /models/clip, qdrant_api_key = (set), device = cpu" in text.stdout
    assert f"default model /models/clip (from {config_file})" in text.stdout and "secret" not in text.stdout
    report = json.loads(ragcap("doctor", "--json").stdout)
    assert report["config"] == {"file": str(config_file), "exists": True,
                                "values": {"model": "/models/clip", "qdrant_api_key": "(set)", "device": "cpu"}}
    assert {k: report["default_model"][k] for k in ("spec", "from")} == {"spec": "/models/clip", "from": str(config_file)}
    assert "'/models/clip': neither an existing directory" in report["default_model"]["problem"]  # not on this machine

    config_file.write_text('precision = "bf16"\n')
    assert ", precision bf16, " in ragcap("doctor").stdout
    monkeypatch.setenv("RAGCAP_PRECISION", "half")  # reported, and the rest of the checks still run
    text = ragcap("doctor")
    assert text.exit_code == 0 and "precision unusable (RAGCAP_PRECISION: unknown precision 'half'" in text.stdout
    # Issue row: a bad RAGCAP_DEVICE crashed doctor, and other commands blamed the model.
    monkeypatch.setenv("RAGCAP_DEVICE", "bogus")
    report = json.loads(ragcap("doctor", "--json").stdout)
    assert report["torch"]["default_device"] == "unusable (RAGCAP_DEVICE: 'bogus' is not a torch device; use cpu, cuda or cuda:N)"
    from ragcap.errors import OptionError
    from ragcap.util import default_device

    with pytest.raises(OptionError, match="RAGCAP_DEVICE: 'bogus' is not a torch device"):
        default_device()
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="--device: cuda:3 asked for, but torch sees no CUDA GPU here"):
            default_device("cuda:3")
