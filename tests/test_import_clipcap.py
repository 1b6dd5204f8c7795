"""`ragcap models import clipcap`: ClipCap's published checkpoints in ragcap's layout.

No published checkpoint can be downloaded here, so the tests build state dicts with the published
key names and shapes. Source of the names and shapes: rmokady/CLIP_prefix_caption, train.py
(ClipCaptionModel: `clip_project` + `gpt`; MLP: nn.Sequential under `.model`; TransformerMapper:
`linear`, `prefix_const`, `transformer.layers.N` of TransformerLayer with `norm1`, `attn`
(MultiHeadAttention: `to_queries` and `to_keys_values` without bias, `project` with), `norm2`,
`mlp` (MlpTransformer: `fc1`, `fc2`)), and the 2021 transformers GPT2LMHeadModel it saved, which
also stored each attention's `bias` (causal mask) and `masked_bias` buffers.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.decoders import ClipCapDecoder, load_decoder
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions, search
from ragcap.importers.clipcap import checkpoint_shapes, config_from_checkpoint, import_clipcap
from tests.conftest import shared_path

runner = CliRunner()
WIDTH, EMBED, HEADS = 32, 32, 8  # tiny LM width; the tiny CLIP's embedding width; ClipCap's 8 mapping heads

# GPT-2 small as ClipCap's checkpoints hold it (layer i of 12), and the two mapping networks.
GPT2_SMALL_LAYER = {
    "ln_1.weight": (768,), "ln_1.bias": (768,), "attn.c_attn.weight": (768, 2304), "attn.c_attn.bias": (2304,),
    "attn.c_proj.weight": (768, 768), "attn.c_proj.bias": (768,), "ln_2.weight": (768,), "ln_2.bias": (768,),
    "mlp.c_fc.weight": (768, 3072), "mlp.c_fc.bias": (3072,), "mlp.c_proj.weight": (3072, 768), "mlp.c_proj.bias": (768,),
}
GPT2_SMALL = {
    "gpt.transformer.wte.weight": (50257, 768), "gpt.transformer.wpe.weight": (1024, 768),
    **{f"gpt.transformer.h.{i}.{k}": shape for i in range(12) for k, shape in GPT2_SMALL_LAYER.items()},
    "gpt.transformer.ln_f.weight": (768,), "gpt.transformer.ln_f.bias": (768,), "gpt.lm_head.weight": (50257, 768),
}
COCO_MLP = {"clip_project.model.0.weight": (3840, 512), "clip_project.model.0.bias": (3840,),
            "clip_project.model.2.weight": (7680, 3840), "clip_project.model.2.bias": (7680,)}


def transformer_mapping(dim_clip: int, width: int, prefix: int, clip: int, layers: int) -> dict[str, tuple]:
    keys = {"clip_project.linear.weight": (clip * width, dim_clip), "clip_project.linear.bias": (clip * width,),
            "clip_project.prefix_const": (prefix, width)}
    for i in range(layers):
        layer = f"clip_project.transformer.layers.{i}."
        keys.update({layer + k: s for k, s in {
            "norm1.weight": (width,), "norm1.bias": (width,), "attn.to_queries.weight": (width, width),
            "attn.to_keys_values.weight": (2 * width, width), "attn.project.weight": (width, width), "attn.project.bias": (width,),
            "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (2 * width, width), "mlp.fc1.bias": (2 * width,),
            "mlp.fc2.weight": (width, 2 * width), "mlp.fc2.bias": (width,)}.items()})
    return keys


# transformer_weights.pt: RN50x4 (640-d), prefix 40, CLIP length 40, 8 layers.
COCO_TRANSFORMER = transformer_mapping(640, 768, 40, 40, 8)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    from ragcap.decoders.lm_prompt import save_random_lm

    return save_random_lm(tmp_path_factory.mktemp("lm"), shared_path("models", "gpt2-tokenizer"), n_layer=2, n_embd=WIDTH, n_head=2)


def gpt_state(lm_dir, seed: int) -> dict[str, torch.Tensor]:
    """A GPT-2 with lm_dir's shape but other weights, keyed as ClipCap saved it, with the legacy
    attention buffers (`bias`, `masked_bias`) that transformers 4.x wrote into every checkpoint."""
    from transformers import AutoConfig, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(lm_dir)
    torch.manual_seed(seed)
    lm = GPT2LMHeadModel(config)
    state = {f"gpt.{k}": v.clone() for k, v in lm.state_dict().items()}
    n = config.n_positions
    for i in range(config.n_layer):
        state[f"gpt.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        state[f"gpt.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    return state


def clipcap_checkpoint(lm_dir, mapping: str, seed: int = 5) -> dict[str, torch.Tensor]:
    shapes = ({"clip_project.model.0.weight": (5 * WIDTH, EMBED), "clip_project.model.0.bias": (5 * WIDTH,),
               "clip_project.model.2.weight": (10 * WIDTH, 5 * WIDTH), "clip_project.model.2.bias": (10 * WIDTH,)}
              if mapping == "mlp" else transformer_mapping(EMBED, WIDTH, 6, 4, 2))
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) for k, s in shapes.items()}
    for k in state:
        if k.endswith(("norm1.weight", "norm2.weight")):
            state[k] = 1 + state[k]
    return {**state, **gpt_state(lm_dir, seed)}


def reference_prefix(state: dict, mapping: str, x: torch.Tensor) -> torch.Tensor:
    """ClipCap's prefix p_1..p_k = F(x), written from the paper's description and the repository."""
    if mapping == "mlp":  # two layers with a tanh between
        h = torch.tanh(x @ state["clip_project.model.0.weight"].T + state["clip_project.model.0.bias"])
        out = h @ state["clip_project.model.2.weight"].T + state["clip_project.model.2.bias"]
        return out.view(len(x), -1, WIDTH)
    # Transformer: x spread over CLIP tokens, learned constants appended, pre-norm layers, the
    # constants' outputs are the prefix.
    clip = state["clip_project.linear.weight"].shape[0] // WIDTH
    tokens = (x @ state["clip_project.linear.weight"].T + state["clip_project.linear.bias"]).view(len(x), clip, WIDTH)
    h = torch.cat([tokens, state["clip_project.prefix_const"].expand(len(x), -1, -1)], dim=1)
    n, dh = h.shape[1], WIDTH // HEADS
    layers = len({k.split(".")[3] for k in state if k.startswith("clip_project.transformer.layers.")})
    for i in range(layers):
        p = lambda name: state[f"clip_project.transformer.layers.{i}.{name}"]  # noqa: E731
        a = F.layer_norm(h, (WIDTH,), p("norm1.weight"), p("norm1.bias"))
        q = (a @ p("attn.to_queries.weight").T).view(len(x), n, HEADS, dh)
        kv = (a @ p("attn.to_keys_values.weight").T).view(len(x), n, 2, HEADS, dh)
        weights = torch.einsum("bnhd,bmhd->bnmh", q, kv[:, :, 0]) / math.sqrt(dh)
        attended = torch.einsum("bnmh,bmhd->bnhd", weights.softmax(dim=2), kv[:, :, 1]).reshape(len(x), n, WIDTH)
        h = h + attended @ p("attn.project.weight").T + p("attn.project.bias")
        m = F.layer_norm(h, (WIDTH,), p("norm2.weight"), p("norm2.bias"))
        h = h + torch.relu(m @ p("mlp.fc1.weight").T + p("mlp.fc1.bias")) @ p("mlp.fc2.weight").T + p("mlp.fc2.bias")
    return h[:, clip:]


def reference_logits(state: dict, mapping: str, lm_dir, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """GPT-2 (the checkpoint's weights) over [prefix; caption token embeddings], as ClipCaptionModel.forward."""
    from transformers import AutoConfig, GPT2LMHeadModel

    lm = GPT2LMHeadModel(AutoConfig.from_pretrained(lm_dir)).eval()
    lm.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("gpt.") and not k.endswith((".attn.bias", ".attn.masked_bias"))})
    with torch.no_grad():
        embeds = torch.cat([reference_prefix(state, mapping, x), lm.transformer.wte(tokens)], dim=1)
        return lm(inputs_embeds=embeds).logits


