"""Long-CLIP: knowledge-preserved stretching, checkpoint import, primary component matching, long captions end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from ragcap import embed
from ragcap.embed import load_embedder
from ragcap.errors import ModelError, OptionError, RagcapWarning, SourceError
from ragcap.importers import import_model
from ragcap.importers.longclip import match_architecture
from ragcap.longclip import stretch_model, stretch_positions
from ragcap.longclip_train import FinetuneConfig, finetune_longclip, pca_reconstruct, read_triples
from tests.helpers import hub_cache, make_tiny_clip
from tests.test_cli import ragcap


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny 77-token CLIP and its 248-token stretch."""
    root = tmp_path_factory.mktemp("longclip")
    short = make_tiny_clip(root / "short", seed=7)
    return short, stretch_model(str(short), root / "long")


def words(n: int, seed: int = 0) -> str:
    """A caption of n CLIP tokens (n - 2 single-token words plus start and end)."""
    vocabulary = "red blue green dog cat car tree house river hill sky cloud boat bird man woman road".split()
    return " ".join(np.random.default_rng(seed).choice(vocabulary, n - 2))


# -- knowledge-preserved stretching


def interpolated(table: np.ndarray, context: int, keep: int = 20) -> np.ndarray:
    """Long-CLIP's stretch as piecewise-linear interpolation: new position p >= keep reads the old
    table at keep + (p - keep) / ratio, the last segment continuing the slope before it."""
    ratio = (context - keep) // (len(table) - keep)
    extended = np.concatenate([table, 2 * table[-1:] - table[-2:-1]])  # one row past the end, on the line
    where = keep + (np.arange(keep, context) - keep) / ratio
    tail = np.stack([np.interp(where, np.arange(len(extended)), column) for column in extended.T], axis=1)
    return np.concatenate([table[:keep], tail])


