"""ClipCap inference: ragcap's batched, KV-cached captioning vs the repository's procedure.

The reference follows rmokady/CLIP_prefix_caption's predict.py, re-implemented here: one image at
a time (load, CLIP-encode, map to the prefix), then its decoding, which re-runs GPT-2 over the
whole sequence at every step (no KV cache) for at most 67 tokens, stopping at '.':
generate2 (greedy: its top-p 0.8 filter never removes the argmax) and generate_beam (5 beams,
ranked by mean log-prob). ragcap: `caption --mode vd` in batches of 32 (the Captioner).

Both sides use the same models: an MLP mapping (prefix 10) over GPT-2 small's shape with random
weights and the real tokenizer, and ViT-B-32's image tower with random weights, on real COCO
photographs. Random weights hardly ever write '.', so captions run to the 67-token cap: the worst
case for both sides. Greedy captions must be identical; ClipCap's beam search is not
transformers' (ragcap's), so beam captions are compared for information only.

Also measured: ClipCap training throughput (captions/s, MLP mapping) with GPT-2 frozen and trained.

    python benchmarks/clipcap.py --json
    python benchmarks/clipcap.py --device cuda --n 256 --n-reference 16 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from ragcap.caption import CaptionSettings, Captioner
from ragcap.decoders import ClipCapConfig, ClipCapDecoder
from ragcap.decoders.lm import load_causal_lm
from ragcap.decoders.lm_prompt import save_random_lm
from ragcap.embed import load_embedder, save_random
from ragcap.generation import SearchOptions
from ragcap.images import load_image
from ragcap.train import ClipCapTrainConfig, train_decoder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ENTRY_LENGTH = 67  # ClipCap's entry_length


@torch.inference_mode()
def reference_greedy(decoder: ClipCapDecoder, prefix: torch.Tensor) -> list[int]:
    """ClipCap's generate2 for one prefix (1, P, w): the whole sequence through GPT-2 per token."""
    embed = decoder.lm.get_input_embeddings()
    sequence, tokens = prefix, []
    for _ in range(ENTRY_LENGTH):
        token = int(decoder.lm(inputs_embeds=sequence).logits[0, -1].argmax())
        tokens.append(token)
        if token == decoder.stop_id:
            break
        sequence = torch.cat([sequence, embed(torch.tensor([[token]], device=prefix.device))], dim=1)
    return tokens


@torch.inference_mode()
def reference_beam(decoder: ClipCapDecoder, prefix: torch.Tensor, beams: int = 5) -> list[int]:
    """ClipCap's generate_beam for one prefix: every beam keeps its slot after its '.', extended by
    token 0 at no cost and no length; beams are ranked by summed log-prob / length; no KV cache."""
    embed = decoder.lm.get_input_embeddings()
    device = prefix.device
    logp = decoder.lm(inputs_embeds=prefix).logits[0, -1].log_softmax(-1)
    sums, first = logp.topk(beams)
    tokens = first.unsqueeze(1)
    lengths = torch.ones(beams, device=device)
    stopped = first == decoder.stop_id
    sequence = torch.cat([prefix.expand(beams, -1, -1), embed(first).unsqueeze(1)], dim=1)
    for _ in range(ENTRY_LENGTH - 1):
        if bool(stopped.all()):
            break
        logp = decoder.lm(inputs_embeds=sequence).logits[:, -1].log_softmax(-1)
        logp[stopped] = -float("inf")
        logp[stopped, 0] = 0.0
        lengths = lengths + (~stopped).float()
        mean, index = ((sums.unsqueeze(1) + logp) / lengths.unsqueeze(1)).view(-1).topk(beams)
        source, token = index // logp.shape[1], index % logp.shape[1]
        lengths, stopped = lengths[source], stopped[source] | (token == decoder.stop_id)
        sums = mean * lengths
        tokens = torch.cat([tokens[source], token.unsqueeze(1)], dim=1)
        sequence = torch.cat([sequence[source], embed(token).unsqueeze(1)], dim=1)
    best = int((sums / lengths).argmax())
    return tokens[best, : int(lengths[best])].tolist()


def reference(decoder: ClipCapDecoder, embedder, paths: list[str], search) -> list[str]:
    """The repository's per-image loop; captions without the final '.', as ragcap returns them."""
    captions = []
    for path in paths:
        vector = torch.from_numpy(embedder.encode_images([load_image(path)]))
        tokens = search(decoder, decoder.prefix_embeds(vector))
        captions.append(decoder.detokenize(tokens[:-1] if tokens and tokens[-1] == decoder.stop_id else tokens))
    return captions


