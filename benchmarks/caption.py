"""pd captioning speed: ragcap's batched pipeline vs DeCap's published per-image procedure,
and vs what CLIP's image tower alone does on the same photographs.

All run in this process on the same real photographs, the same ViT-B-32 (random weights: the
real architecture, so the real speed) and the same DeCap-size decoder (4 layers, 4 heads,
width 768, random weights). The reference follows DeCap's inference code: one image at a time,
softmax over the whole memory, greedy decoding that re-runs the whole sequence at every step.
ragcap: batches of images decoded and preprocessed by worker threads one batch ahead, the
memory searched exactly by matrix products over a copy of its vectors (the default, `--memory
exact`) or by one batched top-k Qdrant query (`--memory qdrant`), KV-cached batched greedy
decoding; "before": ragcap without this work (Qdrant's top k, images loaded in the calling
thread, batches of 32); also ragcap's pd in batches of 32, and with captions of the memory's
mean length (a random decoder never stops early; a trained one does). The image tower alone: the same batches of the same photographs decoded, preprocessed
and encoded in one thread, nothing else; and its forward pass alone on preprocessed images.

The memory holds real COCO captions as payloads; their vectors are random unit vectors (the
model is random anyway, and embedding 200k captions would take an hour on this CPU). Also
reported: each path's cosine to DeCap's exact whole-memory projection (FullMemory, float64),
the time to make and to open the vector copy, and peak memory of `ragcap caption` over
--memory-images images in a child process.

    python benchmarks/caption.py                      # full: 100 images, 200,000 captions
    python benchmarks/caption.py --images 8 --memory 5000 --memory-images 16 --prompt-images 0   # smoke run
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from open_clip.constants import OPENAI_DATASET_STD
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "coco"
PROMPT_K = 4  # SmallCap's retrieved captions per prompt
from procpeak import run_sampled  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from output import print_report
from ragcap.caption import DEFAULT_K, CaptionSettings, Captioner
from ragcap.decoders import DeCapConfig, DeCapDecoder, load_decoder
from ragcap.decoders.lm_prompt import PromptCaptioner, first_sentence, save_random_lm
from ragcap.embed import load_embedder, save_random
from ragcap.generation import SearchOptions
from ragcap.images import load_image
from ragcap.modes import PROMPT_SEARCH_FACTOR
from ragcap.retrieve import DEFAULT_TAU, ExactMemory, FullMemory, project_hits
from ragcap.store import open_store, point_id
from ragcap.util import chunks


def real_images(n: int) -> list[str]:
    files = sorted(str(p) for p in (SHARED / "images").glob("*.jpg"))
    if not files:
        sys.exit(f"no images under {SHARED / 'images'}: this benchmark needs ../shared")
    return [files[i % len(files)] for i in range(n)]


def unique_captions(n: int, path: Path = SHARED / "captions_val2014_by_image.json") -> list[str]:
    """The first n distinct COCO captions of a {image: [captions]} file, whitespace-normalised."""
    captions = [c for caps in json.loads(path.read_text(encoding="utf-8")).values() for c in caps]
    return list(dict.fromkeys(" ".join(c.split()) for c in captions))[:n]


def fill_memory(store, collection: str, info, n: int, seed: int = 0) -> list[str]:
    captions = unique_captions(n)
    rng = np.random.default_rng(seed)
    store.create(collection, info)
    for start in range(0, len(captions), 8192):
        chunk = captions[start : start + 8192]
        vectors = rng.standard_normal((len(chunk), info.dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.upsert(collection, [point_id(collection, c) for c in chunk], vectors, [{"caption": c} for c in chunk])
    store.optimize(collection)  # as `ragcap ingest` does at its end
    return captions


@torch.inference_mode()
def reference_caption(path: str, embedder, memory: torch.Tensor, decoder: DeCapDecoder) -> str:
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


@torch.inference_mode()
def reference_prompt_caption(path: str, embedder, store, prompter) -> str:
    """SmallCap's per-image procedure: encode one image, retrieve, one `generate` call."""
    query = embedder.encode_images([load_image(path)])
    hits = store.search("bench", query, PROMPT_K * PROMPT_SEARCH_FACTOR)[0]
    prompt = prompter.prompts([[h.payload["caption"] for h in hits]], k=PROMPT_K)[0]
    inputs = prompter.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(prompter.device)
    out = prompter.model.generate(**inputs, **prompter.generate_kwargs())
    return first_sentence(prompter.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def prompt_rates(paths, embedder, store, tmp: str, batch_size: int) -> dict:
    """`prompt` mode end to end (images/s) with a GPT-2-small-size LM (random weights, real tokenizer)."""
    tokenizer = ROOT.parent / "shared" / "models" / "gpt2-tokenizer"
    prompter = PromptCaptioner(str(save_random_lm(Path(tmp) / "gpt2", tokenizer)))
    captioner = Captioner(store, "bench", embedder, CaptionSettings(modes=("prompt",), batch_size=batch_size), prompter=prompter)
    reference_prompt_caption(paths[0], embedder, store, prompter)
    t0 = time.perf_counter()
    reference = [reference_prompt_caption(p, embedder, store, prompter) for p in paths]
    reference_rate = len(paths) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    batched = [r.caption for r in captioner.caption_images(paths)]
    rate = len(paths) / (time.perf_counter() - t0)
    return {"images": len(paths), "reference_images_per_s": round(reference_rate, 2), "ragcap_images_per_s": round(rate, 2),
            "speedup": round(rate / reference_rate, 2), "same_captions": sum(a == b for a, b in zip(reference, batched)) / len(paths)}


def tower_rates(embedder, paths: list[str], batch_size: int) -> tuple[float, float]:
    """Images/s of the image side alone, in the captioner's batches: decoded, preprocessed and
    encoded in one thread; and the encoder's forward pass alone, on images already preprocessed."""
    embedder.encode_images([load_image(p) for p in paths[:batch_size]])  # warm-up
    t0 = time.perf_counter()
    for chunk in chunks(paths, batch_size):
        embedder.encode_images([load_image(p) for p in chunk])
    whole = len(paths) / (time.perf_counter() - t0)
    prepared = [embedder.prepare_image(load_image(p)) for p in paths]
    t0 = time.perf_counter()
    for chunk in chunks(prepared, batch_size):
        embedder.encode_prepared(chunk)
    return whole, len(paths) / (time.perf_counter() - t0)


def draft_effect(embedder, paths: list[str]) -> dict:
    """JPEG draft mode on 4x enlarged copies of the photos (the shared ones are at most 640
    pixels, under the 448 where draft mode starts): decode + preprocess speed-up, and how far the
    preprocessed pixels (levels of 255) and the embeddings move."""
    large = []
    for path in paths:
        with Image.open(path) as im:
            encoded = io.BytesIO()
            im.convert("RGB").resize((im.width * 4, im.height * 4), Image.BICUBIC).save(encoded, "JPEG", quality=90)
            large.append(encoded.getvalue())
    timed = {}
    for draft in (None, embedder.draft_size):
        t0 = time.perf_counter()
        timed[draft] = [embedder.prepare_image(load_image(b, draft=draft)) for b in large]
        timed[draft, "s"] = time.perf_counter() - t0
    full, drafted = timed[None], timed[embedder.draft_size]
    levels = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1) * 255
    diffs = [float(((a - b).abs() * levels).mean()) for a, b in zip(full, drafted)]
    cosines = np.sum(embedder.encode_prepared(full) * embedder.encode_prepared(drafted), axis=1)
    return {"images": len(large), "speedup": round(timed[None, "s"] / timed[embedder.draft_size, "s"], 2),
            "pixel_levels_mean": round(float(np.mean(diffs)), 3), "pixel_levels_max": round(max(diffs), 3),
            "embedding_cosine_min": round(float(cosines.min()), 6)}


