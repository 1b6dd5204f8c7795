"""What taking turns costs: opening a collection of the embedded store that nobody holds, vs
getting it handed over by another process that holds it open between its operations.

Random L2-normalised vectors (the default 200,000 x 512-d float16, as benchmarks/store.py).
The handover time is the holder noticing the waiter (it looks every 0.1 s), closing the
collection, and this process opening it.

    python benchmarks/handover.py                 # 200,000 points
    python benchmarks/handover.py --n 20000 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ragcap.embedder_info import EmbedderInfo  # noqa: E402
from ragcap.store import point_id  # noqa: E402
from ragcap.store.edge import EdgeStore  # noqa: E402

HOLDER = """
import sys, time
from ragcap.store.edge import EdgeStore
store = EdgeStore(sys.argv[1])
store.count("bench")  # opens it, and keeps it open between operations
print("holding", flush=True)
while True:
    time.sleep(0.5)
    store.count("bench")  # an operation now and then: it takes the collection back each time
"""


def build(root: Path, n: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    with EdgeStore(root) as store:
        store.create("bench", EmbedderInfo("random", dim))
        for start in range(0, n, 10_000):
            count = min(10_000, n - start)
            vectors = rng.standard_normal((count, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            captions = [f"caption {i}" for i in range(start, start + count)]
            store.upsert("bench", [point_id("bench", c) for c in captions], vectors, [{"caption": c} for c in captions])
        store.optimize("bench")


def timed_open(root: Path) -> float:
    start = time.perf_counter()
    with EdgeStore(root, wait=120) as store:
        store.count("bench")
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.n, args.dim)
        free = [timed_open(root) for _ in range(args.repeats)]
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            holder.stdout.readline()
            handed = []
            for _ in range(args.repeats):
                time.sleep(1.0)  # the holder takes it back with its next operation
                handed.append(timed_open(root))
        finally:
            holder.kill()
            holder.wait()
    result = {
        "n": args.n,
        "dim": args.dim,
        "open_free_s": statistics.median(free),
        "open_handed_over_s": statistics.median(handed),
        "ratio": statistics.median(handed) / statistics.median(free),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.n} x {args.dim}-d: open {result['open_free_s']:.2f} s when free, "
              f"{result['open_handed_over_s']:.2f} s when handed over ({result['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
