"""Cold start: `ragcap caption` of one photograph as a whole new process, against new processes
that only import torch (what pd cannot run without), and torch, open_clip and transformers
(what pd imported until it ran CLIP's ViT tower and DeCap's GPT-2 from ragcap's own modules).

ViT-B-32 and a DeCap-size decoder with random weights (the real sizes, so the real load times),
a 2,000-caption memory. The first run after the memory is filled also makes the vector copy
(ragcap.store.cache) and is reported apart. Wall seconds are medians of --runs; the CPU seconds
(user + system) of each child matter on a shared machine, where wall time includes waiting.
Also printed: the modules that take longest to import in one `caption` run (python -X importtime).

    python benchmarks/cold_start.py            # add --json for a script
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from caption import fill_memory, real_images  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from output import print_report
from ragcap.decoders import DeCapConfig, DeCapDecoder
from ragcap.embed import load_embedder, save_random
from ragcap.store import open_store

FLOORS = {"torch": "import torch", "torch_open_clip_transformers": "import torch, open_clip, transformers"}


def timed(cmd: list[str], env: dict, timeout: float | None = None) -> tuple[float, float, str]:
    """Wall and CPU seconds of a child process, and its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:5])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, done.stderr


def slowest_imports(importtime: str, n: int = 8) -> list[tuple[str, float]]:
    """Top-level packages by cumulative import seconds, from python -X importtime's lines."""
    found = []
    for line in importtime.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| ( *)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # imported by the program or by ragcap's own modules
            found.append((m.group(3), int(m.group(1)) / 1e6))
    return sorted(found, key=lambda x: -x[1])[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="ragcap-cold-"))
    env = {**os.environ, "RAGCAP_HOME": str(home)}
    os.environ["RAGCAP_HOME"] = str(home)
    embedder = load_embedder(str(save_random("ViT-B-32", home / "vit-b-32")), image_only=True)
    with open_store() as store:
        captions = fill_memory(store, "bench", embedder.info, 2000)
    decoder = DeCapDecoder(DeCapConfig(embed_dim=embedder.info.dim).pruned_to(captions), embedder.info)
    decoder_dir = str(decoder.save(home / "decoder"))
    caption = [sys.executable, "-m", "ragcap.cli", "caption", real_images(1)[0], "-c", "bench", "--mode", "pd", "--decoder", decoder_dir]

    first = timed(caption, env)[:2]
    runs = [timed(caption, env)[:2] for _ in range(args.runs)]
    floors = {name: [timed([sys.executable, "-c", code], env)[:2] for _ in range(args.runs)] for name, code in FLOORS.items()}
    imports = slowest_imports(timed([sys.executable, "-X", "importtime", *caption[1:]], env)[2])
    wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
    report = {
        "caption_first_run_making_the_copy_s": round(first[0], 2),
        "caption_wall_s": round(wall, 2),
        "caption_cpu_s": round(cpu, 2),
    }
    for name, times in floors.items():
        floor_wall, floor_cpu = statistics.median(w for w, _ in times), statistics.median(c for _, c in times)
        report[f"import_{name}_wall_s"] = round(floor_wall, 2)
        report[f"import_{name}_cpu_s"] = round(floor_cpu, 2)
        report[f"caption_vs_import_{name}_cpu"] = round(cpu / floor_cpu, 2)
    report.update({"slowest_imports_s": {name: round(s, 2) for name, s in imports}, "runs": args.runs})
    print_report(report, args.json)


if __name__ == "__main__":
    main()