def ragcap(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("mapping", ["mlp", "transformer"])
def test_import_gives_the_logits_of_clipcaps_forward(mapping, lm_dir, tiny_clip_dir, tmp_path):
    state = clipcap_checkpoint(lm_dir, mapping)
    torch.save(state, tmp_path / "weights.pt")
    result = ragcap("models", "import", "clipcap", tmp_path / "weights.pt", tmp_path / "imported", "--mapping", mapping,
                    "--lm", lm_dir, "--model", tiny_clip_dir, "--prefix-scale", "2")
    assert result.exit_code == 0, result.output
    decoder = load_decoder(tmp_path / "imported", device="cpu")
    assert isinstance(decoder, ClipCapDecoder) and decoder.config.mapping == mapping
    sizes = (decoder.config.prefix_length, decoder.config.clip_length, decoder.config.mapping_layers)
    assert sizes[0] == 10 if mapping == "mlp" else sizes == (6, 4, 2)  # read from the tensors' shapes
    assert decoder.embedder.dim == EMBED and decoder.embedder.spec == f"local:{tiny_clip_dir.resolve()}"

    x = F.normalize(torch.randn(3, EMBED, generator=torch.Generator().manual_seed(1)), dim=-1)
    tokens = torch.tensor([[32, 3290, 4539, 13], [11545, 11875, 319, 13], [32, 1310, 286, 13]])
    with torch.no_grad():
        ours = decoder.teacher_forced_logits(x, tokens)
    theirs = reference_logits(state, mapping, lm_dir, 2 * x, tokens)[:, decoder.config.prefix_length - 1 : -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # Captioning runs the same forward: the first greedy token is the reference's argmax.
    found = search(decoder.stepper(), decoder.prepare(x), decoder.search_defaults(SearchOptions(max_tokens=1)))
    assert [row[0].tokens[0] for row in found] == theirs[:, 0].argmax(-1).tolist()


def test_published_layouts_are_what_the_importer_expects(lm_dir):
    """GPT-2 small with the coco MLP (ViT-B/32) and the transformer (RN50x4) mappings, on the meta
    device: the importer reads ClipCap's sizes from these shapes and expects exactly these keys."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ragcap.decoders.tokenizers import load_gpt2_tokenizer
    from ragcap.embedder_info import EmbedderInfo

    tokenizer = load_gpt2_tokenizer(lm_dir)
    for mapping, published, dim in (("mlp", COCO_MLP, 512), ("transformer", COCO_TRANSFORMER, 640)):
        with torch.device("meta"):
            state = {k: torch.empty(s) for k, s in {**published, **GPT2_SMALL}.items()}
            config = config_from_checkpoint(None, state, mapping, 768)
            decoder = ClipCapDecoder(config, EmbedderInfo("clip", dim), GPT2LMHeadModel(GPT2Config()), tokenizer)
        assert (config.embed_dim, config.prefix_length) == ((512, 10) if mapping == "mlp" else (640, 40))
        if mapping == "transformer":
            assert (config.clip_length, config.mapping_layers) == (40, 8)
        assert checkpoint_shapes(decoder) == {**published, **GPT2_SMALL}


@pytest.fixture
def saved(lm_dir, tmp_path):
    def save(state) -> str:
        path = tmp_path / "weights.pt"
        torch.save(state, path)
        return path

    return save


def import_error(path, out, lm_dir, mapping="mlp") -> str:
    with pytest.raises(ModelError) as err:
        import_clipcap(path, out, mapping=mapping, lm=str(lm_dir), model="ViT-B-32:openai")
    assert not (out / "config.json").exists()  # nothing half-written
    return str(err.value)


def test_missing_extra_and_misshaped_keys_are_named(lm_dir, saved, tmp_path):
    state = clipcap_checkpoint(lm_dir, "mlp")
    state = {k: v for k, v in state.items() if k != "clip_project.model.0.weight"} | {"clip_project.model.0.weight": torch.zeros(5 * WIDTH, 512)}
    good = dict(state)
    del state["gpt.transformer.h.1.ln_2.bias"]
    message = import_error(saved(state), tmp_path / "out", lm_dir)
    assert "missing key 'gpt.transformer.h.1.ln_2.bias'" in message and str(tmp_path / "weights.pt") in message
    message = import_error(saved(good | {"clip_project.model.4.weight": torch.zeros(3)}), tmp_path / "out", lm_dir)
    assert "unexpected key 'clip_project.model.4.weight'" in message
    message = import_error(saved(good | {"gpt.transformer.wpe.weight": torch.zeros(512, WIDTH)}), tmp_path / "out", lm_dir)
    assert f"key 'gpt.transformer.wpe.weight' has shape (512, {WIDTH}), expected (1024, {WIDTH})" in message
    message = import_error(saved(good | {"clip_project.model.2.bias": torch.zeros(7)}), tmp_path / "out", lm_dir)
    assert f"key 'clip_project.model.2.bias' has shape (7,), expected ({10 * WIDTH},)" in message


def test_wrong_mapping_foreign_pickles_and_code_are_refused(lm_dir, saved, tmp_path):
    message = import_error(saved(clipcap_checkpoint(lm_dir, "transformer")), tmp_path / "out", lm_dir, mapping="mlp")
    assert "holds a transformer mapping network; pass --mapping transformer" in message
    assert "expected a state dict" in import_error(saved({"epoch": 3}), tmp_path / "out", lm_dir)
    # Issue row: a file that is no checkpoint at all said "not a readable state dict (KeyError: 110)".
    (tmp_path / "weights.pt").write_bytes(b"not a checkpoint")
    assert "weights.pt is not a checkpoint file (it starts with b'not a ch'" in import_error(tmp_path / "weights.pt", tmp_path / "out", lm_dir)
    (tmp_path / "weights.pt").write_bytes(b"")
    assert "weights.pt is empty" in import_error(tmp_path / "weights.pt", tmp_path / "out", lm_dir)
    torch.save({"a": torch.zeros(64)}, tmp_path / "weights.pt")
    (tmp_path / "weights.pt").write_bytes((tmp_path / "weights.pt").read_bytes()[:200])  # a download cut short
    assert "not a readable state dict" in import_error(tmp_path / "weights.pt", tmp_path / "out", lm_dir)
    torch.save({"model": Payload()}, tmp_path / "weights.pt")  # an object whose unpickling would run code
    message = import_error(tmp_path / "weights.pt", tmp_path / "out", lm_dir)
    assert "not a readable state dict" in message and "weights_only=True" in message


class Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_embedder_must_fit_the_mapping_and_an_existing_model_is_kept(lm_dir, saved, tmp_path):
    path = saved(clipcap_checkpoint(lm_dir, "mlp"))
    with pytest.raises(ModelError, match="takes 32-d embeddings; pass --model"):
        import_clipcap(path, tmp_path / "out", lm=str(lm_dir))
    with pytest.raises(ModelError, match="ViT-B-32:openai makes 512-d embeddings"):
        import_clipcap(path, tmp_path / "out", lm=str(lm_dir), model="ViT-B-32:openai")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps({"kind": "decap"}))
    result = ragcap("models", "import", "clipcap", path, tmp_path / "out", "--lm", lm_dir, "-m", "ViT-B-32:openai")
    assert result.exit_code == 1 and "already holds a decoder" in result.output
    result = ragcap("models", "import", "blip", path, tmp_path / "other")
    assert result.exit_code == 1 and "unknown checkpoint kind 'blip'; ragcap imports: clipcap, decap, longclip" in result.output
    result = ragcap("models", "import", "longclip", path, tmp_path / "other", "--mapping", "mlp")
    assert result.exit_code == 1 and "--mapping does not apply to longclip checkpoints" in result.output
    result = ragcap("models", "import", "clipcap", tmp_path / "absent.pt", tmp_path / "other")
    assert result.exit_code == 1 and "no such checkpoint file" in result.output
