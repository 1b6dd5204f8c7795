"""What `--engine ray` costs over the single-process ingest: a fixed part and a part per caption.

The same COCO val2014 captions are ingested into the embedded store by the single-process
runner and by the Ray pipeline (a local cluster, one actor with the same torch threads), at
two corpus sizes; a line through the two points of each engine gives its fixed seconds and
its seconds per caption. The embedder is a tiny random CLIP (2 layers of width 64, the real
tokenizer) so that what differs is the engine, not the model; the overhead is then set
against a real ViT-B-32 ingest on this CPU (BENCHMARKS.md: 103 captions/s).

On a GPU machine, --device cuda --model ViT-B-32 (random weights, the real architecture)
compares the actors on the GPU with the single-process path there.

    python benchmarks/scale.py --json
    python benchmarks/scale.py --sizes 2000,10000 --json        # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from output import print_report  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
BY_IMAGE = ROOT.parent / "shared" / "data" / "coco" / "captions_val2014_by_image.json"
VIT_B32_CPU_CAPTIONS_PER_S = 103.0  # BENCHMARKS.md, "Text embedding (ingest)", same machine


def corpus(path: Path, n: int) -> Path:
    by_image = json.loads(BY_IMAGE.read_text())
    captions = [c for caps in by_image.values() for c in caps][:n]
    path.write_text("\n".join(" ".join(c.split()) for c in captions) + "\n", encoding="utf-8")
    return path


def model_dir(arch: str, work: Path) -> str:
    """A random checkpoint of `arch` (tiny: the tests' 2-layer CLIP), in open_clip's on-disk form."""
    from ragcap.embed import save_random

    out = work / f"model-{arch}"
    if arch == "tiny":
        from tests.helpers import make_tiny_clip

        return str(make_tiny_clip(out))
    return str(save_random(arch, out))


def timed_ingest(path: Path, model: str, home: Path, engine, device: str | None) -> tuple[float, int]:
    from pipelines import ReadOptions
    from ragcap import api
    from ragcap.ingest import IngestOptions
    from ragcap.store import open_store

    from ragcap import embed

    shutil.rmtree(home, ignore_errors=True)
    embed._CACHE.clear()  # each run loads its model, as each run's actors do
    with open_store(path=home) as store:
        t0 = time.perf_counter()
        summary = api.ingest_corpus(store, "text", [str(path)], "bench", model, ReadOptions(), IngestOptions(),
                                    device=device, engine=engine)[1]
        return time.perf_counter() - t0, summary.stored


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(fixed seconds, seconds per caption) of the line through the first and last points."""
    (n0, t0), (n1, t1) = points[0], points[-1]
    per_row = (t1 - t0) / (n1 - n0)
    return t0 - per_row * n0, per_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="two corpus sizes (captions)")
    parser.add_argument("--model", default="tiny", help="tiny, or an open_clip architecture (random weights), e.g. ViT-B-32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--cpus-per-actor", type=float, default=1.5, help="1.5 on 2 cores: the actor runs 2 torch threads, as the single process does")
    parser.add_argument("--gpus-per-actor", type=float, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not BY_IMAGE.exists():
        raise SystemExit(f"needs {BY_IMAGE} (../shared)")
    from ragcap.distributed import RayOptions
    from ragcap.distributed.cluster import connect

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ragcap-scale-"))
    try:
        model = model_dir(args.model, work)
        files = {n: corpus(work / f"captions-{n}.txt", n) for n in sizes}
        t0 = time.perf_counter()
        with connect(None) as cluster:
            start_s = time.perf_counter() - t0
            engine = RayOptions(actors=1, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor)
            runs = {"single-process": [], "ray": []}
            for n in sizes:
                for name, option in (("single-process", None), ("ray", engine)):
                    seconds, stored = timed_ingest(files[n], model, work / "home", option, args.device)
                    runs[name].append((n, seconds))
                    print(json.dumps({"engine": name, "captions": n, "stored": stored, "seconds": round(seconds, 2)}), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (plain_fixed, plain_row), (ray_fixed, ray_row) = fit(runs["single-process"]), fit(runs["ray"])
    n = sizes[-1]
    overhead_s = (ray_fixed - plain_fixed) + (ray_row - plain_row) * n
    result = {
        "machine": f"{os.cpu_count()} CPUs", "model": args.model, "device": args.device or "default",
        "cluster": {"cpus": cluster.cpus, "gpus": cluster.gpus, "start_s": round(start_s, 2)},
        "runs": {k: [{"captions": c, "seconds": round(s, 2)} for c, s in v] for k, v in runs.items()},
        "single_process": {"fixed_s": round(plain_fixed, 2), "us_per_caption": round(plain_row * 1e6, 1)},
        "ray": {"fixed_s": round(ray_fixed, 2), "us_per_caption": round(ray_row * 1e6, 1)},
        "extra_fixed_s": round(ray_fixed - plain_fixed, 2),
        "extra_per_caption_pct": round(100 * (ray_row / plain_row - 1), 1),
        f"overhead_s_at_{n}": round(overhead_s, 1),
    }
    if args.model == "tiny":  # against a real ViT-B-32 text ingest of the same size on this CPU
        result[f"overhead_pct_of_vit_b32_cpu_ingest_at_{n}"] = round(100 * overhead_s / (n / VIT_B32_CPU_CAPTIONS_PER_S), 2)
    print_report(result, args.json)


if __name__ == "__main__":
    main()
