"""ragcap.vit: CLIP's image tower and preprocessing without open_clip, with open_clip's numbers;
and the image-only loads of ragcap.embed that use them (local directories, recorded hub specs)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.factory import _find_checkpoint_in_dir
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from ragcap import embed, vit
from ragcap.embed import load_embedder, parse_spec
from ragcap.images import load_image
from tests.conftest import shared_path
from tests.helpers import TINY_CLIP_CONFIG, hub_cache, make_tiny_clip

# What a cold start must not import for CLIP's image tower: open_clip and what it pulls in, and
# torch._dynamo (1.5 s on a CPU), which building a module on the meta device can pull in.
HEAVY = ("open_clip", "torchvision", "timm", "transformers", "torch._dynamo")


def pictures() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(70, 90), (64, 64), (120, 50)]]


def by_ragcap_vit(embedder) -> bool:
    return isinstance(embedder.model, vit.ImageCLIP)


def fresh(spec: str, **kwargs):
    """A load that does not come from the process's cache of embedders."""
    embed._CACHE.clear()
    return load_embedder(spec, device="cpu", **kwargs)


# -- the tower


TOWERS = {  # make_tiny_clip overrides
    "gelu": {},
    "quick-gelu": {"quick_gelu": True},
    "layer-scale": {"vision_cfg": {"ls_init_value": 0.5}},  # open_clip's gamma starts at 0.5: it matters
    "non-square, 16-wide heads, mlp x2.5": {"vision_cfg": {"image_size": [64, 48], "head_width": 16, "mlp_ratio": 2.5}},
}


@pytest.mark.parametrize("tower", TOWERS)
def test_the_tower_computes_what_open_clip_does(tmp_path, tower):
    directory = str(make_tiny_clip(tmp_path, seed=11, **TOWERS[tower]))
    whole = fresh(directory)  # open_clip's ordinary load of the whole model
    image_only = fresh(directory, image_only=True)
    assert by_ragcap_vit(image_only) and not by_ragcap_vit(whole)
    names = {name for name in whole.model.state_dict() if name.startswith("visual.")}
    assert set(image_only.model.state_dict()) == names
    assert image_only.info == whole.info and image_only.draft_size == whole.draft_size
    with torch.inference_mode():
        pixels = torch.stack([whole.prepare_image(im) for im in pictures()])
        expected = whole.model.encode_image(pixels).numpy()
        got = image_only.model.encode_image(pixels).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-5
    vectors, patches = image_only.encode_image_tokens(pictures())
    expected_vectors, expected_patches = whole.encode_image_tokens(pictures())
    assert np.abs(vectors - expected_vectors).max() <= 1e-5 and np.abs(patches - expected_patches).max() <= 1e-5


def test_layer_scale_and_quick_gelu_change_the_numbers(tmp_path):
    """The variants above are not vacuous: each changes what the tower computes."""
    plain = fresh(str(make_tiny_clip(tmp_path / "plain", seed=11)), image_only=True).encode_images(pictures())
    for name in ("quick-gelu", "layer-scale"):
        variant = fresh(str(make_tiny_clip(tmp_path / name, seed=11, **TOWERS[name])), image_only=True)
        assert np.abs(variant.encode_images(pictures()) - plain).max() > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precisions_through_the_tower_equal_open_clips_at_that_precision(tiny_clip_dir, precision):
    image_only = fresh(str(tiny_clip_dir), image_only=True, precision=precision)
    whole = fresh(str(tiny_clip_dir), precision=precision)
    assert by_ragcap_vit(image_only) and image_only.precision == precision
    got, expected = image_only.encode_images(pictures()), whole.encode_images(pictures())
    np.testing.assert_allclose(got, expected, atol=1e-5)
    fp32 = fresh(str(tiny_clip_dir), image_only=True).encode_images(pictures())
    assert np.abs(got - fp32).max() > 1e-4  # the precision was applied
    if precision == "int8":  # every linear layer of the tower quantized, attention's included
        assert not any(type(m) is torch.nn.Linear for m in image_only.loaded.modules())


