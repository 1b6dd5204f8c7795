"""--precision: fp32 by default, bf16 / fp16 autocast for the encoders and decoders on request."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.decoders import DeCapConfig, DeCapDecoder, load_decoder
from ragcap.embed import load_embedder
from ragcap.errors import OptionError
from ragcap.int8 import ProjectedAttention, attention_as_linear, conv1d_as_linear
from ragcap.precision import prepare, resolve_precision
from ragcap.store import open_store
from tests.conftest import shared_path

runner = CliRunner()
CAPTIONS = [f"a {color} {thing} on a table" for color in ("red", "blue", "green", "white") for thing in ("cup", "kite", "boat", "shoe")]
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def images(n: int = 6) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


class OutputDtypes:
    """Records the dtype every nn.Linear inside `module` computes in."""

    def __init__(self, module: torch.nn.Module):
        self.seen: set[torch.dtype] = set()
        self.hooks = [m.register_forward_hook(lambda m, a, out: self.seen.add(out.dtype))
                      for m in module.modules() if isinstance(m, torch.nn.Linear)]
        assert self.hooks, "no Linear layer to watch"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()


def test_precision_comes_from_the_flag_then_the_environment_then_the_config_file(monkeypatch, tmp_path):
    assert resolve_precision() == "fp32"
    config = tmp_path / "config.toml"
    config.write_text('precision = "fp16"\n')
    monkeypatch.setenv("RAGCAP_CONFIG", str(config))
    assert resolve_precision() == "fp16"
    monkeypatch.setenv("RAGCAP_PRECISION", "BF16")
    assert resolve_precision() == "bf16"
    assert resolve_precision("fp32") == "fp32"
    with pytest.raises(OptionError, match="--precision: unknown precision 'fp64'; choose from fp32, bf16, fp16"):
        resolve_precision("fp64")
    monkeypatch.setenv("RAGCAP_PRECISION", "half")
    with pytest.raises(OptionError, match="RAGCAP_PRECISION: unknown precision 'half'"):
        resolve_precision()
    monkeypatch.delenv("RAGCAP_PRECISION")
    config.write_text('precision = "double"\n')
    with pytest.raises(OptionError, match="config.toml: unknown precision 'double'"):
        resolve_precision()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_embedders_compute_in_16_bits_and_return_unit_float32_vectors_near_fp32(tiny_clip_dir, precision):
    exact = load_embedder(str(tiny_clip_dir), "cpu")
    low = load_embedder(str(tiny_clip_dir), "cpu", precision=precision)
    assert (exact.precision, low.precision) == ("fp32", precision) and low is not exact
    with OutputDtypes(low.model) as watched:
        texts, pictures = low.encode_text(CAPTIONS).vectors, low.encode_images(images())
    assert watched.seen == {LOW[precision]}
    with OutputDtypes(exact.model) as watched:
        exact_texts, exact_pictures = exact.encode_text(CAPTIONS).vectors, exact.encode_images(images())
    assert watched.seen == {torch.float32}
    for low_vectors, fp32_vectors in ((texts, exact_texts), (pictures, exact_pictures)):
        assert low_vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(low_vectors, axis=1), 1.0, atol=1e-5)
        cosines = (low_vectors * fp32_vectors).sum(axis=1)
        assert cosines.min() > 0.999 and not np.array_equal(low_vectors, fp32_vectors)


def quantized_layers(module: torch.nn.Module) -> int:
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    return sum(isinstance(m, QuantizedLinear) for m in module.modules())


def plain_linears(module: torch.nn.Module) -> int:
    """Layers int8 makes quantized Linears: nn.Linear (not MultiheadAttention's own out_proj),
    GPT-2's Conv1D (transformers' or ragcap's), and each MultiheadAttention's four projections."""
    from transformers.pytorch_utils import Conv1D

    from ragcap.decoders.gpt import Conv1D as RagcapConv1D

    return sum(
        1 if type(m) is torch.nn.Linear or isinstance(m, (Conv1D, RagcapConv1D)) else 4 if isinstance(m, torch.nn.MultiheadAttention) else 0
        for m in module.modules()
    )


def test_gpt2_conv1d_layers_become_the_linear_layers_that_compute_the_same():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, add_cross_attention=True, bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(config).eval()
    ids, states = torch.randint(0, 50, (3, 7)), torch.randn(3, 5, 32)
    with torch.inference_mode():
        before = lm(input_ids=ids, encoder_hidden_states=states).logits
        conv1d = sum(isinstance(m, Conv1D) for m in lm.modules())
        linears = sum(type(m) is torch.nn.Linear for m in lm.modules())
        conv1d_as_linear(lm)
        after = lm(input_ids=ids, encoder_hidden_states=states).logits
    assert conv1d == 2 * 7  # per block: attention in and out, cross-attention query, in and out, MLP in and out
    assert not any(isinstance(m, Conv1D) for m in lm.modules())
    assert sum(type(m) is torch.nn.Linear for m in lm.modules()) == linears + conv1d
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "float", "bool", "per-head"])
def test_multihead_attention_becomes_linear_layers_that_compute_the_same(batch_first, mask):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    if not batch_first:
        x, memory = x.transpose(0, 1), memory.transpose(0, 1)
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True: may not attend (MultiheadAttention's sense)
    attn_mask = {"none": None, "bool": causal, "float": torch.zeros(5, 5).masked_fill(causal, float("-inf")),
                 "per-head": torch.randn(2 * 4, 5, 5)}[mask]
    projected = ProjectedAttention.of(mha)
    with torch.inference_mode():
        for q, kv, m in ((x, x, attn_mask), (x, memory, None)):  # self-attention, and attending to other states
            expected = mha(q, kv, kv, need_weights=False, attn_mask=m)[0]
            torch.testing.assert_close(projected(q, kv, kv, need_weights=False, attn_mask=m)[0], expected, rtol=1e-5, atol=1e-5)
    assert ProjectedAttention.of(torch.nn.MultiheadAttention(16, 4, kdim=8, vdim=8)) is None  # stays as it is


def test_a_clip_with_its_attention_rewritten_computes_what_open_clip_does(tiny_clip_dir):
    exact = load_embedder(str(tiny_clip_dir), "cpu")
    rewritten = copy.deepcopy(exact.model)
    attention_as_linear(rewritten)
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in rewritten.modules())
    tokens, pixels = exact.tokenizer(CAPTIONS), torch.stack([exact.prepare_image(im) for im in images()])
    with torch.inference_mode():  # the text tower runs with its causal mask, the image tower without
        torch.testing.assert_close(rewritten.encode_text(tokens), exact.model.encode_text(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rewritten.encode_image(pixels), exact.model.encode_image(pixels), rtol=1e-5, atol=1e-5)


def test_int8_quantizes_every_linear_of_what_is_loaded_and_stays_near_fp32(tiny_clip_dir):
    exact = load_embedder(str(tiny_clip_dir), "cpu")
    whole = load_embedder(str(tiny_clip_dir), "cpu", precision="int8")
    tower = load_embedder(str(tiny_clip_dir), "cpu", image_only=True, precision="int8")
    assert plain_linears(exact.model) > 0 and plain_linears(whole.model) == plain_linears(tower.model.visual) == 0
    assert quantized_layers(whole.model) == plain_linears(exact.model)
    assert quantized_layers(tower.model.visual) == plain_linears(exact.model.visual) > 0
    texts, pictures = whole.encode_text(CAPTIONS).vectors, tower.encode_images(images())
    for low_vectors, fp32_vectors in ((texts, exact.encode_text(CAPTIONS).vectors), (pictures, exact.encode_images(images()))):
        np.testing.assert_allclose(np.linalg.norm(low_vectors, axis=1), 1.0, atol=1e-5)
        cosines = (low_vectors * fp32_vectors).sum(axis=1)
        assert cosines.min() > 0.99 and not np.array_equal(low_vectors, fp32_vectors)


def test_int8_is_refused_off_the_cpu():
    with pytest.raises(OptionError, match="int8 runs on the CPU only .* on a GPU use bf16 or fp16"):
        prepare(torch.nn.Linear(4, 4), torch.device("cuda"), "int8")


def test_fp32_image_vectors_are_open_clips_own(tiny_clip_dir):
    embedder = load_embedder(str(tiny_clip_dir), "cpu")
    pixels = torch.stack([embedder.prepare_image(im) for im in images(3)])
    with torch.inference_mode():
        expected = embedder.model.encode_image(pixels, normalize=True).numpy()
    assert np.array_equal(embedder.encode_prepared(list(pixels)), expected)


def test_a_decoder_captions_at_the_precision_it_was_loaded_with(tmp_path):
    from ragcap.embedder_info import EmbedderInfo

    info = EmbedderInfo(spec="local:/models/tiny", dim=16)
    torch.manual_seed(0)
    DeCapDecoder(DeCapConfig(embed_dim=16, n_layer=1, n_head=2, n_embd=32, max_tokens=6), info).save(tmp_path / "dec")
    prefixes = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1)
    found = {}
    for precision in ("fp32", "bf16"):
        decoder = load_decoder(tmp_path / "dec", "cpu", precision=precision)
        with OutputDtypes(decoder) as watched:
            found[precision] = decoder.caption(prefixes)
        assert watched.seen == {torch.float32 if precision == "fp32" else torch.bfloat16}
    decoder = load_decoder(tmp_path / "dec", "cpu", precision="int8")
    exact = load_decoder(tmp_path / "dec", "cpu")
    assert quantized_layers(decoder) == plain_linears(exact) > 4  # the projection, the output layer and GPT-2's 4 per block
    found["int8"] = decoder.caption(prefixes)
    inputs = torch.randint(0, decoder.config.vocab_size, (4, 5))
    with torch.inference_mode():
        low, high = decoder(prefixes, inputs), exact(prefixes, inputs)
    assert (low - high).abs().max() < 0.05 * high.abs().max() and not torch.equal(low, high)
    assert all(len(rows) == 4 and all(np.isfinite(row[0].score) for row in rows) for rows in found.values())
    assert load_decoder(tmp_path / "dec", "cpu").precision == "fp32"


def test_the_prompt_lm_runs_at_the_precision_asked_for(tmp_path):
    from ragcap.decoders.lm_prompt import PromptCaptioner, save_random_lm

    lm = save_random_lm(tmp_path / "lm", shared_path("models", "gpt2-tokenizer"), n_layer=1, n_embd=32, n_head=2)
    neighbours = [["a dog on a sofa", "a dog sleeping"], ["two cats on the grass"]]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        prompter = PromptCaptioner(lm, device="cpu", precision=precision)
        with OutputDtypes(prompter.model) as watched:
            captions = prompter.caption(neighbours)
        # GPT-2's layers are Conv1D (addmm); its output layer is the Linear watched here.
        assert watched.seen == {dtype} and len(captions) == 2
    prompter = PromptCaptioner(lm, device="cpu", precision="int8")
    assert quantized_layers(prompter.model) == 1 + 4 and len(prompter.caption(neighbours)) == 2  # output layer, one block


def ragcap(*args, ok: bool = True, env: dict | None = None):
    result = runner.invoke(app, [str(a) for a in args], env=env)
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_ingest_and_caption_take_precision_and_say_it(tmp_path, tiny_clip_dir):
    corpus = tmp_path / "captions.txt"
    corpus.write_text("\n".join(CAPTIONS) + "\n")
    ragcap("ingest", "text", corpus, "-c", "exact", "-m", tiny_clip_dir)
    ragcap("ingest", "text", corpus, "-c", "half", "-m", tiny_clip_dir, "--precision", "bf16")
    with open_store() as store:
        exact, half = ({p["caption"]: v for _, vs, ps in store.scroll(name) for v, p in zip(vs, ps)} for name in ("exact", "half"))
    assert exact.keys() == half.keys() == set(CAPTIONS)
    cosines = [float(exact[c] @ half[c]) / float(np.linalg.norm(exact[c]) * np.linalg.norm(half[c])) for c in CAPTIONS]
    assert min(cosines) > 0.999 and any(not np.array_equal(exact[c], half[c]) for c in CAPTIONS)

    asked = ["caption", "--text", "a red cup", "-c", "exact", "--mode", "clipre", "--json", "--device", "cpu"]
    result = ragcap(*asked, "--precision", "bf16")
    assert json.loads(result.stdout)["precision"] == "bfloat16"
    assert any(line.startswith("ragcap: running on cpu, bfloat16") for line in result.stderr.splitlines())
    assert json.loads(ragcap(*asked, env={"RAGCAP_PRECISION": "fp16"}).stdout)["precision"] == "float16"
    assert json.loads(ragcap(*asked, "--precision", "int8").stdout)["precision"] == "int8"

    refused = ragcap(*asked, "--precision", "fp64", ok=False)
    assert refused.exit_code == 1 and "unknown precision 'fp64'; choose from fp32, bf16, fp16" in refused.output
    refused = ragcap("ingest", "text", corpus, "-c", "other", "-m", tiny_clip_dir, ok=False, env={"RAGCAP_PRECISION": "half"})
    assert refused.exit_code == 1 and "RAGCAP_PRECISION: unknown precision 'half'" in refused.output
    with open_store() as store:
        assert not store.exists("other")
