"""Shared fixtures: an isolated RAGCAP_HOME, a tiny CLIP on disk, and the real data in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test may reach for a hub: everything is made locally or read from ../shared.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or a skip saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path.name} (expected under ../shared/{'/'.join(parts)})")
    return path


@pytest.fixture(autouse=True)
def ragcap_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own embedded store and never touches the user's."""
    home = tmp_path_factory.mktemp("ragcap_home")
    monkeypatch.setenv("RAGCAP_HOME", str(home))
    monkeypatch.delenv("RAGCAP_QDRANT_URL", raising=False)
    monkeypatch.delenv("RAGCAP_QDRANT_API_KEY", raising=False)
    for setting in ("RAGCAP_CONFIG", "RAGCAP_MODEL", "RAGCAP_DEVICE", "RAGCAP_PRECISION"):  # and the config file is under the new home
        monkeypatch.delenv(setting, raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP saved like a real local checkpoint."""
    from tests.helpers import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def pytest_configure(config):
    """Tests marked xdist_group run in one worker (`-n 2` alone would spread them): the Ray
    tests share one local cluster, which two workers would each start."""
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadgroup"