def ragcap_captions(decoder: ClipCapDecoder, embedder, paths: list[str], options: SearchOptions, batch_size: int) -> list[str]:
    settings = CaptionSettings(modes=("vd",), search=options, batch_size=batch_size)
    captioner = Captioner(None, "", embedder, settings, decoder=decoder)  # vd reads no memory
    return [result.caption for result in captioner.caption_images(paths)]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def training_rate(lm_dir: Path, embed_dim: int, captions: list[str], train_lm: bool, batch_size: int, device: str | None) -> float:
    """Captions/s of one epoch of train_decoder (MLP mapping), held-out loss and saving excluded."""
    vectors = np.random.default_rng(0).standard_normal((len(captions), embed_dim)).astype(np.float32)
    from ragcap.embedder_info import EmbedderInfo

    config = ClipCapTrainConfig(lm=str(lm_dir), train_lm=train_lm, epochs=1, batch_size=batch_size, val_fraction=0, device=device)
    steps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        train_decoder(captions, vectors, EmbedderInfo("random:ViT-B-32", embed_dim), out, config,
                      progress=lambda step, total, loss: steps.append(time.perf_counter()))
    # From the end of the first step (warm-up: allocation, lazy init) to the end of the last.
    return batch_size * (len(steps) - 1) / (steps[-1] - steps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="images ragcap captions (one batch by default)")
    parser.add_argument("--n-reference", type=int, default=4, help="images the greedy reference captions (it is slow)")
    parser.add_argument("--n-beam-reference", type=int, default=2, help="images the beam reference captions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-captions", type=int, default=120, help="captions per training measurement")
    parser.add_argument("--train-batch-size", type=int, default=40, help="ClipCap's batch size")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "coco" / "images")
    parser.add_argument("--captions", type=Path, default=SHARED / "data" / "coco" / "captions_val2017.json")
    parser.add_argument("--tokenizer-dir", type=Path, default=SHARED / "models" / "gpt2-tokenizer")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-train", action="store_true", help="skip the training measurement")
    parser.add_argument("--small", action="store_true", help="quick check: a 2-layer LM of width 128, 8 images, 80 training captions")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    lm_shape = {}
    if args.small:
        args.n, args.n_reference, args.n_beam_reference, args.train_captions = 8, 2, 1, 80
        lm_shape = dict(n_layer=2, n_embd=128, n_head=2)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    paths = sorted(str(p) for p in args.images.glob("*.jpg"))[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"{args.images} has only {len(paths)} images; use --n {len(paths)} or less")
    with tempfile.TemporaryDirectory() as tmp:
        lm_dir = save_random_lm(Path(tmp) / "gpt2", args.tokenizer_dir, **lm_shape)  # default: GPT-2 small's shape
        embedder = load_embedder(str(save_random("ViT-B-32", Path(tmp) / "clip")), args.device, image_only=True)
        tokenizer, lm = load_causal_lm(lm_dir)
        torch.manual_seed(0)
        decoder = ClipCapDecoder(ClipCapConfig(embed_dim=embedder.info.dim), embedder.info, lm, tokenizer)
        decoder.to(embedder.device).eval()

        ragcap_captions(decoder, embedder, paths[:2], SearchOptions(), 2)  # warm-up: allocator, kernels, lazy init
        result: dict = {"benchmark": "clipcap", "n": args.n, "batch_size": args.batch_size, "device": str(decoder.device),
                        "lm": {k: getattr(lm.config, k) for k in ("n_layer", "n_embd", "n_head", "vocab_size")}}
        for name, options, search, n_ref in (("greedy", SearchOptions(), reference_greedy, args.n_reference),
                                             ("beam5", SearchOptions(beam=5), reference_beam, args.n_beam_reference)):
            ours, ours_s = timed(lambda: ragcap_captions(decoder, embedder, paths, options, args.batch_size))
            theirs, theirs_s = timed(lambda: reference(decoder, embedder, paths[:n_ref], search))
            result[name] = {
                "reference_images_per_s": n_ref / theirs_s,
                "ragcap_images_per_s": args.n / ours_s,
                "speedup": (args.n / ours_s) / (n_ref / theirs_s),
                "same_captions": sum(a == b for a, b in zip(ours, theirs)) / n_ref,
                "reference_images": n_ref,
            }

        if not args.no_train:
            annotations = json.loads(args.captions.read_text())["annotations"]
            captions = [a["caption"] for a in annotations[: args.train_captions]]
            result["train_captions_per_s"] = {
                "frozen_lm": training_rate(lm_dir, embedder.info.dim, captions, False, args.train_batch_size, args.device),
                "trained_lm": training_rate(lm_dir, embedder.info.dim, captions, True, args.train_batch_size, args.device),
                "captions": len(captions), "batch_size": args.train_batch_size,
            }
    result.update(threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), cpu=platform.processor() or platform.machine())
    if args.json:
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
