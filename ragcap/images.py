"""Safe image loading: any file, bytes or PIL image a user hands over becomes an upright RGB image
or an ImageError.

Photos carry their orientation in EXIF, scans come as 16-bit or CMYK, web images as palettes
with transparency; a model wants upright 8-bit RGB. Decompression bombs (tiny files that
decode to gigapixels) are refused before they exhaust memory. A path, encoded bytes (an upload)
and an already-open PIL image all go through the same decoding, so the CLI and the server see
the same pixels for the same picture.
"""

from __future__ import annotations

import io
import os
import warnings
import queue
import threading
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ragcap.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"})

WHITE = (255, 255, 255)

# What captioning and search accept as an image: a file path, the bytes of an encoded image
# (JPEG, PNG, ...), or a PIL image.
ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ImageTooLarge(ImageError):
    """An image has more pixels than allowed: a decompression bomb, or over a server's limit."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16-bit greyscale (PNG/TIFF; older Pillow reads it as 'I'): scale 0..65535 to 0..255.
        # convert('L') would clip everything above 255 to white.
        values = np.asarray(im, dtype=np.float64)
        if im.mode == "F":  # float images come as 0..1 or already as 0..255
            scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 1 / 257
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Transparent pixels have arbitrary colour underneath; show them on white as viewers do.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def image_name(image: ImageInput, index: int) -> str:
    """How results and errors name an input: its path, else its position."""
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", None) or f"image {index}"


def load_image(image: ImageInput, max_pixels: int | None = None, name: str | None = None, draft: int | None = None) -> Image.Image:
    """Decode an image file, encoded bytes or a PIL image to an upright RGB PIL image (first
    frame of an animation). draft: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale while both
    sides stay at least this many pixels (PIL's draft mode: the decoder skips the detail).

    Raises ImageError naming the input (`name`, else its path) for a missing, empty, corrupt,
    truncated or non-image input, and ImageTooLarge for more than `max_pixels` pixels or a
    decompression bomb (more than Image.MAX_IMAGE_PIXELS). A PIL image passed in is left open.
    """
    name = name or image_name(image, 0)
    if isinstance(image, Image.Image):
        return _decode(lambda: image, name, max_pixels, owned=False)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise ImageError(f"{name}: empty file")
        return _decode(lambda: Image.open(io.BytesIO(image)), name, max_pixels, draft=draft)
    path = Path(image)
    if not path.exists():
        raise ImageError(f"{name}: no such file")
    if not path.is_file():
        raise ImageError(f"{name}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{name}: empty file")
    return _decode(lambda: Image.open(path), name, max_pixels, draft=draft)


def load_images(named: Sequence[tuple[ImageInput, str]], max_pixels: int | None = None) -> tuple[list[Image.Image], dict[int, ImageError]]:
    """Decode each (image, name): the images that load, and the error of each position that did not."""
    return _split([_load_one(image, name, max_pixels) for image, name in named])


def load_batches(
    batches: Iterable[Sequence[tuple[ImageInput, str]]], max_pixels: int | None = None,
    prepare: Callable[[Image.Image], object] | None = None, draft: int | None = None, workers: int = 0,
) -> Iterator[tuple[Sequence[tuple[ImageInput, str]], list, dict[int, ImageError]]]:
    """load_images over each batch, each image then passed through `prepare` (a model's
    preprocessing): per batch, (the batch, what loaded, each failed position's error). With
    workers, that many threads decode and prepare the next batch while the caller works on this
    one (Pillow's decoders and resizers and torch release the GIL)."""
    def one(image: ImageInput, name: str):
        return _load_one(image, name, max_pixels, draft, prepare)

    if not workers:
        yield from ((batch, *_split([one(*item) for item in batch])) for batch in batches)
        return
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        threading.Thread(target=_work, args=(jobs,), name="ragcap-load", daemon=True).start()

    def submit(item) -> Future:
        future: Future = Future()
        jobs.put((future, one, item))
        return future

    pending: deque = deque()
    try:
        for batch in batches:
            pending.append((batch, [submit(item) for item in batch]))
            if len(pending) > 1:  # one batch ahead
                batch, futures = pending.popleft()
                yield batch, *_split([f.result() for f in futures])
        for batch, futures in pending:
            yield batch, *_split([f.result() for f in futures])
    finally:
        for _, futures in pending:
            for f in futures:
                f.cancel()
        for _ in range(workers):
            jobs.put(None)


def _work(jobs: queue.SimpleQueue) -> None:
    """A loading thread. Daemon threads, not a ThreadPoolExecutor's, which the interpreter waits
    for at exit: a read that never returns (a FIFO, a hung network mount) must not keep Ctrl-C
    from ending the process."""
    while (job := jobs.get()) is not None:
        future, fn, item = job
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*item))
            except BaseException as e:  # noqa: BLE001 - raised again in the caller, by result()
                future.set_exception(e)


def _load_one(image: ImageInput, name: str, max_pixels: int | None, draft: int | None = None, prepare=None):
    try:
        loaded = load_image(image, max_pixels, name, draft)
    except ImageError as err:
        return err
    return prepare(loaded) if prepare is not None else loaded


def _split(results: list) -> tuple[list, dict[int, ImageError]]:
    loaded = [r for r in results if not isinstance(r, ImageError)]
    return loaded, {i: r for i, r in enumerate(results) if isinstance(r, ImageError)}


def allow_pixels(max_pixels: int) -> None:
    """Let Pillow open images of up to `max_pixels` in this process (a command's --max-pixels):
    its decompression-bomb limit is process-wide, and a 100-megapixel camera's photo is over it.
    The settings' max_pixels still refuses anything larger."""
    if Image.MAX_IMAGE_PIXELS is not None:  # None: the check is off already
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, max_pixels)


def _decode(open_image: Callable[[], Image.Image], name: str, max_pixels: int | None, owned: bool = True,
            draft: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_image()
            try:
                width, height = im.size  # known from the header, before any pixel is decoded
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageTooLarge(
                        f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {max_pixels:,}; "
                        "send a smaller image"
                    )
                if draft is not None:
                    im.draft(None, (draft, draft))  # a no-op but for JPEG
                im.load()  # decode now, inside the handlers, rather than lazily later
                upright = im
                try:
                    upright = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 - a damaged EXIF block should not lose a decodable photo
                    pass
                rgb = _to_rgb(upright)
                # The result must outlive the file it came from (closed below).
                return rgb.copy() if owned and rgb is im else rgb
            finally:
                if owned:
                    im.close()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(
            f"{name}: refused as a possible decompression bomb ({e}); if the image is genuine, allow it "
            "with --max-pixels N (PIL.Image.MAX_IMAGE_PIXELS in Python)"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for truncated/corrupt data
        raise ImageError(f"{name}: corrupt or truncated image: {e}") from e