# ragcap before this work: Qdrant's top 1,024 with their vectors, images loaded in the calling thread.
BEFORE = {"memory": "qdrant", "load_workers": 0, "draft": False, "batch_size": 32}


def pd_rate(store, embedder, decoder, paths: list[str], **settings) -> float:
    captioner = Captioner(store, "bench", embedder, CaptionSettings(modes=("pd",), **settings), decoder=decoder)
    list(captioner.caption_images(paths[: captioner.settings.batch_size]))  # warm-up
    t0 = time.perf_counter()
    results = list(captioner.caption_images(paths))
    rate = len(paths) / (time.perf_counter() - t0)
    assert all(r.error is None for r in results)
    return rate


def peak_memory_of_cli(home: str, collection: str, decoder_dir: str, paths: list[str]) -> dict:
    """Peak memory (GB) of `ragcap caption` over the given images, in a child process: rss, the
    peak resident set; anon, peak private memory (without the ~0.65 GB of file-backed pages the
    CUDA build of torch maps whether or not a GPU is used)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as listing:
        listing.write("\n".join(paths))
    cmd = [sys.executable, "-m", "ragcap.cli", "caption", f"@{listing.name}", "-c", collection, "--mode", "pd",
           "--decoder", decoder_dir, "--format", "jsonl", "-o", os.devnull]
    run = run_sampled(cmd, {**os.environ, "RAGCAP_HOME": home})
    return {"rss": run["rss_gb"], "anon": run["anon_gb"], "seconds": run["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--reference-images", type=int, default=None, help="images for DeCap's slow per-image loop (default: --images)")
    parser.add_argument("--memory", type=int, default=200_000, help="captions in the collection")
    parser.add_argument("--memory-images", type=int, default=1000, help="images for the peak-memory run (0: skip)")
    parser.add_argument("--batch-size", type=int, default=CaptionSettings.batch_size, help="images per batch (ragcap's default)")
    parser.add_argument("--full-vocab", action="store_true", help="decoder over all 49408 CLIP ids (DeCap exactly)")
    parser.add_argument("--prompt-images", type=int, default=64, help="images for the prompt-mode comparison (0: skip)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 or int8 (ragcap.precision), for the tower and every captioner")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="ragcap-bench-")
    os.environ["RAGCAP_HOME"] = tmp
    os.environ["RAGCAP_PRECISION"] = args.precision  # the prompt LM and the CLI runs in children take it from here
    embedder = load_embedder(str(save_random("ViT-B-32", Path(tmp) / "vit-b-32")), args.device, image_only=True, precision=args.precision)
    store = open_store()
    t0 = time.perf_counter()
    captions = fill_memory(store, "bench", embedder.info, args.memory)
    fill_seconds = time.perf_counter() - t0
    # DeCap's size (4 layers, 4 heads, width 768) with the vocabulary `ragcap train-decoder`
    # gives it by default: the CLIP tokens of the memory's captions (see DeCapConfig.pruned_to).
    config = DeCapConfig(embed_dim=embedder.info.dim)
    if not args.full_vocab:
        config = config.pruned_to(captions)
    decoder_dir = str(DeCapDecoder(config, embedder.info).save(Path(tmp) / "decoder"))
    decoder = load_decoder(decoder_dir, embedder.device, args.precision)
    paths = real_images(args.images)

    t0 = time.perf_counter()
    ExactMemory(store, "bench")  # reads the collection and keeps the copy beside it
    cache_make_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ExactMemory(store, "bench", embedder.device)  # what every later run does
    cache_open_seconds = time.perf_counter() - t0

    memory = torch.from_numpy(FullMemory(store, "bench").vectors).to(embedder.device)
    reference_caption(paths[0], embedder, memory, decoder)  # warm-up both paths
    t0 = time.perf_counter()
    reference_paths = paths[: args.reference_images]
    for path in reference_paths:
        reference_caption(path, embedder, memory, decoder)
    reference_rate = len(reference_paths) / (time.perf_counter() - t0)
    del memory

    tower, forward = tower_rates(embedder, paths, args.batch_size)
    exact_rate = pd_rate(store, embedder, decoder, paths, batch_size=args.batch_size, memory="exact")
    topk_rate = pd_rate(store, embedder, decoder, paths, batch_size=args.batch_size, memory="qdrant")
    before_rate = pd_rate(store, embedder, decoder, paths, **BEFORE)
    batch_32_rate = pd_rate(store, embedder, decoder, paths, batch_size=32, memory="exact")
    # A random decoder never writes <end_of_text>, so every caption above runs the full 20 tokens;
    # a trained one stops where captions stop. Capping at the memory's mean caption length (plus
    # the end token) costs what that would: greedy decoding drops each row once it has stopped.
    caption_tokens = round(float(np.mean([len(decoder.tokenizer.encode(c)) for c in captions[:20000]]))) + 1
    coco_length_rate = pd_rate(store, embedder, decoder, paths, batch_size=args.batch_size, memory="exact",
                               search=SearchOptions(max_tokens=caption_tokens))
    draft = draft_effect(embedder, paths[:16])

    queries = embedder.encode_images([load_image(p) for p in paths[:20]])
    full = FullMemory(store, "bench").project(queries, DEFAULT_TAU)
    hits = store.search("bench", queries, DEFAULT_K, with_vectors=True)
    topk = np.stack([project_hits(h, DEFAULT_TAU) for h in hits])
    exact = ExactMemory(store, "bench", embedder.device).search(queries, tau=DEFAULT_TAU)[2]
    topk_cosines, exact_cosines = np.sum(topk * full, axis=1), np.sum(exact * full, axis=1)
    prompt = prompt_rates(paths[: args.prompt_images], embedder, store, tmp, args.batch_size) if args.prompt_images else None
    store.close()

    peak = making = None
    if args.memory_images:
        peak = peak_memory_of_cli(tmp, "bench", decoder_dir, real_images(args.memory_images))
        shutil.rmtree(Path(tmp) / "collections" / "bench" / "cache")  # the first run after an ingest makes it
        making = peak_memory_of_cli(tmp, "bench", decoder_dir, real_images(args.memory_images))
    report = {
        "images": len(paths),
        "memory_captions": args.memory,
        "memory_fill_seconds": round(fill_seconds, 1),
        "cache_make_seconds": round(cache_make_seconds, 2),
        "cache_open_seconds": round(cache_open_seconds, 3),
        "reference_images_per_s": round(reference_rate, 2),
        "tower_images_per_s": round(tower, 2),
        "tower_forward_only_images_per_s": round(forward, 2),
        "ragcap_pd_images_per_s": round(exact_rate, 2),
        "ragcap_pd_qdrant_topk_images_per_s": round(topk_rate, 2),
        "ragcap_pd_before_images_per_s": round(before_rate, 2),
        "pd_vs_tower": round(exact_rate / tower, 2),
        "ragcap_pd_batch_32_images_per_s": round(batch_32_rate, 2),
        "pd_batch_vs_batch_32": round(exact_rate / batch_32_rate, 2),
        "mean_caption_tokens_with_end": caption_tokens,
        "ragcap_pd_caption_length_images_per_s": round(coco_length_rate, 2),
        "pd_caption_length_vs_tower": round(coco_length_rate / tower, 2),
        "pd_caption_length_vs_tower_forward_only": round(coco_length_rate / forward, 2),
        "pd_vs_tower_forward_only": round(exact_rate / forward, 2),
        "pd_qdrant_topk_vs_tower": round(topk_rate / tower, 2),
        "pd_before_vs_tower": round(before_rate / tower, 2),
        "pd_vs_before": round(exact_rate / before_rate, 2),
        "jpeg_draft_on_4x_photos": draft,
        "speedup": round(exact_rate / reference_rate, 2),
        "k": DEFAULT_K,
        "cosine_exact_vs_full_min": round(float(exact_cosines.min()), 7),
        "cosine_topk_vs_full_min": round(float(topk_cosines.min()), 6),
        "cosine_topk_vs_full_mean": round(float(topk_cosines.mean()), 6),
        "peak_gb_caption_cli": peak,
        "peak_gb_caption_cli_making_the_copy": making,
        "peak_run_images": args.memory_images,
        "decoder_vocab": decoder.config.vocab_size,
        "prompt_mode": prompt,
        "device": str(embedder.device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }
    print_report(report, args.json)
    shutil.rmtree(tmp, ignore_errors=True)  # a ViT-B-32 and the memory: over a GB


if __name__ == "__main__":
    main()
