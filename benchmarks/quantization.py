"""What --quantization and --on-disk cost and save, on 200k-caption memories, with Qdrant's engine.

Two memories of COCO val2014 captions, leaving out the 1,000 evaluation images of
benchmarks/quality_text.py (seed 0) whose first captions are the queries:
  - minilm: the real all-MiniLM-L6-v2 text encoder (384-d), the one real encoder here;
  - clip:   CLIP-size random unit vectors (512-d), the worst case for every index (similarities
            bunch near 0), with random queries.
Each setting is a collection of the embedded store (Qdrant Edge: the engine a Qdrant server
runs, so the same codes and rescoring); float16 vectors as ragcap stores by default. For each:
recall@10 against exact float32 search, the pd projection over the top 1024 against DeCap's
exact whole-memory projection (cosine), query latency, build time, disk, and the resident
memory of a fresh process that opens the collection and searches it (anonymous memory must
stay in RAM; file-backed pages are the page cache's to drop).

What this cannot measure: a Qdrant server or cluster (none can be run here), so sharding,
replication and network costs are on paper only (docs/scale.md).

    python benchmarks/quantization.py --json                 # both memories, every setting
    python benchmarks/quantization.py --memories clip --n 20000 --queries 50   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BY_IMAGE = ROOT.parent / "shared" / "data" / "coco" / "captions_val2014_by_image.json"
SETTINGS = [(q, disk) for q in ("none", "int8", "binary", "turbo4") for disk in (False, True)]
SWEEP = {"int8": (1.0, 2.0, 4.0), "binary": (2.0, 4.0, 8.0, 16.0), "turbo4": (2.0, 4.0, 8.0)}
K_PROJECTION = 1024  # ragcap's default k for pd
PROJECTION_QUERIES = 200

RESIDENT = """
import json, sys, numpy as np
from pathlib import Path
from ragcap.store import open_store
def anon():
    fields = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines())
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}
queries = np.load(sys.argv[3])
before = anon()
with open_store(path=sys.argv[1]) as store:
    store.search(sys.argv[2], queries, 10)
    after = anon()
print(json.dumps({k: after[k] - before[k] for k in after}))
"""


def memories(names, n, n_queries, work: Path) -> dict:
    """name -> (captions, float32 unit vectors, query vectors)."""
    out = {}
    by_image = json.loads(BY_IMAGE.read_text())
    from quality_text import EMBEDDER, split_images  # the same held-out images as the quality benchmark

    eval_ids, memory_ids = split_images(by_image, 1000, None, 0)
    seen, captions = set(), []
    for image in memory_ids:
        for caption in by_image[image]:
            text = " ".join(caption.split())
            if text and text not in seen:
                seen.add(text)
                captions.append(text)
    captions = captions[:n]
    queries = [" ".join(by_image[i][0].split()) for i in eval_ids][:n_queries]
    if "minilm" in names:
        from ragcap.embed import load_embedder
        from ragcap.report import progress

        embedder = load_embedder(EMBEDDER)
        cache = work / f"minilm-{len(captions)}.npy"  # ~10 minutes to embed on 2 cores: kept
        if not cache.exists():
            with progress(len(captions), "embed minilm", "captions") as bar:
                np.save(cache, embedder.encode_text(captions, on_batch=bar.update).vectors)
        out["minilm"] = (captions, np.load(cache), embedder.encode_text(queries).vectors)
    if "clip" in names:
        rng = np.random.default_rng(0)
        vectors = unit(rng.standard_normal((len(captions), 512), dtype=np.float32))
        out["clip"] = (captions, vectors, unit(rng.standard_normal((len(queries), 512), dtype=np.float32)))
    return out


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def exact(vectors: np.ndarray, queries: np.ndarray, tau: float):
    """Top-10 ids and DeCap's whole-memory projections, in float32 over the original vectors."""
    from ragcap.retrieve import project

    scores = queries @ vectors.T
    top10 = np.argsort(-scores, axis=1)[:, :10]
    projections = np.stack([project(s, vectors, tau) for s in scores[:PROJECTION_QUERIES]])
    return top10, projections


