"""An imported DeCap decoder on ragcap's pd path vs DeCap's own per-image procedure, same weights.

A state dict in the layout and size of DeCap's published coco_prefix-009.pt (a GPT2LMHeadModel of
4 layers, 4 heads, width 768, 50257 vocabulary rows, 1024 positions, plus a 512 -> 768 linear
prefix layer) with random weights is saved with torch.save, imported with `ragcap models import
decap`, and loaded as any decoder. Rows 49408 and up of the output layer are no CLIP token;
training never targets them, so a trained decoder gives them low logits. The random weights get
that too (a constant feature pushes those logits ~4 below the rest), so that DeCap's procedure,
which takes the argmax over all 50257 rows, never picks one (it would then fail to detokenise and
answer 'None'); the count of such picks is reported.

Both run in this process on the same real photographs and random ViT-B-32, over the same memory
(real COCO captions as payloads, random unit vectors). The reference is DeCap's inference
procedure: one image at a time, the softmax over the whole memory, the prefix alone into the
decoder, greedy decoding that re-runs the whole sequence at every step, at most 30 tokens, stop
at <end_of_text>. ragcap: `Captioner` in batches, KV-cached batched greedy decoding, with the
exact whole-memory projection (--memory exact, so the prefixes are DeCap's and the captions must
be identical), and with its default top-k projection.

    python benchmarks/decap_import.py --json                  # 32 images, 20,000 captions
    python benchmarks/decap_import.py --images 4 --memory 2000  # smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from caption import fill_memory, real_images  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from output import print_report
from ragcap.caption import CaptionSettings, Captioner
from ragcap.decoders import load_decoder
from ragcap.embed import load_embedder, save_random
from ragcap.images import load_image
from ragcap.importers.decap import import_decap
from ragcap.retrieve import DEFAULT_TAU, FullMemory
from ragcap.store import open_store

CLIP_VOCAB, EOT, ENTRY_LENGTH = 49408, 49407, 30


class PublishedDeCap(torch.nn.Module):
    """DeCap's model at its published size (names as its train.py has them), random weights."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=4, n_head=4))
        self.clip_project = torch.nn.Module()
        self.clip_project.model = torch.nn.Sequential(torch.nn.Linear(512, 768))
        with torch.no_grad():  # feature 0 of the final norm's output is a constant 4; untrained rows weigh it -1
            self.decoder.transformer.ln_f.bias[0] = 4.0
            self.decoder.transformer.wte.weight[CLIP_VOCAB:, 0] = -1.0

    @torch.inference_mode()
    def decode(self, prefix: torch.Tensor) -> tuple[str, list[int]]:
        """DeCap's Decoding of one unit prefix (1, 512): no KV cache, argmax over every row."""
        embeds, tokens = self.clip_project.model(prefix).reshape(1, 1, -1), []
        for _ in range(ENTRY_LENGTH):
            token = int(self.decoder(inputs_embeds=embeds).logits[0, -1].argmax())
            tokens.append(token)
            if token == EOT:
                break
            embeds = torch.cat([embeds, self.decoder.transformer.wte(torch.tensor([[token]]))], dim=1)
        if max(tokens) >= CLIP_VOCAB:
            return "None", tokens  # what DeCap answers when its tokenizer cannot decode an id
        text = SimpleTokenizer().decode(tokens).replace("<|startoftext|>", "").replace("<|endoftext|>", "")
        return " ".join(text.split()), tokens


@torch.inference_mode()
def reference_caption(path: str, embedder, memory: torch.Tensor, model: PublishedDeCap) -> tuple[str, list[int]]:
    image = embedder.preprocess(load_image(path)).unsqueeze(0).to(embedder.device)
    v = embedder.model.encode_image(image).float()
    v = v / v.norm(dim=-1, keepdim=True)
    prefix = torch.softmax((v @ memory.T) / DEFAULT_TAU, dim=-1) @ memory
    return model.decode(prefix / prefix.norm(dim=-1, keepdim=True))


def rate(run, n: int) -> tuple[float, list]:
    started = time.perf_counter()
    out = run()
    return n / (time.perf_counter() - started), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--memory", type=int, default=20_000, help="captions in the collection")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ragcap-bench-"))
    os.environ["RAGCAP_HOME"] = str(tmp)
    embedder = load_embedder(str(save_random("ViT-B-32", tmp / "vit-b-32")), image_only=True)
    store = open_store()
    fill_memory(store, "bench", embedder.info, args.memory)
    published = PublishedDeCap().eval()
    torch.save(published.state_dict(), tmp / "coco_prefix-009.pt")
    decoder = load_decoder(import_decap(tmp / "coco_prefix-009.pt", tmp / "decoder", model=str(tmp / "vit-b-32")))
    paths = real_images(args.images)

    memory = torch.from_numpy(FullMemory(store, "bench").vectors)
    reference_caption(paths[0], embedder, memory, published)  # warm-up
    reference_rate, reference = rate(lambda: [reference_caption(p, embedder, memory, published) for p in paths], len(paths))

    results = {}
    for name, settings in (("exact", CaptionSettings(modes=("pd",), batch_size=args.batch_size, memory="exact")),
                           ("topk", CaptionSettings(modes=("pd",), batch_size=args.batch_size))):
        captioner = Captioner(store, "bench", embedder, settings, decoder=decoder)
        list(captioner.caption_images(paths[: min(4, len(paths))]))  # warm-up
        results[name] = rate(lambda: [r.caption for r in captioner.caption_images(paths)], len(paths))
    store.close()

    report = {
        "images": len(paths),
        "memory_captions": args.memory,
        "reference_images_per_s": round(reference_rate, 3),
        "ragcap_exact_pd_images_per_s": round(results["exact"][0], 3),
        "speedup_exact": round(results["exact"][0] / reference_rate, 2),
        "identical_captions_exact": sum(a == b for (a, _), b in zip(reference, results["exact"][1])),
        "ragcap_topk_pd_images_per_s": round(results["topk"][0], 3),
        "speedup_topk": round(results["topk"][0] / reference_rate, 2),
        "identical_captions_topk": sum(a == b for (a, _), b in zip(reference, results["topk"][1])),
        "reference_none_answers": sum(text == "None" for text, _ in reference),
        "mean_tokens_per_caption": round(sum(len(t) for _, t in reference) / len(reference), 1),
        "threads": torch.get_num_threads(),
    }
    print_report(report, args.json)


if __name__ == "__main__":
    main()
