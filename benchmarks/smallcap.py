"""SmallCap inference: ragcap's batched, KV-cached captioning vs the repository's procedure, and
training throughput.

The reference is SmallCap's infer.py (evaluate_rag_model), re-implemented here: one image at a
time (encode it, write its prompt, one transformers `generate` call: 3 beams, at most 25 new
tokens, length_penalty 0, '.' as end of text; "RAG models can only be evaluated with a batch of
length 1"). ragcap: SmallCapDecoder.encode_patches + caption over batches of images, its own
beam search with the cross-attention keys and values cached once per image.

Both sides run the same models: a GPT-2 small-shaped LM with random weights and the real
tokenizer, SmallCap7M's cross-attention (768 / 4), and ViT-B-32's image tower (random weights)
for the 50 x 768 patch features of real COCO photographs. Each image's retrieved captions are
four human captions of other photographs (retrieval is not timed: SmallCap reads precomputed
retrievals too). Random weights rarely write '.', so captions run to the 25-token cap: the worst
case for both. Captions must be identical.

Also measured: training steps/s of train-smallcap's loop (frozen GPT-2; SmallCap's batch is 64),
and the process's peak resident memory after each phase.

    python benchmarks/smallcap.py --json
    python benchmarks/smallcap.py --small --json     # a quick check with a 2-layer LM
    python benchmarks/smallcap.py --device cuda --n 256 --batch-size 64 --n-reference 16 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ragcap.decoders.lm_prompt import SMALLCAP_GENERATE, save_random_lm
from ragcap.decoders.smallcap import SmallCapConfig, SmallCapDecoder, SmallCapInput, cross_attention_lm
from ragcap.decoders.tokenizers import load_gpt2_tokenizer
from ragcap.embed import load_embedder, save_random
from ragcap.images import load_image
from ragcap.smallcap_train import SmallCapExamples
from ragcap.train import SmallCapTrainConfig, train_decoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def peak_rss_gb() -> float:
    """This process's peak resident set so far (VmHWM), in GB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1e6


def reset_peak() -> None:
    try:  # Linux: writing 5 resets VmHWM to the current resident set
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


@torch.inference_mode()
def reference(decoder: SmallCapDecoder, paths: list[str], neighbours: list[list[str]]) -> list[str]:
    """SmallCap's evaluate_rag_model: per image, encode, prompt, one generate call."""
    kwargs = dict(SMALLCAP_GENERATE, eos_token_id=decoder.stop_id, pad_token_id=decoder.stop_id)
    captions = []
    for path, caps in zip(paths, neighbours):
        patches = decoder.encode_patches([load_image(path)]).to(decoder.device)
        ids = torch.tensor(decoder.prompt_ids([caps]), device=decoder.device)
        out = decoder.lm.generate(ids, encoder_hidden_states=patches, attention_mask=torch.ones_like(ids), **kwargs)[0, ids.shape[1] :].tolist()
        captions.append(decoder.detokenize(out[: out.index(decoder.stop_id)] if decoder.stop_id in out else out))
    return captions