@pytest.mark.parametrize("context", [248, 134, 305])
def test_stretched_table_equals_an_independent_interpolation(context):
    table = torch.randn(77, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stretched = stretch_positions(table, context)
    assert stretched.shape == (context, 16)
    np.testing.assert_allclose(stretched.numpy(), interpolated(table.numpy(), context), rtol=0, atol=1e-12)
    assert torch.equal(stretched[:20], table[:20])  # kept exactly


def test_long_clip_stretch_keeps_every_old_position_exactly():
    table = torch.randn(77, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(stretch_positions(table, 248)[20::4], table[20:])  # ratio 4: each old row lands on itself


@pytest.mark.parametrize("context, message", [
    (77, "already reads 77 tokens"),
    (64, "already reads 77 tokens"),
    (200, r"200 is not a stretch of 77: .* 20 \+ r x 57: 134, 191, 248, 305"),
])
def test_a_context_that_is_not_a_stretch_is_refused(tiny_pair, tmp_path, context, message):
    with pytest.raises(ModelError, match=message):
        stretch_model(str(tiny_pair[0]), tmp_path / "out", context=context)
    assert not (tmp_path / "out" / embed.CONFIG_NAME).exists()
    result = ragcap("models", "stretch", tiny_pair[0], tmp_path / "cli", "--context", context, ok=False)
    assert result.exit_code == 1 and "ragcap: error:" in result.output


def test_stretched_model_loads_and_short_captions_embed_exactly_as_before(tiny_pair, tmp_path):
    short_dir, _ = tiny_pair
    out = Path(ragcap("models", "stretch", short_dir, tmp_path / "m", "--context", "248").stdout.strip())
    config = json.loads((out / embed.CONFIG_NAME).read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 248
    assert config["ragcap"]["stretch"] == {"method": "Long-CLIP knowledge-preserved stretching", "source": f"local:{short_dir}",
                                           "from_context": 77, "context": 248, "keep": 20, "ratio": 4}
    before, after = load_embedder(str(short_dir), "cpu"), load_embedder(str(out), "cpu")
    assert after.context_length == 248

    upto_20 = [words(n, n) for n in (3, 10, 20)]  # start + words + end <= 20 positions
    assert np.array_equal(before.encode_text(upto_20).vectors, after.encode_text(upto_20).vectors)
    longer = [words(21, 1), words(60, 2)]  # reach the interpolated positions
    assert np.abs(before.encode_text(longer).vectors - after.encode_text(longer).vectors).max() > 1e-3

    captions = [words(100, 3), "a dog", words(300, 4)]
    cut, padded = after.encode_text(captions), after.model.encode_text(after.tokenizer(captions), normalize=True)
    assert np.abs(cut.vectors - padded.detach().numpy()).max() <= 1e-5  # the length-cut path at 248
    assert cut.truncated.tolist() == [False, False, True] and cut.lengths.tolist() == [100, 4, 300]
    assert before.encode_text(captions).truncated.tolist() == [True, False, True]

    photo = [Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))]
    assert np.array_equal(before.encode_images(photo), after.encode_images(photo))  # image tower untouched
    assert np.array_equal(load_embedder(str(out), "cpu", image_only=True).encode_images(photo), after.encode_images(photo))


def test_custom_text_towers_stretch_too_and_bidirectional_ones_are_refused(tmp_path):
    source = make_tiny_clip(tmp_path / "custom", seed=3, custom_text=True)  # open_clip's "text." layout
    before, after = load_embedder(str(source), "cpu"), load_embedder(str(stretch_model(str(source), tmp_path / "long")), "cpu")
    assert after.context_length == 248
    assert np.array_equal(before.encode_text([words(15)]).vectors, after.encode_text([words(15)]).vectors)
    bidirectional = make_tiny_clip(tmp_path / "siglip-like", seed=3, custom_text=True,
                                   text_cfg={"no_causal_mask": True, "pool_type": "last"})
    with pytest.raises(ModelError, match="needs a causal CLIP text tower"):
        stretch_model(str(bidirectional), tmp_path / "refused")


def test_a_long_querys_tail_reaches_only_the_stretched_model(tiny_pair):
    """Two 150-token descriptions that differ only after token 100: a 77-token model embeds both
    to the same vector (the tail is cut, and counted); the stretched model tells them apart."""
    head = words(100, 5)
    queries = [f"{head} {words(52, 6)}", f"{head} {words(52, 8)}"]
    short, long = (load_embedder(str(d), "cpu").encode_text(queries) for d in tiny_pair)
    assert short.truncated.tolist() == [True, True] and long.truncated.tolist() == [False, False]
    assert short.lengths.tolist() == long.lengths.tolist() == [150, 150]
    assert np.array_equal(short.vectors[0], short.vectors[1])
    assert float(long.vectors[0] @ long.vectors[1]) < 0.9999


# -- checkpoint import


def longclip_shapes(vision_width: int, vision_layers: int, patch: int, image: int, text_width: int, text_layers: int,
                    embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a published Long-CLIP checkpoint (OpenAI's CLIP state dict
    with the two 248-row positional tables of Long-CLIP's model_longclip.CLIP)."""
    def blocks(prefix: str, width: int, layers: int) -> dict:
        per_block = {"attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
                     "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
                     "ln_1.weight": (width,), "ln_1.bias": (width,), "mlp.c_fc.weight": (4 * width, width),
                     "mlp.c_fc.bias": (4 * width,), "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,),
                     "ln_2.weight": (width,), "ln_2.bias": (width,)}
        return {f"{prefix}.{i}.{name}": shape for i in range(layers) for name, shape in per_block.items()}

    grid = image // patch
    return {
        "positional_embedding": (248, text_width), "positional_embedding_res": (248, text_width),
        "text_projection": (text_width, embed_dim), "logit_scale": (), "token_embedding.weight": (49408, text_width),
        "ln_final.weight": (text_width,), "ln_final.bias": (text_width,),
        **blocks("transformer.resblocks", text_width, text_layers),
        "visual.class_embedding": (vision_width,), "visual.positional_embedding": (grid * grid + 1, vision_width),
        "visual.proj": (vision_width, embed_dim), "visual.conv1.weight": (vision_width, 3, patch, patch),
        "visual.ln_pre.weight": (vision_width,), "visual.ln_pre.bias": (vision_width,),
        **blocks("visual.transformer.resblocks", vision_width, vision_layers),
        "visual.ln_post.weight": (vision_width,), "visual.ln_post.bias": (vision_width,),
    }


TINY = dict(vision_width=128, vision_layers=2, patch=16, image=32, text_width=128, text_layers=2, embed_dim=32)
TINY_ARCH = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 128, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny Long-CLIP checkpoint with the published key names (weights in float16 where OpenAI's
    convert_weights puts them), the open_clip config of its architecture, and its tensors."""
    root = tmp_path_factory.mktemp("longclip_ckpt")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in longclip_shapes(**TINY).items():
        value = torch.randn(shape, generator=generator) * 0.05
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            value += 1.0
        half = name.endswith(("_proj_weight", "proj.weight", "c_fc.weight", "conv1.weight", "projection")) or name == "visual.proj"
        state[name] = value.half() if half else value
    state["logit_scale"] = torch.tensor(math.log(100.0))
    path = root / "longclip-T.pt"
    torch.save(state, path)
    arch = root / "tiny-openai.json"
    arch.write_text(json.dumps(TINY_ARCH))
    return path, arch, {k: v.float() for k, v in state.items()}


def _ln(x, sd, prefix):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _block(x, sd, prefix, mask):
    """One residual attention block of OpenAI's CLIP: heads of width 64, QuickGELU."""
    h = _ln(x, sd, f"{prefix}.ln_1")
    q, k, v = (h @ sd[f"{prefix}.attn.in_proj_weight"].T + sd[f"{prefix}.attn.in_proj_bias"]).chunk(3, dim=-1)
    heads = x.shape[-1] // 64
    q, k, v = (t.unflatten(-1, (heads, 64)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / 8.0
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    x = x + attended @ sd[f"{prefix}.attn.out_proj.weight"].T + sd[f"{prefix}.attn.out_proj.bias"]
    h = _ln(x, sd, f"{prefix}.ln_2") @ sd[f"{prefix}.mlp.c_fc.weight"].T + sd[f"{prefix}.mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ sd[f"{prefix}.mlp.c_proj.weight"].T + sd[f"{prefix}.mlp.c_proj.bias"]


def longclip_text(sd, tokens):
    """Long-CLIP's encode_text: positions 0-19 from positional_embedding, 20-247 from _res."""
    first = (torch.arange(248) < 20).float()[:, None]
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"] * first + sd["positional_embedding_res"] * (1 - first)
    causal = torch.full((248, 248), float("-inf")).triu(1)
    for i in range(TINY["text_layers"]):
        x = _block(x, sd, f"transformer.resblocks.{i}", causal)
    x = _ln(x, sd, "ln_final")[torch.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]
    return F.normalize(x, dim=-1)


def longclip_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=TINY["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(TINY["vision_layers"]):
        x = _block(x, sd, f"visual.transformer.resblocks.{i}", None)
    return F.normalize(_ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"], dim=-1)


def longclip_preprocess(image: Image.Image) -> torch.Tensor:
    """Long-CLIP's _transform: bicubic resize of the short side, centre crop, OpenAI's mean and std."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(TINY["image"], interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(TINY["image"]),
        lambda im: im.convert("RGB"), T.ToTensor(),
        T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])(image)


def test_imported_checkpoint_embeds_like_long_clip(checkpoint, tmp_path):
    path, arch, sd = checkpoint
    out = Path(ragcap("models", "import", "longclip", path, tmp_path / "m", "--arch", arch).stdout.strip())
    config = json.loads((out / embed.CONFIG_NAME).read_text())
    assert config["model_cfg"]["text_cfg"]["context_length"] == 248 and config["model_cfg"]["quick_gelu"] is True
    assert config["ragcap"]["import"] == {"kind": "longclip", "source": str(path), "architecture": str(arch), "keep": 20}

    embedder = load_embedder(str(out), "cpu")
    captions = ["a dog", words(30, 1), words(150, 2), words(248, 3)]
    tokens = embedder.tokenizer(captions, context_length=248)
    with torch.no_grad():
        expected = longclip_text(sd, tokens).numpy()
    assert np.abs(embedder.encode_text(captions).vectors - expected).max() <= 1e-5

    rng = np.random.default_rng(1)
    photos = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in [(40, 60, 3), (70, 45, 3)]]
    with torch.no_grad():
        expected = longclip_image(sd, torch.stack([longclip_preprocess(p) for p in photos])).numpy()
    assert np.abs(embedder.encode_images(photos) - expected).max() <= 1e-5


def test_hub_name_imports_through_the_hub_cache(checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    path, arch, _ = checkpoint
    cache = hub_cache(tmp_path / "hub", "BeichenZhang/LongCLIP-T", [path])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    from_hub = import_model("longclip", "hf-hub:BeichenZhang/LongCLIP-T", tmp_path / "hub-model", arch=str(arch))
    from_file = import_model("longclip", str(path), tmp_path / "file-model", arch=str(arch))
    a, b = load_file(from_hub / embed.WEIGHTS_NAME), load_file(from_file / embed.WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ModelError, match="not in the local Hugging Face cache"):
        import_model("longclip", "hf-hub:BeichenZhang/LongCLIP-absent", tmp_path / "absent")


@pytest.mark.parametrize("published, arch", [
    (dict(vision_width=768, vision_layers=12, patch=16, image=224, text_width=512, text_layers=12, embed_dim=512), "ViT-B-16"),
    (dict(vision_width=1024, vision_layers=24, patch=14, image=224, text_width=768, text_layers=12, embed_dim=768), "ViT-L-14"),
])
def test_published_long_clip_b_and_l_are_recognised(published, arch):
    state = {k: torch.empty(shape, device="meta") for k, shape in longclip_shapes(**published).items()}
    state["positional_embedding"] = state.pop("positional_embedding_res")  # as after the merge
    name, config = match_architecture(state, Path("longclip.pt"))
    assert name == arch
    assert config["text_cfg"]["context_length"] == 248 and config["quick_gelu"] is True


def test_checkpoints_of_other_architectures_are_refused(checkpoint, tiny_pair, tmp_path):
    path, _, _ = checkpoint
    result = ragcap("models", "import", "longclip", path, tmp_path / "a", ok=False)  # tiny: no known architecture
    assert result.exit_code == 1
    assert "match no architecture Long-CLIP builds on" in result.output and "closest is" in result.output
    assert not (tmp_path / "a" / embed.CONFIG_NAME).exists()
    with pytest.raises(ModelError, match="no 'positional_embedding_res'.*a 77-token CLIP checkpoint"):
        import_model("longclip", str(tiny_pair[0] / embed.WEIGHTS_NAME), tmp_path / "b")
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(ModelError, match=r"not a readable state dict .*weights_only=True"):
        import_model("longclip", str(pickled), tmp_path / "c")
    with pytest.raises(ModelError, match="unknown checkpoint kind 'clipcap2'; ragcap imports: .*clipcap.*longclip"):
        import_model("clipcap2", str(path), tmp_path / "d")


# -- primary component matching


def test_pca_reconstruction_keeps_the_top_components():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pca_reconstruct(x, 16), x, atol=1e-5)  # all components: x itself
    coarse = pca_reconstruct(x, 4)
    centred = (coarse - x.mean(0)).numpy()
    assert np.linalg.matrix_rank(centred, tol=1e-4) == 4
    # The best rank-4 approximation: nothing of rank 4 is closer (Eckart-Young), e.g. the top-4 of x's own SVD.
    u, s, vt = np.linalg.svd((x - x.mean(0)).numpy(), full_matrices=False)
    np.testing.assert_allclose(centred, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)


@pytest.fixture(scope="module")
def triples_dir(tmp_path_factory) -> Path:
    """12 random images and a manifest of long captions (short ones for half: the rest fall back)."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
        row = {"file": f"{i}.png", "long": ". ".join(words(12, 10 * i + j) for j in range(6))}
        if i % 2:
            row["short"] = words(8, 1000 + i)
        lines.append(json.dumps(row))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


FAST = FinetuneConfig(epochs=3, batch_size=6, lr=1e-3, warmup_steps=0, val_fraction=0.2, device="cpu")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / embed.WEIGHTS_NAME)


def test_finetuning_lowers_the_loss_and_trains_all_but_the_kept_positions(tiny_pair, triples_dir, tmp_path):
    triples, bad = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    assert len(triples) == 12 and not bad
    assert triples[0].short == triples[0].long.split(". ")[0]  # Long-CLIP's default short caption
    result = finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "ft", FAST)
    log = [json.loads(line) for line in (tmp_path / "ft" / "train_log.jsonl").read_text().splitlines()]
    assert log == result["epochs"] and [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"] and all(r["val_loss"] is not None for r in log)

    before, after = _weights(tiny_pair[1]), _weights(tmp_path / "ft")
    assert torch.equal(after["positional_embedding"][:20], before["positional_embedding"][:20])
    assert (after["positional_embedding"][20:] != before["positional_embedding"][20:]).any(dim=1).all()
    unchanged = [k for k in before if k != "positional_embedding" and torch.equal(before[k], after[k])]
    assert unchanged == []
    assert after["logit_scale"] != before["logit_scale"]
    config = json.loads((tmp_path / "ft" / embed.CONFIG_NAME).read_text())
    assert config["ragcap"]["stretch"]["context"] == 248 and config["ragcap"]["finetune"]["triples"] == 12
    assert load_embedder(str(tmp_path / "ft"), "cpu").encode_text([words(200)]).truncated.tolist() == [False]


def test_locked_image_tower_stays_as_it_was(tiny_pair, triples_dir, tmp_path):
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    # 5% of 12 holds out one triple, whose contrastive loss would be 0 for want of negatives.
    config = FinetuneConfig(**{**FAST.__dict__, "epochs": 1, "lock_image": True, "val_fraction": 0.05})
    with pytest.warns(RagcapWarning, match="holds out 1 of 12 triples"):
        assert finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "ft", config)["val_loss"] is None
    before, after = _weights(tiny_pair[1]), _weights(tmp_path / "ft")
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])


def test_an_interrupted_finetuning_resumes_to_the_same_weights(tiny_pair, triples_dir, tmp_path):
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    config = FinetuneConfig(**{**FAST.__dict__, "epochs": 2})
    finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "whole", config)

    def stop_in_epoch_two(step, total, loss):
        if step == 3:  # 10 training triples / batch 6 = 2 steps per epoch
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "cut", config, progress=stop_in_epoch_two)
    assert not (tmp_path / "cut" / embed.CONFIG_NAME).exists()
    with pytest.raises(ModelError, match="resume it with --resume"):
        finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "cut", config)
    with pytest.raises(ModelError, match="other captions or settings"):
        finetune_longclip(triples[:-1], str(tiny_pair[1]), tmp_path / "cut", config, resume=True)
    result = finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "cut", config, resume=True)
    assert [r["epoch"] for r in result["epochs"]] == [1, 2]
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()  # 3x the model: gone once the model is written
    with pytest.raises(ModelError, match="holds a completed model and no checkpoint"):
        finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "cut", config, resume=True)
    with pytest.raises(OptionError, match="--batch-size must be at least 2"):
        FinetuneConfig(batch_size=1)


