"""Text embedding throughput: open_clip's padded encode_text vs ragcap's length-cut path.

Both run in one process on real COCO captions with ViT-B-32's architecture and random
weights (saved with save_random and loaded through load_embedder, the path users take;
speed does not depend on the weight values). Reports captions/s, the speed-up and the
largest absolute difference between the two sets of vectors.

    python benchmarks/text_embed.py                 # 5000 captions; default path timed on 1000
    python benchmarks/text_embed.py --small --json  # quick check (one batch: little speed-up)
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ragcap.embed import load_embedder, save_random

CAPTIONS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco" / "captions_val2017.json"


def coco_captions(n: int) -> list[str]:
    if not CAPTIONS.is_file():
        sys.exit(f"COCO captions not found at {CAPTIONS} (expected ../shared/data/coco/ beside the repo)")
    annotations = json.loads(CAPTIONS.read_text(encoding="utf-8"))["annotations"]
    return [a["caption"].strip() for a in annotations[:n]]


def default_path(embedder, captions: list[str], batch_size: int) -> np.ndarray:
    """What open_clip users write: tokenize to the full context, encode_text in batches."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(captions), batch_size):
            tokens = embedder.tokenizer(captions[start:start + batch_size]).to(embedder.device)
            out.append(embedder.model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="captions for ragcap's path")
    parser.add_argument("--default-n", type=int, default=1000,
                        help="captions for open_clip's padded path (a prefix of the --n captions; it is slow)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--small", action="store_true", help="quick check: --n 200 --default-n 100")
    args = parser.parse_args()
    if args.small:
        args.n, args.default_n = 200, 100

    captions = coco_captions(args.n)
    default_n = min(args.default_n, len(captions))
    with tempfile.TemporaryDirectory(prefix="ragcap-bench-") as tmp:
        embedder = load_embedder(str(save_random(args.arch, Path(tmp), seed=0)), device=args.device)
        embedder.encode_text(captions[:8])  # warm-up: first-call allocations and kernel selection
        default_path(embedder, captions[:8], 8)

        start = time.perf_counter()
        fast = embedder.encode_text(captions, batch_size=args.batch_size)
        fast_s = time.perf_counter() - start
        start = time.perf_counter()
        reference = default_path(embedder, captions[:default_n], args.batch_size)
        default_s = time.perf_counter() - start

    result = {
        "arch": args.arch,
        "device": str(embedder.device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "ragcap_n": len(captions),
        "ragcap_captions_per_s": len(captions) / fast_s,
        "default_n": default_n,
        "default_captions_per_s": default_n / default_s,
        "speedup": (len(captions) / fast_s) / (default_n / default_s),
        "max_abs_diff": float(np.abs(fast.vectors[:default_n] - reference).max()),
        "truncated": int(fast.truncated.sum()),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.arch} (random weights), {result['device']}, {result['threads']} threads, batch {args.batch_size}")
    print(f"{'path':<28}{'captions':>10}{'captions/s':>12}")
    print(f"{'open_clip encode_text (77)':<28}{default_n:>10}{result['default_captions_per_s']:>12.1f}")
    print(f"{'ragcap encode_text':<28}{len(captions):>10}{result['ragcap_captions_per_s']:>12.1f}")
    note = f" (open_clip path timed on the first {default_n} captions)" if default_n < len(captions) else ""
    print(f"speed-up {result['speedup']:.2f}x{note}; max |diff| {result['max_abs_diff']:.2e}; "
          f"{result['truncated']} captions truncated")


if __name__ == "__main__":
    main()
