"""Images decoded and preprocessed by worker threads, one batch ahead of the model: the same
results in the same order, bad files reported per item exactly as when loaded in one thread;
JPEG draft mode only where it leaves preprocessing's input at least twice the model's."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ragcap.caption import CaptionSettings, Captioner
from ragcap.images import load_batches, load_image
from tests.test_caption import CAPTIONS, RecordingDecoder, embedder, store  # noqa: F401 - fixtures


def photo(seed: int, size=(96, 64)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def inputs(tmp_path):
    """Good files, bytes and PIL images with broken ones between them."""
    items = []
    for i in range(11):
        path = tmp_path / f"{i}.jpg"
        photo(i).save(path)
        items.append(str(path))
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    encoded = io.BytesIO()
    photo(20).save(encoded, "PNG")
    items[2:2] = [str(tmp_path / "empty.jpg")]
    items[6:6] = [encoded.getvalue(), str(tmp_path / "missing.jpg"), photo(21)]
    items.append(str(tmp_path / "notes.png"))
    return items


def test_worker_threads_load_in_order_with_each_error_in_its_place(inputs):
    named = [(item, f"item {i}") for i, item in enumerate(inputs)]
    batches = [named[i : i + 4] for i in range(0, len(named), 4)]
    alone = list(load_batches(batches, prepare=np.asarray))
    threaded = list(load_batches(iter(batches), prepare=np.asarray, workers=3))
    assert len(threaded) == len(batches)
    for (batch_a, images_a, errors_a), (batch_b, images_b, errors_b) in zip(alone, threaded):
        assert batch_a == batch_b
        assert {i: str(e) for i, e in errors_a.items()} == {i: str(e) for i, e in errors_b.items()}
        assert len(images_b) == len(batch_b) - len(errors_b)
        for a, b in zip(images_a, images_b):
            np.testing.assert_array_equal(a, b)
    failed = [batch[i][1] for batch, _, errors in threaded for i in errors]
    assert failed == ["item 2", "item 7", "item 15"]


def test_captions_from_worker_threads_equal_one_thread(store, embedder, inputs):  # noqa: F811
    def run(workers):
        settings = CaptionSettings(modes=("pd", "clipre"), k=10, batch_size=3, load_workers=workers)
        return [(r.source, r.mode, r.caption, r.error) for r in
                Captioner(store, "mem", embedder, settings, decoder=RecordingDecoder()).caption_images(inputs)]

    threaded = run(3)
    assert threaded == run(0)
    assert [error is not None for _, _, _, error in threaded].count(True) == 3


def test_draft_decodes_large_jpegs_smaller_within_tolerance(embedder, tmp_path):  # noqa: F811
    big = tmp_path / "big.jpg"
    photo(0, (80, 60)).resize((80 * 24, 60 * 24), Image.BICUBIC).save(big, quality=95)  # smooth, like a photo
    side = embedder.draft_size
    drafted = load_image(big, draft=side)
    assert min(drafted.size) >= side and drafted.size[0] < 80 * 24  # decoded at a reduced scale
    full, reduced = embedder.prepare_image(load_image(big)), embedder.prepare_image(drafted)
    assert full.shape == reduced.shape
    # Normalised pixels: ~0.27 x 255 levels per unit, so 0.02 is about 1.4 levels of 255.
    assert float((full - reduced).abs().mean()) < 0.02
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_image(png, draft=side).size == (80 * 24, 60 * 24)  # draft mode is for JPEG only