def ragcap_captions(decoder: SmallCapDecoder, paths: list[str], neighbours: list[list[str]], batch_size: int) -> list[str]:
    """What `caption --mode smallcap` runs per batch once the neighbours are retrieved."""
    captions = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        cond = SmallCapInput(decoder.encode_patches(images), neighbours[start : start + batch_size])
        captions += decoder.generate(cond)
    return captions


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def training_rate(lm_dir: Path, decoder: SmallCapDecoder, captions: list[str], prompts: list[list[int]], batch_size: int, device) -> float:
    """Steps/s of one epoch of train_decoder (random 50 x 768 patches), saving excluded."""
    n = len(captions)
    examples = SmallCapExamples(torch.randn(n, 50, decoder.config.encoder_width), torch.arange(n), prompts)
    config = SmallCapTrainConfig(lm=str(lm_dir), epochs=1, batch_size=batch_size, val_fraction=0, device=device,
                                 encoder_width=decoder.config.encoder_width, retrieval_spec="random:ViT-B-32", retrieval_dim=512)
    steps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train_decoder(captions, examples, decoder.embedder, out, config, progress=lambda step, total, loss: steps.append(time.perf_counter()))
    return (len(steps) - 1) / (steps[-1] - steps[0])  # from the end of the first step (warm-up) to the end of the last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="images ragcap captions")
    parser.add_argument("--n-reference", type=int, default=4, help="images the reference captions (it is slow)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-captions", type=int, default=192, help="captions per training measurement")
    parser.add_argument("--train-batch-size", type=int, default=64, help="SmallCap's batch size")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "coco" / "images")
    parser.add_argument("--tokenizer-dir", type=Path, default=SHARED / "models" / "gpt2-tokenizer")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-train", action="store_true", help="skip the training measurement")
    parser.add_argument("--small", action="store_true", help="quick check: a 2-layer LM of width 128, 4 images")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    lm_shape = {}
    if args.small:
        args.n, args.n_reference, args.batch_size, args.train_captions = 4, 2, 4, 128
        lm_shape = dict(n_layer=2, n_embd=128, n_head=2)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    rows = [json.loads(line) for line in (args.images / "manifest.jsonl").read_text().splitlines()]
    if len(rows) < args.n + 4:
        raise SystemExit(f"{args.images} has only {len(rows)} images; use --n {len(rows) - 4} or less")
    paths = [str(args.images / r["file"]) for r in rows[: args.n]]
    neighbours = [[rows[i + j]["references"][0] for j in range(1, 5)] for i in range(args.n)]  # four other photographs' captions
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir = save_random_lm(Path(tmp) / "gpt2", args.tokenizer_dir, **lm_shape)  # default: GPT-2 small's shape
        encoder = load_embedder(str(save_random("ViT-B-32", Path(tmp) / "clip")), args.device, image_only=True)
        width = encoder.model.visual.transformer.width
        config = SmallCapConfig(encoder_width=width, cross_attention_width=768 // 4 if not args.small else 32,
                                retrieval_spec=encoder.info.spec, retrieval_dim=encoder.info.dim)
        torch.manual_seed(0)
        decoder = SmallCapDecoder(config, encoder.info, cross_attention_lm(lm_dir, config), load_gpt2_tokenizer(lm_dir))
        decoder.to(encoder.device).eval()

        ragcap_captions(decoder, paths[:2], neighbours[:2], 2)  # warm-up: allocator, kernels, lazy init
        result: dict = {"benchmark": "smallcap", "n": args.n, "batch_size": args.batch_size, "device": str(decoder.device),
                        "lm": {k: getattr(decoder.lm.config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")},
                        "cross_attention_width": config.cross_attention_width, "patches": [50, width], "rss_gb_models": peak_rss_gb()}
        reset_peak()
        ours, ours_s = timed(lambda: ragcap_captions(decoder, paths, neighbours, args.batch_size))
        rss_ours = peak_rss_gb()
        reset_peak()
        theirs, theirs_s = timed(lambda: reference(decoder, paths[: args.n_reference], neighbours[: args.n_reference]))
        result["beam3"] = {
            "reference_images_per_s": args.n_reference / theirs_s,
            "ragcap_images_per_s": args.n / ours_s,
            "speedup": (args.n / ours_s) / (args.n_reference / theirs_s),
            "same_captions": sum(a == b for a, b in zip(ours, theirs)) / args.n_reference,
            "reference_images": args.n_reference,
            "peak_rss_gb": {"ragcap": rss_ours, "reference": peak_rss_gb()},
        }
        if not args.no_train:
            captions = [c for r in rows for c in r["references"]][: args.train_captions]
            prompts = decoder.prompt_ids([neighbours[i % args.n] for i in range(len(captions))])
            reset_peak()
            steps_per_s = training_rate(lm_dir, decoder, captions, prompts, args.train_batch_size, args.device)
            result["train"] = {"steps_per_s": steps_per_s, "captions_per_s": steps_per_s * args.train_batch_size,
                               "batch_size": args.train_batch_size, "captions": len(captions), "peak_rss_gb": peak_rss_gb()}
    result.update(threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), cpu=platform.processor() or platform.machine())
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