def test_bad_manifests_and_models_are_refused(tiny_pair, triples_dir, tmp_path):
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"file": "0.png", "long": words(40)})
    manifest.write_text("\n".join([good, json.dumps({"file": "1.png", "references": ["a dog"]}), good]) + "\n")
    with pytest.raises(SourceError, match=r"m\.jsonl:2: no long caption .*found fields file, references"):
        read_triples(manifest, triples_dir)
    triples, bad = read_triples(manifest, triples_dir, skip_bad=True)
    assert len(triples) == 2 and [b.location for b in bad] == [f"{manifest}:2"]
    manifest.write_text(json.dumps({"file": "absent.png", "long": "a dog"}) + "\n")
    with pytest.raises(SourceError, match=r"m\.jsonl:1: no image 'absent\.png'"):
        read_triples(manifest, triples_dir)
    manifest.write_text(json.dumps({"file": "0.png", "references": ["a dog"]}) + "\n")
    with pytest.raises(SourceError, match="no usable"):
        read_triples(manifest, triples_dir, skip_bad=True)
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    with pytest.raises(ModelError, match="reads 77 tokens: stretch it first"):
        finetune_longclip(triples, str(tiny_pair[0]), tmp_path / "ft", FAST)


# -- long captions end to end


def test_long_caption_memory_end_to_end(tiny_pair, triples_dir, tmp_path):
    """ingest counts captions over 77 and 248 tokens; train-decoder accepts --max-tokens up to the
    context; caption and search work unchanged; finetune-longclip runs from the CLI."""
    short_dir, long_dir = tiny_pair
    head = words(100, 5)
    descriptions = [f"{head} {words(52, 6)}", f"{head} {words(52, 8)}", words(260, 9), words(40, 10), words(12, 11)]
    corpus = tmp_path / "descriptions.jsonl"
    corpus.write_text("".join(json.dumps({"file": f"{i}.png", "long": d}) + "\n" for i, d in enumerate(descriptions)))

    counts = {}
    for name, model in (("short", short_dir), ("long", long_dir)):
        summary = json.loads(ragcap("ingest", "jsonl", corpus, "--text-field", "long", "--id-field", "file",
                                    "-c", name, "-m", model, "--json").stdout)
        counts[name] = (summary["stored"], summary["over_77_tokens"], summary["over_248_tokens"], summary["truncated"])
    assert counts == {"short": (5, 3, 1, 3), "long": (5, 3, 1, 1)}

    scores = {name: [n["score"] for n in json.loads(ragcap("search", descriptions[0], "-c", name, "--k", "2", "--json").stdout)["neighbours"]]
              for name in ("short", "long")}
    assert scores["short"] == pytest.approx([1.0, 1.0], abs=1e-3)  # the tails that differ were cut
    assert scores["long"][0] == pytest.approx(1.0, abs=1e-3) and scores["long"][1] < 0.999

    too_long = ragcap("train-decoder", "-c", "short", "--out", tmp_path / "d77", "--max-tokens", "100", ok=False)
    assert too_long.exit_code == 1 and "reads 77 tokens, so captions can have at most 75" in too_long.output
    ragcap("train-decoder", "-c", "long", "--out", tmp_path / "dec", "--max-tokens", "120", "--epochs", "1",
           "--layers", "1", "--heads", "2", "--width", "32", "--val-fraction", "0")
    captions = [json.loads(line) for line in ragcap("caption", triples_dir / "0.png", "-c", "long", "--mode", "pd,clipre",
                                                   "--decoder", tmp_path / "dec", "--max-tokens", "120",  # its trained length
                                                   "--format", "jsonl").stdout.splitlines()]
    assert [c["mode"] for c in captions] == ["pd", "clipre"] and captions[1]["caption"] in descriptions

    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text((triples_dir / "manifest.jsonl").read_text() + json.dumps({"file": "0.png", "short": "a dog"}) + "\n")
    run = ragcap("finetune-longclip", manifest, "--images", triples_dir, "-m", long_dir, "-o", tmp_path / "ft",
                 "--epochs", "1", "--batch-size", "6", "--skip-bad", "--json", ok=False)
    assert run.exit_code == 1 and f"skipped {manifest}:13: no long caption" in run.output  # reported, trained on the rest
    done = json.loads(run.stdout)
    assert done["triples"] == 12 and done["steps"] == 2 and done["skipped_bad"] == 1
    load_embedder(str(tmp_path / "ft"), "cpu")


