"""pd captioning speed: ragcap's batched pipeline vs DeCap's published per-image procedure.

Both run in this process on the same real photographs, the same ViT-B-32 (random weights: the
real architecture, so the real speed) and the same DeCap-size decoder (4 layers, 4 heads,
width 768, random weights). The reference follows DeCap's inference code: one image at a time,
softmax over the whole memory, greedy decoding that re-runs the whole sequence at every step.
ragcap: batches of images, one batched top-k Qdrant query, KV-cached batched greedy decoding.

The memory holds real COCO captions as payloads; their vectors are random unit vectors (the
model is random anyway, and embedding 200k captions would take an hour on this CPU). Also
reported: the cosine between the top-k projection and the exact whole-memory projection, and
peak memory of `ragcap caption` over --memory-images images in a child process.

    python benchmarks/caption.py                      # full: 100 images, 200,000 captions
    python benchmarks/caption.py --images 8 --memory 5000 --memory-images 16   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "coco"
from ragcap.caption import DEFAULT_K, CaptionSettings, Captioner
from ragcap.decoder import CaptionDecoder, DecoderConfig
from ragcap.embed import load_embedder, save_random
from ragcap.images import load_image
from ragcap.retrieve import DEFAULT_TAU, FullMemory, project_hits
from ragcap.store import open_store, point_id


def real_images(n: int) -> list[str]:
    files = sorted(str(p) for p in (SHARED / "images").glob("*.jpg"))
    if not files:
        sys.exit(f"no images under {SHARED / 'images'}: this benchmark needs ../shared")
    return [files[i % len(files)] for i in range(n)]


def fill_memory(store, collection: str, info, n: int, seed: int = 0) -> None:
    captions = [c for caps in json.loads((SHARED / "captions_val2014_by_image.json").read_text()).values() for c in caps]
    captions = list(dict.fromkeys(" ".join(c.split()) for c in captions))[:n]
    rng = np.random.default_rng(seed)
    store.create(collection, info)
    for start in range(0, len(captions), 8192):
        chunk = captions[start : start + 8192]
        vectors = rng.standard_normal((len(chunk), info.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert(collection, [point_id(collection, c) for c in chunk], vectors, [{"caption": c} for c in chunk])


@torch.inference_mode()
def reference_caption(path: str, embedder, memory: torch.Tensor, decoder: CaptionDecoder) -> str:
    """DeCap's per-image loop: batch of one, whole-memory softmax, greedy without a KV cache."""
    image = embedder.preprocess(load_image(path)).unsqueeze(0).to(embedder.device)
    v = embedder.model.encode_image(image).float()
    v = v / v.norm(dim=-1, keepdim=True)
    weights = torch.softmax((v @ memory.T) / DEFAULT_TAU, dim=-1)
    prefix = weights @ memory
    prefix = prefix / prefix.norm(dim=-1, keepdim=True)
    tokens = [decoder.config.sot_id]
    for _ in range(decoder.config.max_tokens):
        logits = decoder(prefix, torch.tensor([tokens]))
        nxt = int(logits[0, -1].argmax())
        if nxt == decoder.config.eot_id:
            break
        tokens.append(nxt)
    return decoder.tokenizer.decode(tokens[1:])


def peak_memory_of_cli(home: str, collection: str, decoder_dir: str, paths: list[str]) -> float:
    """Peak RSS (GB) of `ragcap caption` over the given images, in a child process."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(paths))
    cmd = [sys.executable, "-m", "ragcap.cli", "caption", f"@{listing.name}", "-c", collection, "--mode", "pd",
           "--decoder", decoder_dir, "--format", "jsonl", "-o", os.devnull]
    subprocess.run(cmd, check=True, env={**os.environ, "RAGCAP_HOME": home}, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--memory", type=int, default=200_000, help="captions in the collection")
    parser.add_argument("--memory-images", type=int, default=1000, help="images for the peak-memory run (0: skip)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="ragcap-bench-")
    os.environ["RAGCAP_HOME"] = tmp
    embedder = load_embedder(str(save_random("ViT-B-32", Path(tmp) / "vit-b-32")))
    decoder = CaptionDecoder(DecoderConfig(embed_dim=embedder.info.dim), embedder.info).eval()
    decoder_dir = str(decoder.save(Path(tmp) / "decoder"))
    store = open_store()
    t0 = time.perf_counter()
    fill_memory(store, "bench", embedder.info, args.memory)
    fill_seconds = time.perf_counter() - t0
    paths = real_images(args.images)

    memory = torch.from_numpy(FullMemory(store, "bench").vectors)
    reference_caption(paths[0], embedder, memory, decoder)  # warm-up both paths
    t0 = time.perf_counter()
    for path in paths:
        reference_caption(path, embedder, memory, decoder)
    reference_rate = len(paths) / (time.perf_counter() - t0)

    captioner = Captioner(store, "bench", embedder, CaptionSettings(modes=("pd",), batch_size=args.batch_size), decoder=decoder)
    list(captioner.caption_images(paths[: args.batch_size]))
    t0 = time.perf_counter()
    results = list(captioner.caption_images(paths))
    ragcap_rate = len(paths) / (time.perf_counter() - t0)
    assert all(r.error is None for r in results)

    queries = embedder.encode_images([load_image(p) for p in paths[:20]])
    hits = store.search("bench", queries, DEFAULT_K, with_vectors=True)
    topk = np.stack([project_hits(h, DEFAULT_TAU) for h in hits])
    exact = FullMemory(store, "bench").project(queries, DEFAULT_TAU)
    cosines = np.sum(topk * exact, axis=1)
    store.close()

    peak_gb = peak_memory_of_cli(tmp, "bench", decoder_dir, real_images(args.memory_images)) if args.memory_images else None
    report = {
        "images": len(paths),
        "memory_captions": args.memory,
        "memory_fill_seconds": round(fill_seconds, 1),
        "reference_images_per_s": round(reference_rate, 2),
        "ragcap_pd_images_per_s": round(ragcap_rate, 2),
        "speedup": round(ragcap_rate / reference_rate, 2),
        "k": DEFAULT_K,
        "cosine_topk_vs_full_min": round(float(cosines.min()), 6),
        "cosine_topk_vs_full_mean": round(float(cosines.mean()), 6),
        "peak_rss_gb_caption_cli": round(peak_gb, 2) if peak_gb is not None else None,
        "peak_run_images": args.memory_images,
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
