"""Tokenising captions: open_clip's SimpleTokenizer (pure Python) against ragcap.clip_tokenizer
(the same ids from Hugging Face `tokenizers` in Rust), in one process on real COCO captions.

Both tokenise the same N captions to CLIP's 77 tokens; ragcap also counts each caption's full
length, which the embedder needs. Reports captions/s of open_clip, of ragcap on one thread and
on the Rust thread pool, the ratios (wall time, and CPU seconds for the one-thread runs),
whether every id matched, the one-off build time, and what cleaning costs (open_clip's
ftfy-based clean against ragcap's, which skips ftfy on plain ASCII).

    python benchmarks/tokenizer.py                  # 100,000 captions; add --json for a script
    python benchmarks/tokenizer.py --n 10000 --json # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import open_clip
import torch

from output import print_report
from ragcap import clip_tokenizer

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco" / "captions_val2014_by_image.json"


def coco_val2014_captions(n: int) -> list[str]:
    if not CAPTIONS.is_file():
        sys.exit(f"COCO captions not found at {CAPTIONS} (expected ../shared/data/coco/ beside the repo)")
    by_image = json.loads(CAPTIONS.read_text(encoding="utf-8"))
    return [caption for captions in by_image.values() for caption in captions][:n]


def timed(fn, *args):
    """fn's result, wall seconds and this process's CPU seconds (all threads)."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - start, time.process_time() - cpu


def tokenizer_rates(captions: list[str], context: int = 77) -> dict:
    """open_clip's tokenizer against ragcap's (one thread, Rust pool) on the same captions."""
    simple = open_clip.get_tokenizer("ViT-B-32")
    _, build_s, build_cpu_s = timed(clip_tokenizer.build, simple)  # the first build in this process
    single = clip_tokenizer.ClipTokenizer(simple, parallel=False, build_min=0)
    pooled = clip_tokenizer.ClipTokenizer(simple, parallel=True, build_min=0)
    pooled.tokenize(captions[:1000], context)  # warm-up: starts the Rust thread pool

    expected, open_clip_s, open_clip_cpu_s = timed(simple, captions, context)
    (single_tokens, _), single_s, single_cpu_s = timed(single.tokenize, captions, context)
    (pooled_tokens, _), pooled_s, _ = timed(pooled.tokenize, captions, context)
    _, _, ftfy_clean_cpu_s = timed(lambda: [simple.clean_fn(c) for c in captions])
    _, _, ragcap_clean_cpu_s = timed(lambda: [clip_tokenizer.clean(simple, c) for c in captions])

    n = len(captions)
    return {
        "captions": n,
        "context": context,
        "cpus": os.cpu_count(),
        "open_clip_captions_per_s": round(n / open_clip_s),
        "ragcap_1_thread_captions_per_s": round(n / single_s),
        "ragcap_pool_captions_per_s": round(n / pooled_s),
        "speedup_1_thread": round(open_clip_s / single_s, 2),
        "speedup_pool": round(open_clip_s / pooled_s, 2),
        "identical_ids": bool(torch.equal(expected, single_tokens) and torch.equal(expected, pooled_tokens)),
        # CPU seconds: on a shared machine, wall time is mostly waiting for a core.
        "open_clip_captions_per_cpu_s": round(n / open_clip_cpu_s),
        "ragcap_1_thread_captions_per_cpu_s": round(n / single_cpu_s),
        "speedup_1_thread_cpu": round(open_clip_cpu_s / single_cpu_s, 2),
        "build_s": round(build_s, 3),
        "build_cpu_s": round(build_cpu_s, 3),
        "open_clip_clean_captions_per_cpu_s": round(n / ftfy_clean_cpu_s),
        "ragcap_clean_captions_per_cpu_s": round(n / ragcap_clean_cpu_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="COCO val2014 captions")
    parser.add_argument("--context", type=int, default=77)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    report = tokenizer_rates(coco_val2014_captions(args.n), args.context)
    print_report(report, args.json)


if __name__ == "__main__":
    main()
