"""`ragcap models import smallcap`: SmallCap's published checkpoints in ragcap's layout.

No published checkpoint can be downloaded here, so the test builds one with the published key
names and layout (a hub directory: config.json + pytorch_model.bin). Source of the names:
RitaRamo/smallcap, src/vision_encoder_decoder.py (SmallCap keeps `encoder` = the CLIP vision
tower, `decoder` = its GPT-2, untied output layer) and src/gpt2.py (ThisGPT2Attention: q_attn
(w, w/r), c_attn (encoder width, 2w/r), c_proj (w/r, w) with cross_attention_reduce_factor r, 12
heads of (w/r)/12; `bias` and `masked_bias` buffers in every attention).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.decoders import SmallCapDecoder, load_decoder
from ragcap.decoders.smallcap import SmallCapInput
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions, search
from ragcap.importers.smallcap import import_smallcap
from tests.test_train_clipcap import random_lm

runner = CliRunner()
WIDTH, LAYERS, HEADS, REDUCE, ENCODER = 32, 2, 2, 4, 64  # tiny GPT-2; SmallCap7M's factor 4; the tiny CLIP's vision width


def smallcap_checkpoint(vocab: int, positions: int, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = WIDTH // REDUCE

    def w(*shape, scale=0.2):
        return torch.randn(shape, generator=g) * scale

    state = {"decoder.transformer.wte.weight": w(vocab, WIDTH), "decoder.transformer.wpe.weight": w(positions, WIDTH, scale=0.05),
             "decoder.transformer.ln_f.weight": 1 + w(WIDTH, scale=0.1), "decoder.transformer.ln_f.bias": w(WIDTH, scale=0.1),
             # the frozen CLIP vision tower: not imported (ragcap runs open_clip's)
             "encoder.embeddings.class_embedding": w(ENCODER), "encoder.post_layernorm.weight": w(ENCODER)}
    state["decoder.lm_head.weight"] = state["decoder.transformer.wte.weight"].clone()
    for i in range(LAYERS):
        p = f"decoder.transformer.h.{i}."
        for ln in ("ln_1", "ln_2", "ln_cross_attn"):
            state[p + ln + ".weight"], state[p + ln + ".bias"] = 1 + w(WIDTH, scale=0.1), w(WIDTH, scale=0.1)
        shapes = {"attn.c_attn": (WIDTH, 3 * WIDTH), "attn.c_proj": (WIDTH, WIDTH), "crossattention.q_attn": (WIDTH, c),
                  "crossattention.c_attn": (ENCODER, 2 * c), "crossattention.c_proj": (c, WIDTH),
                  "mlp.c_fc": (WIDTH, 4 * WIDTH), "mlp.c_proj": (4 * WIDTH, WIDTH)}
        for name, shape in shapes.items():
            state[p + name + ".weight"], state[p + name + ".bias"] = w(*shape), w(shape[1], scale=0.05)
        for attention in ("attn", "crossattention"):  # transformers 4.x's mask buffers
            state[p + attention + ".bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.uint8)).view(1, 1, positions, positions)
            state[p + attention + ".masked_bias"] = torch.tensor(-1e4)
    return state


def published_config(vocab: int, positions: int) -> dict:
    """config.json as SmallCap's hub repositories hold it (SmallCapConfig with both sub-configs)."""
    return {"model_type": "smallcap", "architectures": ["SmallCap"], "k": 4, "retrieval_encoder": "RN50x64", "rag": True,
            "encoder": {"model_type": "clip_vision_model", "hidden_size": ENCODER, "patch_size": 16, "image_size": 64},
            "decoder": {"model_type": "this_gpt2", "cross_attention_reduce_factor": REDUCE, "add_cross_attention": True, "n_embd": WIDTH,
                        "n_layer": LAYERS, "n_head": HEADS, "n_positions": positions, "vocab_size": vocab, "activation_function": "gelu_new",
                        "layer_norm_epsilon": 1e-5}}


def reference_logits(state: dict, ids: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """SmallCap's decoder forward written from the paper and src/gpt2.py: GPT-2 blocks (LayerNorm,
    causal self-attention, LayerNorm, cross-attention of width w/r to the patches, LayerNorm, MLP)."""
    g = lambda name: state["decoder." + name]
    ln = lambda x, name: F.layer_norm(x, (WIDTH,), g(name + ".weight"), g(name + ".bias"), 1e-5)
    lin = lambda x, name: x @ g(name + ".weight") + g(name + ".bias")  # Conv1D: (in, out)

    def attend(q, k, v, causal):
        b, n, m = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.view(b, t.shape[1], HEADS, -1).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if causal:
            scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), -math.inf)
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)

    h = g("transformer.wte.weight")[ids] + g("transformer.wpe.weight")[torch.arange(ids.shape[1])]
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        q, k, v = lin(ln(h, p + "ln_1"), p + "attn.c_attn").split(WIDTH, dim=-1)
        h = h + lin(attend(q, k, v, True), p + "attn.c_proj")
        q = lin(ln(h, p + "ln_cross_attn"), p + "crossattention.q_attn")
        k, v = lin(patches, p + "crossattention.c_attn").split(WIDTH // REDUCE, dim=-1)
        h = h + lin(attend(q, k, v, False), p + "crossattention.c_proj")
        m = lin(ln(h, p + "ln_2"), p + "mlp.c_fc")
        h = h + lin(0.5 * m * (1 + torch.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m**3))), p + "mlp.c_proj")
    return ln(h, "transformer.ln_f") @ g("lm_head.weight").T


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return random_lm(tmp_path_factory.mktemp("lm") / "lm", width=WIDTH, layers=LAYERS)