def build(root: Path, name: str, captions, vectors, quantization: str, on_disk: bool) -> dict:
    from ragcap.store import CollectionLayout, EmbedderInfo, open_store, point_id

    t0 = time.perf_counter()
    with open_store(path=root) as store:
        store.create(name, EmbedderInfo(f"bench-{vectors.shape[1]}", vectors.shape[1]),
                     layout=CollectionLayout(on_disk=on_disk, quantization=quantization))
        for start in range(0, len(captions), 8192):
            part = captions[start:start + 8192]
            store.upsert(name, [point_id(name, c) for c in part], vectors[start:start + 8192], [{"caption": c} for c in part])
        store.optimize(name)
    seconds = time.perf_counter() - t0
    disk = sum(p.stat().st_blocks * 512 for p in (root / "collections" / name).rglob("*") if p.is_file())
    return {"build_s": round(seconds, 1), "disk_mb": round(disk / 2**20, 1)}


def measure(root: Path, name: str, captions, queries, top10, projections, tau: float, quantization: str, oversampling=None) -> dict:
    from ragcap.retrieve import project_hits
    from ragcap.store import open_store, point_id
    from ragcap.store.edge import EdgeIndexConfig

    index = {point_id(name, c): i for i, c in enumerate(captions)}
    with open_store(path=root) as store:
        if oversampling is not None:  # else the store's own choice for this quantization
            store.config = EdgeIndexConfig(quantization=quantization, oversampling=oversampling)
        store.search(name, queries[:4], 10)  # opened and warm
        t0 = time.perf_counter()
        hits = store.search(name, queries, 10)
        per_query_ms = (time.perf_counter() - t0) / len(queries) * 1000
        found = np.array([[index[h.id] for h in row] for row in hits])
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, top10)]))
        if oversampling is not None:
            return {"oversampling": oversampling, "recall@10": round(recall, 4), "ms_per_query": round(per_query_ms, 2)}
        near = store.search(name, queries[:PROJECTION_QUERIES], K_PROJECTION, with_vectors=True)
    cosines = np.sum(np.stack([project_hits(h, tau) for h in near]) * projections, axis=1)
    return {"recall@10": round(recall, 4), "ms_per_query": round(per_query_ms, 2),
            "pd_cosine_min": round(float(cosines.min()), 6), "pd_cosine_mean": round(float(cosines.mean()), 6)}


def resident(root: Path, name: str, queries: np.ndarray, work: Path) -> dict:
    path = work / "queries.npy"
    np.save(path, queries)
    done = subprocess.run([sys.executable, "-c", RESIDENT, str(root), name, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    sizes = json.loads(done.stdout)
    return {"ram_anon_mb": round(sizes["RssAnon"] / 2**20, 1), "ram_file_mb": round(sizes["RssFile"] / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memories", default="minilm,clip")
    parser.add_argument("--n", type=int, default=200_000, help="memory size (captions)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "quantization")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from ragcap.retrieve import DEFAULT_TAU

    if not BY_IMAGE.exists():
        raise SystemExit(f"needs {BY_IMAGE} (../shared)")
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for memory, (captions, vectors, queries) in memories(args.memories.split(","), args.n, args.queries, args.work).items():
        top10, projections = exact(vectors, queries, DEFAULT_TAU)
        rows = []
        for quantization, on_disk in SETTINGS:
            root = args.work / f"{memory}-{len(captions)}-{quantization}-{'disk' if on_disk else 'ram'}"
            name = "m"
            row = {"quantization": quantization, "on_disk": on_disk}
            if not (root / "collections" / name).exists():
                row.update(build(root, name, captions, vectors, quantization, on_disk))
            row.update(measure(root, name, captions, queries, top10, projections, DEFAULT_TAU, quantization))
            row.update(resident(root, name, queries, args.work))
            if not on_disk and quantization in SWEEP:
                row["sweep"] = [measure(root, name, captions, queries, top10, projections, DEFAULT_TAU, quantization, x)
                                for x in SWEEP[quantization]]
            rows.append(row)
            print(json.dumps({"memory": memory, **row}), file=sys.stderr)
        results[memory] = {"points": len(captions), "dim": vectors.shape[1], "queries": len(queries), "settings": rows}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for memory, result in results.items():
            print(f"{memory}: {result['points']} points, {result['dim']}-d")
            for row in result["settings"]:
                print("  " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "sweep"))


if __name__ == "__main__":
    main()
