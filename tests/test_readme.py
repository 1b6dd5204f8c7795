"""README.md's command blocks, run as written: the quick start must keep working offline.

Blocks marked `<!-- readme-test: NAME -->` run in order, in one bash -euo pipefail, in one fresh
directory holding only `examples/` and `.venv` (the interpreter running the tests) from the
repository, offline (HF_HUB_OFFLINE=1) and with a store of their own. Nothing in the text is
rewritten: a command that stops working fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKED_BLOCK = re.compile(r"<!-- readme-test: (\S+) -->\n```bash\n(.*?)```", re.S)


def readme_blocks() -> dict[str, str]:
    return dict(MARKED_BLOCK.findall(README.read_text(encoding="utf-8")))


def test_readme_opens_with_the_setup_and_test_commands_ci_runs():
    first = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1).strip().splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert len(first) == 2 and first[1] in ci.splitlines()


@pytest.mark.slow
def test_quick_start_and_the_blocks_after_it_run_as_written(tmp_path):
    blocks = readme_blocks()
    assert list(blocks) == ["quickstart", "errors", "reingest", "export", "eval", "shards"], "the README's tested blocks changed: update this test"
    if sys.prefix == sys.base_prefix:
        pytest.skip("the quick start sources .venv/bin/activate; run the tests from a virtual environment")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGCAP_")}
    env.update(RAGCAP_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    # One shell, as a reader types the blocks one after the other (the venv stays activated).
    script = "".join(f"echo '### {name}'\n{block}" for name, block in blocks.items())
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"a README block failed (ran: {run.stdout.split('### ')[-1][:40]!r}):\n{run.stderr[-3000:]}"
    out = dict(part.split("\n", 1) for part in run.stdout.split("### ")[1:])
    assert "deprecat" not in run.stderr.lower()  # ragcap's own calls use the libraries' current APIs

    stored = set((ROOT / "examples" / "quickstart" / "captions.txt").read_text().splitlines())
    images = sorted(p.name for p in (ROOT / "examples" / "quickstart" / "images").iterdir())
    captioned = re.findall(r"^\S*/(\S+)\n  pd +(.+)\n  clipre +(.+)$", out["quickstart"], re.M)
    assert sorted(name for name, _, _ in captioned) == images
    assert all(pd.strip() and clipre in stored for _, pd, clipre in captioned)  # clipre returns a stored caption
    assert not (tmp_path / "decoders" / "quickstart" / "checkpoint.pt").exists()  # removed after the run
    found = re.findall(r"^(\d\.\d{4})  (.+)$", out["quickstart"], re.M)  # search: the 3 nearest, best first
    assert len(found) == 3 and all(caption in stored for _, caption in found) and found == sorted(found, reverse=True)
    assert re.search(r"train-decoder: expected ~.+ per epoch \(2 steps\), ~.+ for 2 epochs", run.stderr)
    # Bad input: one line each, exit status 1, and nothing created.
    assert out["errors"].split() == ["exit", "status", "1"] * 2
    assert "ragcap: error: examples/quickstart/captoins.txt: no such file or directory\n" in run.stderr
    assert "ragcap: error: mode pd needs a trained decoder: pass --decoder DIR (make one with `ragcap train-decoder`)\n" in run.stderr
    # Ingesting the same corpus again stores nothing twice.
    again = json.loads(out["reingest"])
    assert (again["read"], again["stored"], again["already_stored"], again["points"]) == (len(stored), 0, len(stored), len(stored))
    # The export loads back without a model and without naming the caption column.
    assert re.search(rf"quickstart-copy: read {len(stored)}, stored {len(stored)}\b", out["export"])
    assert re.search(rf"^quickstart-copy +{len(stored)} +local:", out["export"], re.M)
    assert not re.search(r"^typo ", out["export"], re.M)
    # eval of a subset: each mode scored, the missing images named, exit status 0 with --allow-missing.
    assert re.search(r"^pd +\d", out["eval"], re.M) and re.search(r"^clipre +\d", out["eval"], re.M)
    assert "ragcap: 2 referenced images are not in some-images (e.g. brown-box, yellow-sun); scored the rest" in run.stderr
    # Two shards: disjoint halves that together hold every caption once.
    halves = [int(n) for n in re.findall(r"^sharded: read \d+, stored (\d+),", out["shards"], re.M)]
    assert len(halves) == 2 and all(halves) and sum(halves) == len(stored)
    assert f"sharded: ok ({len(stored)} points)" in out["shards"]
