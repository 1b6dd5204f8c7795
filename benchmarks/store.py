"""Embedded store speed: qdrant-client local mode (path=...) vs the Qdrant Edge store.

Random L2-normalised float32 vectors: the worst case for approximate search (no low-dimensional
structure), so recall here is a floor for real caption embeddings. The baseline is measured on
a smaller N because it is slow; each row says which N it used.

    python benchmarks/store.py                      # full: edge N=200,000, baseline N=20,000
    python benchmarks/store.py --n 5000 --baseline-n 2000 --json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ragcap.embedder_info import EmbedderInfo  # noqa: E402
from ragcap.store import point_id  # noqa: E402
from ragcap.store.edge import EdgeIndexConfig, EdgeStore  # noqa: E402

COLLECTION = "bench"


def unit_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ vectors.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def recall(found: list[list[str]], truth: np.ndarray, ids: list[str]) -> float:
    return float(np.mean([len(set(f) & {ids[i] for i in t}) / len(t) for f, t in zip(found, truth)]))


def latencies(search_one, queries: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
    found, ms = [], []
    for q in queries:
        start = time.perf_counter()
        found.append(search_one(q))
        ms.append((time.perf_counter() - start) * 1000)
    return found, np.array(ms)


def bench_edge(n: int, dim: int, queries: np.ndarray, k: int, rng, workdir: Path, vector_dtype: str) -> dict:
    vectors = unit_vectors(n, dim, rng)
    ids = [point_id(COLLECTION, f"caption {i}") for i in range(n)]
    payloads = [{"caption": f"caption {i}"} for i in range(n)]
    truth = exact_top_k(queries, vectors, k)
    root = workdir / "edge"
    store = EdgeStore(root)
    store.create(COLLECTION, EmbedderInfo("random", dim), vector_dtype)
    start = time.perf_counter()
    for s in range(0, n, 10_000):  # the ingest runner's chunk size order of magnitude
        store.upsert(COLLECTION, ids[s : s + 10_000], vectors[s : s + 10_000], payloads[s : s + 10_000])
    upsert_s = time.perf_counter() - start
    start = time.perf_counter()
    store.optimize(COLLECTION)
    index_s = time.perf_counter() - start
    store.close()

    start = time.perf_counter()
    store = EdgeStore(root)
    assert store.count(COLLECTION) == n  # loads the shard from disk
    reopen_s = time.perf_counter() - start
    store.search(COLLECTION, queries[:5], k)  # warm caches
    found, ms = latencies(lambda q: [h.id for h in store.search(COLLECTION, q[None], k)[0]], queries)
    start = time.perf_counter()
    store.search(COLLECTION, queries, k)
    batch_s = time.perf_counter() - start
    store.close()
    config = EdgeIndexConfig()
    return {
        "backend": f"qdrant-edge ({vector_dtype}, {config.quantization}, oversampling {config.oversampling}, hnsw m={config.hnsw_m})",
        "n": n,
        "upsert_points_per_s": n / upsert_s,
        "index_build_s": index_s,
        "reopen_s": reopen_s,
        "query_p50_ms": float(np.percentile(ms, 50)),
        "query_p95_ms": float(np.percentile(ms, 95)),
        "batched_queries_per_s": len(queries) / batch_s,
        f"recall@{k}": recall(found, truth, ids),
        "queries": len(queries),
    }


def bench_client_local(n: int, dim: int, queries: np.ndarray, k: int, rng, workdir: Path) -> dict:
    from qdrant_client import QdrantClient, models

    vectors = unit_vectors(n, dim, rng)
    ids = [point_id(COLLECTION, f"caption {i}") for i in range(n)]
    truth = exact_top_k(queries, vectors, k)
    client = QdrantClient(path=str(workdir / "client"))
    client.create_collection(COLLECTION, vectors_config=models.VectorParams(size=dim, distance=models.Distance.COSINE))
    start = time.perf_counter()
    for s in range(0, n, 1000):
        batch = models.Batch(
            ids=ids[s : s + 1000],
            vectors=vectors[s : s + 1000].tolist(),
            payloads=[{"caption": f"caption {i}"} for i in range(s, min(s + 1000, n))],
        )
        client.upsert(COLLECTION, points=batch, wait=True)
    upsert_s = time.perf_counter() - start

    def one(q):
        return [str(p.id) for p in client.query_points(COLLECTION, query=q.tolist(), limit=k).points]

    found, ms = latencies(one, queries)
    client.close()
    return {
        "backend": "qdrant-client local (path=...)",
        "n": n,
        "upsert_points_per_s": n / upsert_s,
        "index_build_s": 0.0,  # local mode keeps no index: every query is a NumPy full scan
        "reopen_s": None,
        "query_p50_ms": float(np.percentile(ms, 50)),
        "query_p95_ms": float(np.percentile(ms, 95)),
        "batched_queries_per_s": None,
        f"recall@{k}": recall(found, truth, ids),
        "queries": len(queries),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000, help="points in the edge store")
    p.add_argument("--baseline-n", type=int, default=20_000, help="points for qdrant-client local mode (0 = skip)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--baseline-queries", type=int, default=20, help="the baseline answers a few queries/s")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vector-dtype", default="float16", help="edge store vector storage (recall is against exact float32)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="qdrant_client")

    rng = np.random.default_rng(args.seed)
    queries = unit_vectors(args.queries, args.dim, rng)
    workdir = Path(tempfile.mkdtemp(prefix="ragcap-bench-store-"))
    try:
        rows = [bench_edge(args.n, args.dim, queries, args.k, rng, workdir, args.vector_dtype)]
        if args.baseline_n:
            rows.append(
                bench_client_local(args.baseline_n, args.dim, queries[: args.baseline_queries], args.k, rng, workdir)
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    edge = rows[0]
    ratios = {}
    if len(rows) == 2:
        base = rows[1]
        ratios = {
            "upsert_speedup": edge["upsert_points_per_s"] / base["upsert_points_per_s"],
            # Both scan linearly, so per-query cost per point is the fair comparison across N.
            "query_speedup_at_equal_n": (base["query_p50_ms"] / base["n"]) / (edge["query_p50_ms"] / edge["n"]),
            "query_speedup_raw": base["query_p50_ms"] / edge["query_p50_ms"],
        }
    if args.json:
        print(json.dumps({"dim": args.dim, "k": args.k, "results": rows, "ratios": ratios}, indent=2))
        return

    def cell(value, width: int, spec: str) -> str:
        return ("-" if value is None else format(value, spec)).rjust(width)

    key = f"recall@{args.k}"
    print(f"dim={args.dim}, k={args.k}, random L2-normalised float32 vectors")
    print(
        f"{'backend':58} {'N':>8} {'upsert pts/s':>13} {'index s':>8} {'p50 ms':>8} {'p95 ms':>8} "
        f"{'batch q/s':>10} {key:>10}"
    )
    for r in rows:
        print(
            f"{r['backend']:58} {r['n']:>8} {cell(r['upsert_points_per_s'], 13, ',.0f')} "
            f"{cell(r['index_build_s'], 8, '.1f')} {cell(r['query_p50_ms'], 8, '.2f')} "
            f"{cell(r['query_p95_ms'], 8, '.2f')} {cell(r['batched_queries_per_s'], 10, '.0f')} "
            f"{cell(r[key], 10, '.4f')}"
        )
    print(f"edge reopen (load shard from disk): {edge['reopen_s']:.2f} s")
    for name, value in ratios.items():
        print(f"{name}: {value:.1f}x")


if __name__ == "__main__":
    main()
