"""--precision: speed and drift of bf16, fp16 and int8 against fp32, in one process.

CLIP's towers as ragcap runs them (load_embedder at each precision, the path users take), on
real COCO photographs and captions, ViT-B-32's architecture with random weights (saved with
save_random: the real shapes, so the real speed). For each precision: the image tower's
forward pass on preprocessed photos (images/s), the text tower on captions (captions/s), each
against fp32 in the same run, and the drift of the vectors from fp32's (cosine, min and mean).
Random weights show the arithmetic's drift, not what it does to a trained model's captions:
`ragcap eval --precision P` against `--precision fp32` shows that, with real weights.

    python benchmarks/precision.py --json                          # CPU: fp32, bf16, fp16, int8
    python benchmarks/precision.py --device cuda --precisions fp32,bf16,fp16 --json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from caption import real_images
from output import print_report
from ragcap.embed import load_embedder, save_random
from ragcap.images import load_image
from text_embed import coco_captions


def timed_call(fn, *args) -> tuple[object, float]:
    """(fn(*args), its seconds), the GPU's queued work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def best_of(fn, repeats: int) -> tuple[float, object]:
    """(best seconds of `repeats` calls, the last result): the best, so a moment of contention on
    a shared machine does not decide a ratio."""
    runs = [timed_call(fn) for _ in range(repeats)]
    return min(seconds for _, seconds in runs), runs[-1][0]


def drift(vectors: np.ndarray, reference: np.ndarray) -> dict:
    """Cosines of unit vectors to their fp32 counterparts, row by row: min and mean."""
    cosines = (vectors * reference).sum(axis=1)
    return {"min": round(float(cosines.min()), 6), "mean": round(float(cosines.mean()), 6)}


def measure(model_dir: Path, device: str, precision: str, pixels: list, captions: list[str], batch: int, repeats: int) -> dict:
    images = load_embedder(str(model_dir), device, image_only=True, precision=precision)
    texts = load_embedder(str(model_dir), device, precision=precision)
    images.encode_prepared(pixels[:batch], batch), texts.encode_text(captions[:batch], batch)  # warm-up: one batch each
    image_s, image_vectors = best_of(lambda: images.encode_prepared(pixels, batch), repeats)
    text_s, text_vectors = best_of(lambda: texts.encode_text(captions, batch).vectors, repeats)
    return {"images_per_s": len(pixels) / image_s, "captions_per_s": len(captions) / text_s,
            "image_vectors": image_vectors, "text_vectors": text_vectors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,bf16,fp16,int8", help="fp32 first: the others are compared with it")
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--images", type=int, default=32, help="COCO photographs")
    parser.add_argument("--captions", type=int, default=256, help="COCO captions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (the best counts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    if precisions[0] != "fp32":
        sys.exit("--precisions must start with fp32, the reference")

    captions = coco_captions(args.captions)
    with tempfile.TemporaryDirectory(prefix="ragcap-bench-") as tmp:
        model_dir = save_random(args.arch, Path(tmp) / "model")
        prepare = load_embedder(str(model_dir), args.device, image_only=True).prepare_image
        pixels = [prepare(load_image(path)) for path in real_images(args.images)]
        found = {p: measure(model_dir, args.device, p, pixels, captions, args.batch_size, args.repeats) for p in precisions}

    fp32 = found["fp32"]
    report = {"device": args.device, "arch": args.arch, "images": len(pixels), "captions": len(captions),
              "torch_threads": torch.get_num_threads()}
    for precision, got in found.items():
        report[f"{precision}_images_per_s"] = round(got["images_per_s"], 2)
        report[f"{precision}_captions_per_s"] = round(got["captions_per_s"], 1)
        if precision != "fp32":
            report[f"{precision}_image_speedup"] = round(got["images_per_s"] / fp32["images_per_s"], 2)
            report[f"{precision}_text_speedup"] = round(got["captions_per_s"] / fp32["captions_per_s"], 2)
            report[f"{precision}_image_cosine"] = drift(got["image_vectors"], fp32["image_vectors"])
            report[f"{precision}_text_cosine"] = drift(got["text_vectors"], fp32["text_vectors"])
    print_report(report, args.json)


if __name__ == "__main__":
    main()
