"""SmallCap-style prompting, LM part only: ragcap's batched caption() vs a per-image generate loop.

Both sides use the same model, prompts (real COCO val2017 captions as neighbours) and generation
settings (beam 3, <= 25 new tokens, KV cache); the loop is the straightforward SmallCap usage
(infer.py evaluates RAG models one image at a time). Image encoding and retrieval are NOT
measured here. By default the LM is GPT-2 small's shape with random weights and the real GPT-2
tokenizer, so prompt lengths and compute match GPT-2 while no download is needed; random weights
rarely emit '.', so nearly every caption runs the full 25 tokens (worst case for both sides).

    python benchmarks/prompt.py --n 256 --json
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from ragcap.decoders.lm_prompt import PromptCaptioner, first_sentence, save_random_lm
from ragcap.generation import SearchOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def coco_neighbours(path: Path, n: int) -> list[list[str]]:
    """Each of the first n images' COCO captions (5-7), standing in for retrieved neighbours."""
    by_image = collections.defaultdict(list)
    for ann in json.loads(path.read_text())["annotations"]:
        by_image[ann["image_id"]].append(ann["caption"])
    images = [by_image[i] for i in sorted(by_image)][:n]
    if len(images) < n:
        raise SystemExit(f"{path} has only {len(images)} images; use --n {len(images)} or less")
    return images


@torch.inference_mode()
def per_image_loop(captioner: PromptCaptioner, neighbours, k, beam_size, max_new_tokens) -> list[str]:
    tokenizer, model = captioner.tokenizer, captioner.model
    kwargs = {**captioner.generate_kwargs(), "num_beams": beam_size, "max_new_tokens": max_new_tokens}
    captions = []
    for prompt in captioner.prompts(neighbours, k=k):
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(captioner.device)
        out = model.generate(**inputs, **kwargs)
        captions.append(first_sentence(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)))
    return captions


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="images (neighbour lists) to caption")
    parser.add_argument("--small", action="store_true", help="quick check: --n 8")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=25)
    parser.add_argument("--lm", help="a saved causal LM dir (default: random GPT-2 small + real tokenizer)")
    parser.add_argument("--tokenizer-dir", type=Path, default=SHARED / "models" / "gpt2-tokenizer")
    parser.add_argument("--captions", type=Path, default=SHARED / "data" / "coco" / "captions_val2017.json")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.small:
        args.n = 8
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()

    neighbours = coco_neighbours(args.captions, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        lm = args.lm or str(save_random_lm(Path(tmp) / "gpt2-random", args.tokenizer_dir))
        captioner = PromptCaptioner(lm, device=args.device, batch_size=args.batch_size)
    settings = dict(k=args.k, beam_size=args.beam_size, max_new_tokens=args.max_new_tokens)

    options = SearchOptions(beam=args.beam_size, max_tokens=args.max_new_tokens)
    captioner.generate(neighbours[:2], k=args.k, options=options)  # warm-up: allocator, kernels, lazy init
    loop, loop_s = timed(lambda: per_image_loop(captioner, neighbours, **settings))
    batched, batched_s = timed(lambda: captioner.generate(neighbours, k=args.k, options=options))

    config = captioner.model.config
    result = {
        "benchmark": "prompt-lm",
        "scope": "LM only (prompt building + beam search); image encoding and retrieval excluded",
        "n": args.n,
        "lm": args.lm or "random GPT-2 small shape + real GPT-2 tokenizer",
        "n_layer": config.n_layer,
        "n_embd": config.n_embd,
        **settings,
        "batch_size": args.batch_size,
        "device": str(captioner.device),
        "threads": torch.get_num_threads(),
        "loop_items_per_s": args.n / loop_s,
        "batched_items_per_s": args.n / batched_s,
        "speedup": loop_s / batched_s,
        "same_captions": sum(a == b for a, b in zip(loop, batched)) / args.n,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:22} {value:.3f}" if isinstance(value, float) else f"{key:22} {value}")


if __name__ == "__main__":
    main()