def test_a_last_batch_of_one_triple_joins_the_one_before(tiny_pair, triples_dir, tmp_path):
    """12 triples at batch 11 would leave one alone in a batch: its PCA gradient is NaN, which
    used to turn every weight into NaN in a run that then exited 0."""
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    config = FinetuneConfig(**{**FAST.__dict__, "epochs": 1, "batch_size": 11, "val_fraction": 0.0})
    assert finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "ft", config)["steps"] == 1
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "ft").values())


def test_a_held_out_set_too_small_for_a_loss_is_said(tiny_pair, triples_dir, tmp_path):
    # Issue row: the default --val-fraction 0.01 of a small manifest held out one triple, and
    # every epoch reported val_loss null without a word.
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    config = FinetuneConfig(**{**FAST.__dict__, "epochs": 1, "val_fraction": 0.01})
    with pytest.warns(RagcapWarning, match=f"holds out 1 of {len(triples)} triples .* raise it to 0.167"):
        assert finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "ft", config)["val_loss"] is None


def test_too_few_triples_left_to_train_on_are_refused(tiny_pair, triples_dir, tmp_path):
    triples, _ = read_triples(triples_dir / "manifest.jsonl", triples_dir)
    config = FinetuneConfig(**{**FAST.__dict__, "epochs": 1, "val_fraction": 0.95})
    with pytest.raises(ModelError, match="lower --val-fraction"):
        finetune_longclip(triples, str(tiny_pair[1]), tmp_path / "ft", config)
    assert not (tmp_path / "ft").exists()


