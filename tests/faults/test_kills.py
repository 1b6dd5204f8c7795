"""Processes killed (kill -9) at chosen points and at random moments: nothing half-made remains."""

from __future__ import annotations

import random
import signal
import time

from tests.faults.conftest import python, start, wait_for

TINY = "from ragcap.embedder_info import EmbedderInfo\nTINY = EmbedderInfo('tiny', 8)\n"

STOPPED_CREATE = TINY + """
import sys
from tests.faults.stopper import stop_at
from ragcap.store import open_store
stop_at(sys.argv[1], "os:rename:.creating-")
open_store().create("made", TINY)
"""

STOPPED_DROP = TINY + """
import sys
from tests.faults.stopper import stop_at
from ragcap.store import open_store
store = open_store()
store.create("made", TINY)
stop_at(sys.argv[1], "shutil:rmtree:.dropping-")
store.drop("made")
"""


def kill_at_marker(code: str, marker) -> None:
    process = start("-c", code, marker)
    wait_for(marker.exists, "the process reached the chosen point", process=process)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_create_killed_before_the_collection_appears_leaves_nothing_visible(tmp_path, ragcap_home):
    from ragcap.embedder_info import EmbedderInfo
    from ragcap.store import open_store
    from ragcap.store.edge import RECORD

    kill_at_marker(STOPPED_CREATE, tmp_path / "stopped")
    collections = ragcap_home / "collections"
    [staged] = [p.name for p in collections.iterdir() if p.is_dir()]
    assert staged.startswith(".made.creating-")  # hidden: no listing or lookup sees it
    with open_store(wait=0) as store:  # the killed creator's lock died with it
        assert store.collections() == [] and not store.exists("made")
        store.create("made", EmbedderInfo("tiny", 8))
        assert (collections / "made" / RECORD).is_file()
    assert not [p for p in collections.iterdir() if ".creating-" in p.name]


def test_drop_killed_midway_leaves_the_collection_gone_and_reusable(tmp_path, ragcap_home):
    from ragcap.embedder_info import EmbedderInfo
    from ragcap.store import open_store

    kill_at_marker(STOPPED_DROP, tmp_path / "stopped")
    collections = ragcap_home / "collections"
    assert [p.name for p in collections.iterdir() if p.is_dir() and not p.name.startswith(".")] == []
    with open_store(wait=0) as store:
        assert store.collections() == []
        store.create("made", EmbedderInfo("tiny", 8))
        assert store.count("made") == 0
    assert not [p for p in collections.iterdir() if ".dropping-" in p.name]


WRITER = TINY + """
import sys
import numpy as np
from ragcap.store import open_store, point_id
name = sys.argv[1]
store = open_store()
store.create(name, TINY)
rng = np.random.default_rng(0)
for batch in range(100_000):
    captions = [f"batch {batch} caption {i}" for i in range(100)]
    vectors = rng.standard_normal((100, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.upsert(name, [point_id(name, c) for c in captions], vectors, [{"caption": c} for c in captions])
    print(batch, flush=True)
"""


def test_writers_killed_at_random_moments_leave_consistent_collections(ragcap_home):
    """kill -9 while batches stream in: each reopens (checked first in a child process), holds
    whole batches only, at least every acknowledged one, and passes `check`."""
    from ragcap.store import open_store

    rng = random.Random(0)
    for trial in range(6):
        name = f"killed{trial}"
        writer = start("-c", WRITER, name)
        acknowledged = int(writer.stdout.readline())  # the first batch is in
        time.sleep(rng.uniform(0.0, 0.4))
        writer.send_signal(signal.SIGKILL)
        out, _ = writer.communicate()
        acknowledged = max([acknowledged, *map(int, out.split())]) + 1
        with open_store(wait=0) as store:
            points = store.count(name)
            assert points % 100 == 0 and points >= 100 * acknowledged, (trial, points, acknowledged)
            report = store.check(name)
            assert report.ok, report.problems
        assert not list((ragcap_home / "collections" / name).glob(".*.tmp"))


def test_a_killed_holder_frees_its_collection_at_once(tmp_path):
    code = TINY + "import sys, time\nfrom ragcap.store import open_store\ns = open_store()\ns.create('held', TINY)\n" \
                  "with s._use('held', 'holding'):\n    open(sys.argv[1], 'w').close()\n    time.sleep(600)\n"
    kill_at_marker(code, tmp_path / "holding")
    done = python("from ragcap.store import open_store\nprint(open_store(wait=0).count('held'))")
    assert done.returncode == 0 and done.stdout.strip() == "0", done.stderr