@pytest.fixture
def hub_dir(lm_dir, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lm_dir)
    folder = tmp_path / "SmallCap7M"
    folder.mkdir()
    state = smallcap_checkpoint(config.vocab_size, config.n_positions)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(published_config(config.vocab_size, config.n_positions)))
    return folder, state


def test_import_gives_the_logits_of_smallcaps_forward(hub_dir, lm_dir, tiny_clip_dir, tmp_path):
    folder, state = hub_dir
    result = runner.invoke(app, ["models", "import", "smallcap", str(folder), str(tmp_path / "imported"), "--lm", str(lm_dir),
                                 "--model", str(tiny_clip_dir), "--json"])
    assert result.exit_code == 0, result.output
    decoder = load_decoder(tmp_path / "imported", device="cpu")
    assert isinstance(decoder, SmallCapDecoder)
    assert (decoder.config.encoder_width, decoder.config.cross_attention_width, decoder.config.k) == (ENCODER, WIDTH // REDUCE, 4)
    assert (decoder.config.retrieval_spec, decoder.config.retrieval_dim) == ("RN50x64:openai", 1024)  # config.json's retrieval_encoder
    assert decoder.embedder.spec == f"local:{tiny_clip_dir.resolve()}"

    patches = torch.randn(2, 17, ENCODER, generator=torch.Generator().manual_seed(1))
    prompts = decoder.prompt_ids([["a dog on a beach", "a brown dog"], []])
    targets = torch.tensor([[32, 3290, 4539, 13], [11545, 11875, 13, -100]])
    with torch.no_grad():
        ours = decoder.teacher_forced_logits(SmallCapInput(patches, [], prompts), targets)
    for row, prompt in enumerate(prompts):
        n = int((targets[row] >= 0).sum())
        ids = torch.tensor([prompt + targets[row, : n - 1].tolist()])
        theirs = reference_logits(state, ids, patches[row : row + 1])[0, len(prompt) - 1 :]
        torch.testing.assert_close(ours[row, :n], theirs, rtol=1e-4, atol=1e-4)
    # Captioning runs the same forward: the first greedy token is the reference's argmax.
    found = search(decoder.stepper(), decoder.prepare(SmallCapInput(patches, [], prompts)), decoder.search_defaults(SearchOptions(beam=1, max_tokens=1)))
    first = [reference_logits(state, torch.tensor([p]), patches[i : i + 1])[0, -1].argmax().item() for i, p in enumerate(prompts)]
    assert [row[0].tokens[:1] or [decoder.stop_id] for row in found] == [[t] for t in first]


def import_error(path, out, lm_dir, **options) -> str:
    with pytest.raises(ModelError) as err:
        import_smallcap(path, out, lm=str(lm_dir), **options)
    assert not (out / "config.json").exists()  # nothing half-written
    return str(err.value)


def test_wrong_shapes_keys_encoders_and_files_are_refused(hub_dir, lm_dir, tiny_clip_dir, tmp_path):
    folder, state = hub_dir
    weights = folder / "pytorch_model.bin"
    model = dict(model=str(tiny_clip_dir))
    torch.save({**state, "decoder.transformer.h.1.crossattention.c_proj.weight": torch.zeros(4, WIDTH)}, weights)
    message = import_error(weights, tmp_path / "out", lm_dir, **model)
    assert f"key 'decoder.transformer.h.1.crossattention.c_proj.weight' has shape (4, {WIDTH}), expected ({WIDTH // REDUCE}, {WIDTH})" in message
    torch.save({k: v for k, v in state.items() if k != "decoder.transformer.h.0.ln_cross_attn.bias"}, weights)
    assert "missing key 'decoder.transformer.h.0.ln_cross_attn.bias'" in import_error(weights, tmp_path / "out", lm_dir, **model)
    torch.save({k: v for k, v in state.items() if "crossattention" not in k}, weights)
    assert "not a SmallCap checkpoint" in import_error(weights, tmp_path / "out", lm_dir, **model)
    torch.save(state, weights)
    # ViT-B-32's vision tower is 768 wide; this checkpoint reads 64-wide patches.
    assert "64-wide patch features, but ViT-B-32:openai's vision tower is 768 wide" in import_error(weights, tmp_path / "out", lm_dir)
    assert "a ResNet" in import_error(weights, tmp_path / "out", lm_dir, model="RN50:openai")
    weights.write_bytes(b"not a checkpoint")
    assert "is not a checkpoint file" in import_error(weights, tmp_path / "out", lm_dir, **model)
    (tmp_path / "two").mkdir()
    for name in ("pytorch_model.bin", "model.safetensors"):
        (tmp_path / "two" / name).write_bytes(b"")
    result = runner.invoke(app, ["models", "import", "smallcap", str(tmp_path / "two"), str(tmp_path / "x"), "--lm", str(lm_dir)])
    assert result.exit_code == 1 and "expected one checkpoint file" in result.output
    result = runner.invoke(app, ["models", "import", "clipcap", str(folder), str(tmp_path / "x"), "--retrieval", "RN50:openai"])
    assert result.exit_code == 1 and "--retrieval does not apply to clipcap checkpoints" in result.output