def test_finetune_locks_its_out_against_a_second_run(tiny_pair, triples_dir, tmp_path):
    # Issue row: finetune-longclip took no lock, so two runs into one --out wrote over each other.
    import subprocess
    import sys
    import time

    out, held = tmp_path / "ft", tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ragcap.locks import hold_directory\n"
                               "with hold_directory(sys.argv[1]):\n    open(sys.argv[2], 'w').close()\n    time.sleep(600)\n",
                               str(out), str(held)])
    try:
        deadline = time.monotonic() + 120  # not a timing target: only so a broken build fails instead of hanging
        while not held.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the holder did not start"
            time.sleep(0.05)
        run = ragcap("finetune-longclip", triples_dir / "manifest.jsonl", "--images", triples_dir, "-m", tiny_pair[1],
                     "-o", out, "--epochs", "1", ok=False)
        assert run.exit_code == 1 and f"in use by pid {holder.pid}" in run.output, run.output
        assert sorted(p.name for p in out.iterdir()) == [".ragcap.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("given,message", [
    ({"lr": -1.0}, "--lr must be above 0, not -1.0"),  # these two were 'unexpected ValueError ... a bug in ragcap'
    ({"weight_decay": -1.0}, "--weight-decay must be at least 0, not -1.0"),
    ({"seed": -1}, "--seed must be at least 0, not -1"),
    ({"warmup_steps": -5}, "--warmup-steps must be at least 0, not -5"),  # these two trained, exit 0
    ({"pca_dim": 0}, "--pca-dim must be at least 1, not 0"),
    ({"val_fraction": 1.5}, "--val-fraction must be at least 0 and below 1, not 1.5"),
])
def test_finetune_settings_out_of_range_are_refused_before_the_model_loads(given, message):
    with pytest.raises(OptionError, match=message):
        FinetuneConfig(**given)
