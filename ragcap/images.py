"""Safe image loading: any file a user points at becomes an upright RGB image or an ImageError.

Photos carry their orientation in EXIF, scans come as 16-bit or CMYK, web images as palettes
with transparency; a model wants upright 8-bit RGB. Decompression bombs (tiny files that
decode to gigapixels) are refused before they exhaust memory.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ragcap.errors import ImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp"})

WHITE = (255, 255, 255)


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


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file to an upright RGB PIL image (first frame of an animation).

    Raises ImageError naming the file for a missing, empty, corrupt, truncated or non-image
    file and for a decompression bomb (more than Image.MAX_IMAGE_PIXELS pixels).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode now, inside the handlers, rather than lazily later
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # noqa: BLE001 - a damaged EXIF block should not lose a decodable photo
                    pass
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(
            f"{path}: refused as a possible decompression bomb ({e}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "if the image is genuine"
        ) from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image (or a format Pillow cannot read)") from e
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for truncated/corrupt data
        raise ImageError(f"{path}: corrupt or truncated image: {e}") from e
