"""`ragcap models import decap`: DeCap's published decoders in ragcap's layout, decoding as DeCap does.

No published checkpoint can be downloaded here, so the tests build state dicts with the published
key names and shapes. Source: dhg-wei/DeCap, train.py (class DeCap: `decoder`, a
GPT2LMHeadModel(decoder_config.pkl), and `clip_project`, MLP((512, 768)), i.e. nn.Sequential
holding one nn.Linear under `.model`; saved with torch.save(model.module.state_dict()));
decoder_config.pkl (read with pickletools: vocab_size 50257, n_positions 1024, n_embd 768,
n_layer 4, n_head 4, gelu_new); inference_decap.ipynb (Decoding: the prefix alone, greedy,
entry_length 30, stop at 49407, SimpleTokenizer.decode, then <|startoftext|>/<|endoftext|>
removed). transformers 4.x before 2023 also saved each attention's `bias` and `masked_bias`.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from pipelines.base import CaptionRecord
from ragcap.caption import CaptionSettings, Captioner
from ragcap.cli import app
from ragcap.decoders import DeCapDecoder, load_decoder
from ragcap.embed import load_embedder
from ragcap.errors import ModelError
from ragcap.generation import SearchOptions
from ragcap.importers.decap import checkpoint_shapes, config_from_checkpoint, import_decap
from ragcap.ingest import IngestOptions, ingest
from ragcap.store import open_store

runner = CliRunner()
CLIP_VOCAB, EOT = 49408, 49407
EMBED, WIDTH, LAYERS, HEADS, POSITIONS = 32, 32, 2, 2, 64  # tiny; the tiny CLIP's embeddings are 32-d

# The published coco_prefix-009.pt: DeCap's decoder_config.pkl sizes, a 512-d ViT-B/32 prefix.
PUBLISHED_LAYER = {
    "ln_1.weight": (768,), "ln_1.bias": (768,), "attn.c_attn.weight": (768, 2304), "attn.c_attn.bias": (2304,),
    "attn.c_proj.weight": (768, 768), "attn.c_proj.bias": (768,), "ln_2.weight": (768,), "ln_2.bias": (768,),
    "mlp.c_fc.weight": (768, 3072), "mlp.c_fc.bias": (3072,), "mlp.c_proj.weight": (3072, 768), "mlp.c_proj.bias": (768,),
}
PUBLISHED = {
    "decoder.transformer.wte.weight": (50257, 768), "decoder.transformer.wpe.weight": (1024, 768),
    **{f"decoder.transformer.h.{i}.{k}": shape for i in range(4) for k, shape in PUBLISHED_LAYER.items()},
    "decoder.transformer.ln_f.weight": (768,), "decoder.transformer.ln_f.bias": (768,), "decoder.lm_head.weight": (50257, 768),
    "clip_project.model.0.weight": (768, 512), "clip_project.model.0.bias": (768,),
}


class DeCapReference(torch.nn.Module):
    """DeCap's model as its train.py builds it (a GPT2LMHeadModel and one linear layer), tiny."""

    def __init__(self, seed: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        self.decoder = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=POSITIONS, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS))
        self.clip_project = torch.nn.Module()
        self.clip_project.model = torch.nn.Sequential(torch.nn.Linear(EMBED, WIDTH))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """DeCap.forward: [prefix token, token embeddings] through the GPT-2; all logits."""
        prefix = self.clip_project.model(x).reshape(-1, 1, WIDTH)
        return self.decoder(inputs_embeds=torch.cat([prefix, self.decoder.transformer.wte(tokens)], dim=1)).logits

    @torch.inference_mode()
    def decode(self, x: torch.Tensor, entry_length: int = 30) -> str:
        """DeCap's Decoding for one unit vector: from the prefix alone, greedy, no KV cache. Ids
        past CLIP's BPE cannot be detokenised (DeCap then returns 'None'), so the argmax is over CLIP's."""
        embeds, tokens = self.clip_project.model(x).reshape(1, 1, -1), []
        for _ in range(entry_length):
            token = int(self.decoder(inputs_embeds=embeds).logits[0, -1, :CLIP_VOCAB].argmax())
            tokens.append(token)
            if token == EOT:
                break
            embeds = torch.cat([embeds, self.decoder.transformer.wte(torch.tensor([[token]]))], dim=1)
        text = SimpleTokenizer().decode(tokens).replace("<|startoftext|>", "").replace("<|endoftext|>", "")
        return " ".join(text.split())

    def checkpoint(self) -> dict[str, torch.Tensor]:
        """The state dict as DeCap saved it, with the legacy attention buffers of its transformers."""
        state = {k: v.clone() for k, v in self.state_dict().items()}
        for i in range(LAYERS):
            state[f"decoder.transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(POSITIONS, POSITIONS, dtype=torch.uint8)).view(1, 1, POSITIONS, POSITIONS)
            state[f"decoder.transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        return state


@pytest.fixture(scope="module")
def reference():
    return DeCapReference().eval()


@pytest.fixture
def saved(reference, tmp_path):
    path = tmp_path / "coco_prefix-009.pt"
    torch.save(reference.checkpoint(), path)
    return path


def units(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, EMBED, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


def ragcap(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_import_gives_decaps_logits_and_captions(reference, saved, tiny_clip_dir, tmp_path):
    result = ragcap("models", "import", "decap", saved, tmp_path / "dec", "--heads", HEADS, "--model", tiny_clip_dir)
    assert result.exit_code == 0, result.output
    decoder = load_decoder(tmp_path / "dec", device="cpu")
    assert decoder.config.writes_sot and decoder.config.vocab_size == 50257 and decoder.config.n_positions == POSITIONS
    x, tokens = units(3), torch.randint(0, CLIP_VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        theirs = reference(x, tokens)[:, 1:, :CLIP_VOCAB]
        torch.testing.assert_close(decoder(x, tokens), theirs, rtol=0, atol=1e-5)
    x = units(6, seed=2)
    assert decoder.generate(x) == [reference.decode(row[None]) for row in x]
    assert decoder.generate(x, SearchOptions(max_tokens=4)) == [reference.decode(row[None], entry_length=4) for row in x]
    three = decoder.caption(x[:2], SearchOptions(num_return=3))
    assert [len(row) for row in three] == [3, 3] and all(len(set(c.text for c in row)) == 3 for row in three)


def test_an_imported_decoder_captions_in_pd_nnd_and_vd(reference, saved, tiny_clip_dir, tmp_path):
    decoder = load_decoder(import_decap(saved, tmp_path / "dec", heads=HEADS, model=str(tiny_clip_dir)), device="cpu")
    embedder = load_embedder(str(tiny_clip_dir))
    store = open_store(memory=True)
    captions = ["a dog on the grass", "two cats on a sofa", "a bird on the beach", "a horse running"]
    ingest((CaptionRecord(caption=c, corpus="test") for c in captions), store, "mem", embedder.info, lambda: embedder, IngestOptions())
    settings = CaptionSettings(modes=("pd", "nnd", "vd"), k=len(captions))
    results = list(Captioner(store, "mem", embedder, settings, decoder=decoder).caption_texts(["a dog running"]))
    query = embedder.encode_text(["a dog running"]).vectors
    nearest = torch.from_numpy(np.asarray(store.search("mem", query, 1, with_vectors=True)[0][0].vector, dtype=np.float32))
    store.close()
    assert [r.mode for r in results] == ["pd", "nnd", "vd"] and all(r.error is None and r.caption for r in results)
    assert results[1].caption == reference.decode(nearest[None] / nearest.norm())
    assert results[2].caption == reference.decode(torch.from_numpy(query))


def test_published_layout_is_what_the_importer_expects():
    state = {k: torch.empty(shape, device="meta") for k, shape in PUBLISHED.items()}
    config = config_from_checkpoint("coco_prefix-009.pt", state)
    assert (config.embed_dim, config.n_layer, config.n_head, config.n_embd) == (512, 4, 4, 768)
    assert (config.vocab_size, config.n_positions, config.max_tokens, config.writes_sot) == (50257, 1024, 30, True)
    with torch.device("meta"):
        from ragcap.embedder_info import EmbedderInfo

        decoder = DeCapDecoder(config, EmbedderInfo("ViT-B-32:openai", 512))
    assert checkpoint_shapes(decoder) == PUBLISHED


def import_error(path, out, model) -> str:
    with pytest.raises(ModelError) as err:
        import_decap(path, out, heads=HEADS, model=str(model))
    return str(err.value)


def test_missing_extra_and_misshaped_keys_are_named(reference, tiny_clip_dir, tmp_path):
    cases = {
        "missing": lambda s: s.pop("decoder.transformer.h.1.ln_2.bias"),
        "extra": lambda s: s.update({"decoder.transformer.h.0.attn.rotary": torch.zeros(2)}),
        "shape": lambda s: s.update({"decoder.transformer.ln_f.weight": torch.zeros(WIDTH + 1)}),
    }
    said = {}
    for name, damage in cases.items():
        state = reference.checkpoint()
        damage(state)
        torch.save(state, tmp_path / f"{name}.pt")
        said[name] = import_error(tmp_path / f"{name}.pt", tmp_path / name, tiny_clip_dir)
        assert not (tmp_path / name).exists()  # nothing half-written
    assert "missing key 'decoder.transformer.h.1.ln_2.bias'" in said["missing"]
    assert "unexpected key 'decoder.transformer.h.0.attn.rotary'" in said["extra"]
    assert f"key 'decoder.transformer.ln_f.weight' has shape ({WIDTH + 1},), expected ({WIDTH},)" in said["shape"]


def test_pickles_clipcap_checkpoints_and_bad_heads_are_refused(reference, saved, tiny_clip_dir, tmp_path):
    config_pickle = tmp_path / "decoder_config.pkl"  # what DeCap's repository ships beside the weights
    config_pickle.write_bytes(pickle.dumps(GPT2Config(n_layer=4)))
    assert "pickled objects" in import_error(config_pickle, tmp_path / "a", tiny_clip_dir)
    code = tmp_path / "code.pt"
    torch.save({"decoder.transformer.wte.weight": torch.zeros(2), "hook": np.dtype}, code)
    assert "refused" in import_error(code, tmp_path / "b", tiny_clip_dir)
    clipcap = tmp_path / "clipcap.pt"
    torch.save({f"gpt.{k.removeprefix('decoder.')}": v for k, v in reference.checkpoint().items()}, clipcap)
    assert "models import clipcap" in import_error(clipcap, tmp_path / "c", tiny_clip_dir)
    with pytest.raises(ModelError, match="--heads 3 does not divide the decoder's width 32"):
        import_decap(saved, tmp_path / "d", heads=3, model=str(tiny_clip_dir))
    result = ragcap("models", "import", "decap", saved, tmp_path / "e", "--mapping", "mlp")
    assert result.exit_code != 0 and "--mapping does not apply to decap checkpoints" in result.output


def test_an_existing_decoder_is_kept(saved, tiny_clip_dir, tmp_path):
    out = import_decap(saved, tmp_path / "dec", heads=HEADS, model=str(tiny_clip_dir))
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ModelError, match="already holds a decoder"):
        import_decap(saved, out, heads=HEADS, model=str(tiny_clip_dir))
    assert (out / "model.safetensors").read_bytes() == before


def test_an_out_that_is_a_file_is_refused_before_the_checkpoint_is_read(tiny_clip_dir, tmp_path):
    # Before: the checkpoint was read and converted, then "File exists: OUT".
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "notes").write_text("keep")
    for kind, extra in (("decap", []), ("clipcap", ["--lm", tmp_path]), ("smallcap", ["--lm", tmp_path])):
        result = ragcap("models", "import", kind, tmp_path / "garbage.pt", tmp_path / "notes", *extra)
        assert result.exit_code == 1 and f"{tmp_path / 'notes'} is a file; give a directory" in result.output, (kind, result.output)
    assert (tmp_path / "notes").read_text() == "keep"


def test_a_save_cut_short_leaves_no_decoder_and_a_rerun_completes(saved, tiny_clip_dir, tmp_path, monkeypatch):
    # config.json marks a complete decoder: it used to be written first, so a save that failed
    # at the weights or assets left a folder refused as "already holds a decoder".
    def full_disk(self, out):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DeCapDecoder, "save_assets", full_disk)
    with pytest.raises(OSError):
        import_decap(saved, tmp_path / "dec", heads=HEADS, model=str(tiny_clip_dir))
    assert not (tmp_path / "dec" / "config.json").exists()
    monkeypatch.undo()
    out = import_decap(saved, tmp_path / "dec", heads=HEADS, model=str(tiny_clip_dir))
    assert load_decoder(out).config.writes_sot