# -- preprocessing


PREPROCESS = {  # overrides of open_clip's PreprocessCfg
    "224 bicubic (ViT-B, ViT-L, ViT-H)": {},
    "336 (ViT-L-14-336)": {"size": 336},
    "bilinear": {"interpolation": "bilinear"},
    "'random' is bicubic at inference": {"interpolation": "random"},
    "non-square": {"size": (224, 160)},
    "non-square, bilinear asked, bicubic done": {"size": (160, 224), "interpolation": "bilinear"},
    "squash": {"resize_mode": "squash", "size": (96, 128)},
    "squash, bilinear": {"resize_mode": "squash", "interpolation": "bilinear"},
    "other mean and std": {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.5, 0.75)},
}


def assert_same_pixels(config: dict, images: list[Image.Image]):
    config = {**vit.PREPROCESS_DEFAULTS, **config}
    theirs, ours = image_transform_v2(PreprocessCfg(**config), is_train=False), vit.Preprocess(config)
    for image in images:
        expected, got = theirs(image), ours(image)
        assert got.dtype == torch.float32 and got.shape == expected.shape, image.size
        assert torch.equal(got, expected), f"{image.size} {image.mode}: differs by {(got - expected).abs().max()}"


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos, one of each size found (COCO's and Flickr8k's, portrait and landscape)."""
    paths = sorted(shared_path("data", "coco", "images").glob("*.jpg")) + sorted(shared_path("data", "flickr8k", "images").glob("*.jpg"))
    by_size = {}
    for path in paths:
        with Image.open(path) as image:
            by_size.setdefault(image.size, path)
    return [load_image(path) for path in by_size.values()]


def test_preprocessing_is_bit_identical_on_real_photos(photos):
    assert len(photos) > 50 and {im.width > im.height for im in photos} == {True, False}
    assert_same_pixels({}, photos)


@pytest.mark.parametrize("config", PREPROCESS)
def test_each_preprocessing_is_bit_identical_on_photos(photos, config):
    assert_same_pixels(PREPROCESS[config], photos[::8])


@pytest.mark.parametrize("config", PREPROCESS)
def test_preprocessing_is_bit_identical_on_odd_sizes_and_modes(config):
    rng = np.random.default_rng(3)
    sizes = [(1, 1), (3, 7), (7, 3), (2, 90), (224, 225), (225, 224), (161, 223), (224, 224), (160, 224), (333, 334)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    grey = Image.fromarray(rng.integers(0, 256, (50, 31), dtype=np.uint8))
    # PIL resizes each mode its own way (palettes by nearest neighbour, alpha premultiplied)
    # before open_clip converts to RGB: the same calls in the same order give the same pixels.
    images += [grey, grey.convert("P"), Image.fromarray(rng.integers(0, 256, (31, 50, 4), dtype=np.uint8), "RGBA")]
    assert_same_pixels(PREPROCESS[config], images)


PREPROCESS_FILES = {  # a checkpoint's preprocess_cfg -> whether ragcap.vit takes the model
    "none given": (None, True),
    "mean, std, bilinear, squash": ({"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.3, 0.4], "interpolation": "bilinear",
                                     "resize_mode": "squash"}, True),
    "unknown keys and None values skipped": ({"mean": None, "resize_mode": "shortest", "crop_pct": 0.9}, True),
    "'longest' pads: left to open_clip": ({"resize_mode": "longest", "fill_color": 255}, False),
}


@pytest.mark.parametrize("case", PREPROCESS_FILES)
def test_a_directorys_preprocessing_is_the_one_open_clip_settles_on(tmp_path, case):
    preprocess_cfg, supported = PREPROCESS_FILES[case]
    directory = make_tiny_clip(tmp_path, seed=5, vision_cfg={"image_size": [64, 48]})
    config = json.loads((directory / embed.CONFIG_NAME).read_text())
    config.pop("preprocess_cfg")
    if preprocess_cfg is not None:
        config["preprocess_cfg"] = preprocess_cfg
    (directory / embed.CONFIG_NAME).write_text(json.dumps(config))
    reference = open_clip.create_model(f"local-dir:{directory}", load_weights=False).visual.preprocess_cfg
    resolved = embed._local_resolution(parse_spec(str(directory))).preprocess_cfg
    assert json.dumps(resolved) == json.dumps(reference)  # the same values (lists or tuples alike)
    image_only, whole = fresh(str(directory), image_only=True), fresh(str(directory))
    assert by_ragcap_vit(image_only) == supported
    for picture in pictures():
        assert torch.equal(image_only.prepare_image(picture), whole.prepare_image(picture))
    np.testing.assert_allclose(image_only.encode_images(pictures()), whole.encode_images(pictures()), atol=1e-5)


# -- what ragcap.vit takes, and what it leaves to open_clip

COMMON = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-B-32-quickgelu"]


def test_supports_the_common_towers_with_every_pretrained_tag():
    tags = [(arch, tag) for arch, tag in open_clip.list_pretrained() if arch in COMMON]
    assert len(tags) > 40 and {arch for arch, _ in tags} == set(COMMON)
    for arch, tag in tags:
        model_cfg = open_clip.get_model_config(arch)
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        if tag_cfg.get("quick_gelu"):  # as ragcap.embed forces it
            model_cfg["quick_gelu"] = True
        assert vit.supports(model_cfg, vit.preprocess_config(tag_cfg, model_cfg)), (arch, tag)


TINY_VISION = TINY_CLIP_CONFIG["vision_cfg"]
REFUSED = {
    "ResNet (RN50)": open_clip.get_model_config("RN50"),
    "timm tower (SigLIP)": open_clip.get_model_config("ViT-B-16-SigLIP"),
    "CoCa's attentional pool": open_clip.get_model_config("coca_ViT-B-32"),
    "CLIPA: avg pool, no ln_pre, ln after pool": open_clip.get_model_config("ViT-L-14-CLIPA"),
    **{f"vision {key}={value!r}": {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_VISION, key: value}} for key, value in [
        ("attentional_pool", True), ("pool_type", "avg"), ("final_ln_after_pool", True), ("no_ln_pre", True),
        ("pos_embed_type", "sin_cos_2d"), ("norm_kwargs", {"eps": 1e-6}), ("act_kwargs", {"approximate": "tanh"}),
        ("qk_norm", True), ("block_type", "custom"), ("output_tokens", True), ("a_future_option", 1),
    ]},
    "multimodal_cfg (CoCa)": {**TINY_CLIP_CONFIG, "multimodal_cfg": {}},
}


@pytest.mark.parametrize("case", REFUSED)
def test_supports_refuses_what_it_does_not_compute(case):
    preprocess = vit.preprocess_config({}, TINY_CLIP_CONFIG)
    assert vit.supports(TINY_CLIP_CONFIG, preprocess)
    assert not vit.supports(REFUSED[case], preprocess)


@pytest.mark.parametrize("preprocess", [{"resize_mode": "longest"}, {"interpolation": "nearest"}, {"mean": [0.5]}])
def test_supports_refuses_preprocessing_it_does_not_match(preprocess):
    assert not vit.supports(TINY_CLIP_CONFIG, {**vit.preprocess_config({}, TINY_CLIP_CONFIG), **preprocess})


@pytest.mark.parametrize("vision_cfg", [{"pool_type": "avg"}, {"final_ln_after_pool": True}])
def test_a_tower_it_refuses_still_loads_through_open_clip(tmp_path, vision_cfg):
    directory = str(make_tiny_clip(tmp_path, seed=6, vision_cfg=vision_cfg))
    image_only, whole = fresh(directory, image_only=True), fresh(directory)
    assert not by_ragcap_vit(image_only) and not image_only.has_text
    assert np.array_equal(image_only.encode_images(pictures()), whole.encode_images(pictures()))


# -- loading: checkpoints


@pytest.mark.parametrize("files", [
    ["open_clip_model.safetensors"],
    ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"],
    ["open_clip_pytorch_model.pth", "model.safetensors"],
    ["b.bin", "a.pth", "c.safetensors", "d.safetensors"],
    ["z.bin", "a.pth"],
    [],
])
def test_the_weights_file_chosen_is_open_clips_choice(tmp_path, files):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert embed._checkpoint_in_dir(tmp_path) == _find_checkpoint_in_dir(tmp_path)


def _float16_safetensors(state: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: t.half() for name, t in state.items()}, str(directory / embed.WEIGHTS_NAME))


def _torch_bin(state: dict, directory: Path) -> None:
    torch.save(state, directory / "open_clip_pytorch_model.bin")


def _training_checkpoint(state: dict, directory: Path) -> None:  # open_clip unwraps it; ragcap.vit leaves it
    torch.save({"epoch": 3, "state_dict": state}, directory / "epoch_3.pth")


@pytest.mark.parametrize("write,read_by_vit", [(_float16_safetensors, True), (_torch_bin, True), (_training_checkpoint, False)])
def test_checkpoint_formats(tmp_path, write, read_by_vit):
    from safetensors.torch import load_file

    directory = make_tiny_clip(tmp_path, seed=8)
    state = load_file(directory / embed.WEIGHTS_NAME)
    (directory / embed.WEIGHTS_NAME).unlink()
    write(state, directory)
    image_only, whole = fresh(str(directory), image_only=True), fresh(str(directory))
    assert by_ragcap_vit(image_only) == read_by_vit
    assert image_only.loaded.proj.dtype == torch.float32  # as open_clip's parameters hold a float16 file
    np.testing.assert_allclose(image_only.encode_images(pictures()), whole.encode_images(pictures()), atol=1e-5)


def test_an_image_only_load_of_a_directory_imports_no_open_clip(tiny_clip_dir):
    """The cold start's guard: captioning's load and one image, in a new process."""
    code = (
        "import sys; from PIL import Image; from ragcap.embed import load_embedder; "
        "e = load_embedder(sys.argv[1], device='cpu', image_only=True); "
        "assert e.encode_images([Image.new('RGB', (80, 60), 'red')]).shape == (1, 32); "
        f"print(type(e.model).__name__, [m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tiny_clip_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ImageCLIP", "[]"]


# -- loading: hub and pretrained-tag specs, resolved once through open_clip and then recorded


@pytest.fixture
def hub(tmp_path, monkeypatch) -> dict:
    """A tiny CLIP in huggingface_hub's cache as hf-hub:ragcap-test/tiny, and as the pretrained
    tag tiny-vit-test:hubtag (trained with QuickGELU, as OpenAI's tags: forced on load)."""
    import huggingface_hub.constants
    import open_clip.factory
    import open_clip.pretrained

    checkpoint = make_tiny_clip(tmp_path / "clip", seed=9)
    files = [checkpoint / embed.CONFIG_NAME, checkpoint / embed.WEIGHTS_NAME]
    cache = hub_cache(tmp_path / "hub", "ragcap-test/tiny", files)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    model_cfg = json.loads((checkpoint / embed.CONFIG_NAME).read_text())["model_cfg"]
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "tiny-vit-test", model_cfg)
    tags = {"hubtag": open_clip.pretrained._pcfg(hf_hub="ragcap-test/tiny/", quick_gelu=True)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "tiny-vit-test", tags)
    snapshot = next((cache / "models--ragcap-test--tiny" / "snapshots").iterdir())
    return {"specs": ["hf-hub:ragcap-test/tiny", "tiny-vit-test:hubtag"], "weights": snapshot / embed.WEIGHTS_NAME,
            "ref": cache / "models--ragcap-test--tiny" / "refs" / "main"}


