"""Loading pre-computed embeddings: `ingest clip-retrieval` (memory-mapped .npy + Parquet) vs
`ingest parquet --vector-field` (a ragcap export's list<float32> column), same captions and vectors.

Both run as `ragcap` child processes into fresh embedded stores; reported: points/s of the whole
command (read, de-duplicate, store, index) and its peak memory. The embedded store keeps a
growing collection's vectors in its own memory until it indexes them, so each reader is also run
alone (every record read, nothing stored): its peak shows whether reading is bounded. Synthetic
data: unit 512-d float16 vectors (clip-retrieval's storage type) and unique captions, 10 files each.

    python benchmarks/clip_retrieval.py --points 1000000 --json
    python benchmarks/clip_retrieval.py --points 1000000 --readers-only --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from procpeak import run_sampled

READ_ONLY = """
import sys
from pipelines import ReadOptions, get_reader
records = get_reader(sys.argv[1])(sys.argv[2:], ReadOptions(text_field="caption", vector_field=sys.argv[1] == "parquet" and "vector" or None))
print(sum(1 for _ in records))
"""


def write_inputs(folder: Path, points: int, dim: int, parts: int = 10) -> tuple[Path, Path]:
    """clip-retrieval's layout and the equivalent ragcap-export-style Parquet file."""
    rng = np.random.default_rng(0)
    (folder / "cr" / "text_emb").mkdir(parents=True)
    (folder / "cr" / "metadata").mkdir()
    export = folder / "export.parquet"
    schema = pa.schema([("caption", pa.string()), ("vector", pa.list_(pa.float32(), dim))])
    with pq.ParquetWriter(export, schema) as writer:
        for n, start in enumerate(range(0, points, -(-points // parts))):
            size = min(-(-points // parts), points - start)
            vectors = rng.standard_normal((size, dim), dtype=np.float32)
            vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
            captions = [f"synthetic caption number {start + i}" for i in range(size)]
            np.save(folder / "cr" / "text_emb" / f"text_emb_{n}.npy", vectors)
            pq.write_table(pa.table({"caption": captions}), folder / "cr" / "metadata" / f"metadata_{n}.parquet")
            flat = pa.array(vectors.astype(np.float32).reshape(-1), pa.float32())
            writer.write_table(pa.Table.from_arrays([pa.array(captions), pa.FixedSizeListArray.from_arrays(flat, dim)], schema=schema))
    return folder / "cr", export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--readers-only", action="store_true", help="only the two readers alone (seconds, not minutes)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ragcap-cr-") as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        model.mkdir()
        # The embedder is only named (its config says the dimension); its weights are never loaded.
        (model / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": args.dim}}))
        (model / "open_clip_model.safetensors").write_bytes(b"")
        folder, export = write_inputs(tmp, args.points, args.dim)
        ragcap = [sys.executable, "-m", "ragcap.cli", "ingest"]
        runs = {} if args.readers_only else {
            "clip_retrieval": run_sampled(ragcap + ["clip-retrieval", str(folder), "-c", "cr", "-m", str(model)],
                                          {**os.environ, "RAGCAP_HOME": str(tmp / "home-cr")}),
            "parquet": run_sampled(ragcap + ["parquet", str(export), "-c", "pq", "-m", str(model), "--text-field", "caption",
                                             "--vector-field", "vector"], {**os.environ, "RAGCAP_HOME": str(tmp / "home-pq")}),
        }
        root = str(Path(__file__).resolve().parents[1])
        for name, source, path in (("clip_retrieval_read_only", "clip-retrieval", folder), ("parquet_read_only", "parquet", export)):
            runs[name] = run_sampled([sys.executable, "-c", READ_ONLY, source, str(path)], {**os.environ, "PYTHONPATH": root})
    for run in runs.values():
        run["points_per_s"] = round(args.points / run["seconds"])
    result = {"points": args.points, "dim": args.dim, **runs}
    if not args.readers_only:
        result["speedup"] = round(runs["clip_retrieval"]["points_per_s"] / runs["parquet"]["points_per_s"], 2)
    print(json.dumps(result, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
