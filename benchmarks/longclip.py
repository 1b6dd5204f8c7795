"""Long-CLIP on the CPU: long-caption embedding and primary-component-matching steps, ragcap vs the padded way.

Long captions (100-248 CLIP tokens) are real COCO captions strung together into descriptions.
The model is a full-size open_clip architecture (ViT-B-16 by default: Long-CLIP-B's) with random
weights, stretched to 248 tokens by `ragcap.longclip.stretch_model` and loaded as users load it;
speed does not depend on the weight values.

  embed     ragcap's encode_text (captions sorted by length, each batch cut to its longest) vs
            open_clip's encode_text on every caption padded to 248: captions/s, ratio, max |diff|.
            Embedding is nearly all of an ingest's time on a CPU.
  finetune  steps/s of `finetune_longclip` on real COCO photos, as it runs (text on the cut path),
            vs the same loop with every long and short caption padded to 248 as Long-CLIP's
            training script does; the first step is a warm-up and is not timed.

    python benchmarks/longclip.py --json
    python benchmarks/longclip.py --small     # quick check: ViT-B-32, few captions, 2 timed steps
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import open_clip
import torch

from ragcap.embed import load_embedder, save_random
from ragcap.longclip import stretch_model
from ragcap.longclip_train import FinetuneConfig, PrimaryComponentMatching, Triple, finetune_longclip
from text_embed import default_path  # open_clip's padded encode_text, as users write it

COCO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco"


def long_captions(n: int, lowest: int = 100, highest: int = 248, seed: int = 0) -> list[str]:
    """n descriptions of lowest..highest CLIP tokens (start and end included), from COCO captions in order."""
    path = COCO / "captions_val2017.json"
    if not path.is_file():
        sys.exit(f"COCO captions not found at {path} (expected ../shared/data/coco/ beside the repo)")
    sentences = iter(a["caption"].strip().rstrip(".") + "." for a in json.loads(path.read_text(encoding="utf-8"))["annotations"])
    encode = open_clip.get_tokenizer("ViT-B-16").encode
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        target = int(rng.integers(lowest + 20, highest + 1))  # sentences are <= ~20 tokens
        parts, length = [], 2
        while length < target - 20 or not parts:
            sentence = next(sentences)
            if length + len(encode(sentence)) > target:
                continue
            parts.append(sentence)
            length += len(encode(sentence))
        out.append(" ".join(parts))
    return out


def bench_embed(model_dir: Path, n: int, padded_n: int, batch_size: int, device: str | None) -> dict:
    captions = long_captions(n)
    embedder = load_embedder(str(model_dir), device=device)
    embedder.encode_text(captions[:4])  # warm-up: first-call allocations and kernel selection
    start = time.perf_counter()
    ours = embedder.encode_text(captions, batch_size=batch_size)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    reference = default_path(embedder, captions[:padded_n], batch_size)  # its tokenizer pads to 248
    padded_s = time.perf_counter() - start
    return {
        "captions": n, "padded_captions": padded_n, "batch_size": batch_size,
        "tokens_min": int(ours.lengths.min()), "tokens_mean": float(ours.lengths.mean()), "tokens_max": int(ours.lengths.max()),
        "truncated": int(ours.truncated.sum()),
        "ragcap_captions_per_s": n / ours_s, "padded_captions_per_s": padded_n / padded_s,
        "speedup": (n / ours_s) / (padded_n / padded_s),
        "max_abs_diff": float(np.abs(ours.vectors[:padded_n] - reference).max()),
    }


def padded_text(self, tokens: torch.Tensor) -> torch.Tensor:
    """Long-CLIP's training forward: every caption runs at the full 248 positions."""
    return self.clip.encode_text(tokens.to(self.device), normalize=True)


def bench_finetune(model_dir: Path, steps: int, batch_size: int, device: str | None, out: Path) -> dict:
    manifest = COCO / "images" / "manifest.jsonl"
    if not manifest.is_file():
        sys.exit(f"COCO photos not found at {manifest.parent}")
    photos = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()][: steps * batch_size]
    longs = long_captions(len(photos), seed=1)
    triples = [Triple(manifest.parent / p["file"], long, p["references"][0]) for p, long in zip(photos, longs)]
    config = FinetuneConfig(epochs=1, batch_size=batch_size, lr=1e-6, warmup_steps=0, val_fraction=0.0, device=device)

    def steps_per_s(name: str) -> float:
        stamps = []
        finetune_longclip(triples, str(model_dir), out / name, config, progress=lambda step, total, loss: stamps.append(time.perf_counter()))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])  # steps 2..n: the first one warms up

    ours = steps_per_s("ragcap")
    with mock.patch.object(PrimaryComponentMatching, "encode_text", padded_text):
        padded = steps_per_s("padded")
    return {"steps_timed": steps - 1, "batch_size": batch_size, "ragcap_steps_per_s": ours, "padded_steps_per_s": padded,
            "speedup": ours / padded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--n", type=int, default=256, help="long captions for ragcap's path")
    parser.add_argument("--padded-n", type=int, default=128, help="captions for the padded path (a prefix; it is slow)")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per embedding batch")
    parser.add_argument("--steps", type=int, default=4, help="fine-tuning steps per run (the first is not timed)")
    parser.add_argument("--finetune-batch", type=int, default=8, help="triples per fine-tuning step")
    parser.add_argument("--only", choices=["embed", "finetune"], help="run one of the two benchmarks")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--small", action="store_true", help="quick check: ViT-B-32, 32 captions, 3 steps of 4")
    args = parser.parse_args()
    if args.small:
        args.arch, args.n, args.padded_n, args.batch_size, args.steps, args.finetune_batch = "ViT-B-32", 32, 16, 16, 3, 4

    result = {"arch": args.arch, "context": 248, "threads": torch.get_num_threads(),
              "device": args.device or ("cuda" if torch.cuda.is_available() else "cpu")}
    with tempfile.TemporaryDirectory(prefix="ragcap-bench-") as tmp:
        model_dir = stretch_model(str(save_random(args.arch, Path(tmp) / "clip", seed=0)), Path(tmp) / "long", device="cpu")
        if args.only in (None, "embed"):
            result["embed"] = bench_embed(model_dir, args.n, min(args.padded_n, args.n), args.batch_size, args.device)
        if args.only in (None, "finetune"):
            result["finetune"] = bench_finetune(model_dir, args.steps, args.finetune_batch, args.device, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.arch} stretched to 248 tokens (random weights), {result['device']}, {result['threads']} threads")
    if "embed" in result:
        e = result["embed"]
        print(f"embed {e['captions']} captions of {e['tokens_min']}-{e['tokens_max']} tokens (mean {e['tokens_mean']:.0f}), batch {e['batch_size']}:")
        print(f"  open_clip padded to 248: {e['padded_captions_per_s']:.2f} captions/s ({e['padded_captions']} captions)")
        print(f"  ragcap length-cut:       {e['ragcap_captions_per_s']:.2f} captions/s; speed-up {e['speedup']:.2f}x; "
              f"max |diff| {e['max_abs_diff']:.1e}; truncated {e['truncated']}")
    if "finetune" in result:
        f = result["finetune"]
        print(f"finetune, batch {f['batch_size']}, {f['steps_timed']} timed steps:")
        print(f"  captions padded to 248 (Long-CLIP): {f['padded_steps_per_s']:.4f} steps/s")
        print(f"  ragcap length-cut text:             {f['ragcap_steps_per_s']:.4f} steps/s; speed-up {f['speedup']:.2f}x")


if __name__ == "__main__":
    main()