def _recorded(spec: str) -> bool:
    return embed._recorded_resolution(parse_spec(spec)) is not None


def test_a_hub_spec_loads_without_open_clip_once_it_loaded_through_it(hub):
    for spec in hub["specs"]:
        assert not _recorded(spec)
        first = fresh(spec, image_only=True)  # through open_clip: the pretrained table, the hub cache
        assert not by_ragcap_vit(first) and _recorded(spec)
        again = fresh(spec, image_only=True)
        assert by_ragcap_vit(again) and again.info == first.info
        assert np.array_equal(again.encode_images(pictures()), first.encode_images(pictures()))
    quick_gelu = fresh(hub["specs"][1], image_only=True).model.visual.transformer.resblocks[0].mlp.gelu
    assert isinstance(quick_gelu, vit.QuickGELU)  # the tag's QuickGELU, forced as open_clip's factory is told to


def test_a_recorded_spec_needs_no_open_clip_in_a_new_process(hub, tmp_path):
    for spec in hub["specs"]:
        fresh(spec, image_only=True)
    expected = [fresh(spec, image_only=True).encode_images(pictures()[:1]) for spec in hub["specs"]]
    out = tmp_path / "vectors.npy"
    # open_clip in the new process knows neither the architecture nor the tag: only the record does.
    code = (
        "import sys, numpy as np; from PIL import Image; from ragcap.embed import check_available, load_embedder; "
        "specs = sys.argv[1:3]; [check_available(s) for s in specs]; "
        "image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (70, 90, 3), dtype=np.uint8)); "
        "np.save(sys.argv[3], np.stack([load_embedder(s, device='cpu', image_only=True).encode_images([image]) for s in specs])); "
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code, *hub["specs"], str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert np.array_equal(np.load(out), np.stack(expected))


def test_a_record_is_not_used_once_its_files_changed(hub):
    spec = hub["specs"][0]
    fresh(spec, image_only=True)
    assert _recorded(spec)
    stat = hub["weights"].stat()
    os.utime(hub["weights"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights rewritten in place
    assert not _recorded(spec)
    assert not by_ragcap_vit(fresh(spec, image_only=True)) and _recorded(spec)  # through open_clip, recorded anew
    hub["ref"].write_text("f" * 40 + "\n")  # a newer revision fetched into the cache
    assert not _recorded(spec)


def test_a_record_of_another_open_clip_version_is_not_used(hub, monkeypatch):
    spec = hub["specs"][0]
    fresh(spec, image_only=True)
    monkeypatch.setattr(embed, "_open_clip_version", lambda: "0.0.1")
    assert not _recorded(spec)


@pytest.mark.parametrize("damage", [
    lambda stored, spec: "{not json",
    lambda stored, spec: "[]",
    lambda stored, spec: json.dumps({spec: "a string"}),
    lambda stored, spec: json.dumps({spec: {**stored[spec], "checkpoint": 5}}),
    lambda stored, spec: json.dumps({spec: {**stored[spec], "files": None}}),
    lambda stored, spec: json.dumps({spec: {**stored[spec], "model_cfg": "ViT-B-32"}}),
    lambda stored, spec: json.dumps({spec: {**stored[spec], "preprocess_cfg": {"mean": [0.5]}}}),
])
def test_a_damaged_record_means_loading_through_open_clip(hub, ragcap_home, damage):
    spec = hub["specs"][0]
    expected = fresh(spec, image_only=True).encode_images(pictures())
    path = ragcap_home / embed.RESOLUTIONS_FILE
    path.write_text(damage(json.loads(path.read_text()), spec))
    assert not _recorded(spec)
    loaded = fresh(spec, image_only=True)
    assert not by_ragcap_vit(loaded) and np.array_equal(loaded.encode_images(pictures()), expected)
    assert _recorded(spec)  # and the record is whole again


def test_local_directories_and_unsupported_models_are_not_recorded(tiny_clip_dir, tmp_path, ragcap_home):
    fresh(str(tiny_clip_dir), image_only=True)
    fresh(str(make_tiny_clip(tmp_path, seed=6, vision_cfg={"no_ln_pre": True})), image_only=True)
    assert not (ragcap_home / embed.RESOLUTIONS_FILE).exists()
