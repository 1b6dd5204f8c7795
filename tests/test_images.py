import numpy as np
import pytest
from PIL import Image, features

from ragcap.errors import ImageError
from ragcap.images import IMAGE_EXTENSIONS, load_image


def pixel(im: Image.Image, xy) -> tuple[int, int, int]:
    return im.getpixel(xy)


def assert_close(actual, expected, tol=8):
    assert np.abs(np.subtract(actual, expected)).max() <= tol, (actual, expected)


def test_exif_rotated_jpeg_is_upright(tmp_path):
    # Stored 40x20: left half red, right half blue. Orientation 6 = "rotate 90 degrees clockwise
    # to display", so the upright image is 20x40 with red on top.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)

    im = load_image(path)
    assert im.mode == "RGB" and im.size == (20, 40)
    assert_close(pixel(im, (10, 5)), (255, 0, 0), tol=40)
    assert_close(pixel(im, (10, 34)), (0, 0, 255), tol=40)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    im = load_image(path)
    assert im.mode == "RGB"
    assert_close(pixel(im, (8, 8)), (255, 0, 0), tol=20)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    im = load_image(path)
    assert im.mode == "RGB"
    assert [pixel(im, (x, 0)) for x in range(4)] == [(0,) * 3, (64,) * 3, (128,) * 3, (255,) * 3]


def test_palette_png_with_transparency_goes_on_white(tmp_path):
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    im.paste(0, (0, 0, 4, 8))
    im.info["transparency"] = 0  # black is transparent
    path = tmp_path / "palette.png"
    im.save(path, transparency=0)
    out = load_image(path)
    assert out.mode == "RGB"
    assert pixel(out, (1, 1)) == (255, 255, 255)
    assert pixel(out, (6, 1)) == (255, 0, 0)


def test_rgba_half_transparent_is_composited(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(path)
    assert_close(pixel(load_image(path), (0, 0)), (127, 127, 127), tol=1)


@pytest.mark.parametrize("mode,value,expected", [("L", 100, (100,) * 3), ("LA", (100, 0), (255,) * 3), ("1", 1, (255,) * 3)])
def test_grey_modes(tmp_path, mode, value, expected):
    path = tmp_path / f"grey-{mode}.png"
    Image.new(mode, (4, 4), value).save(path)
    assert pixel(load_image(path), (0, 0)) == expected


@pytest.mark.parametrize("suffix", [".webp", ".tif", ".tiff", ".bmp", ".png"])
def test_lossless_formats_round_trip(tmp_path, suffix):
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    source = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    path = tmp_path / f"image{suffix}"
    source.save(path, **({"lossless": True} if suffix == ".webp" else {}))
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(source))
    assert suffix in IMAGE_EXTENSIONS


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    assert pixel(load_image(path), (4, 4)) == (255, 0, 0)


def test_truncated_jpeg(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageError, match=r"cut\.jpg: corrupt or truncated"):
        load_image(path)


@pytest.mark.parametrize("name,content,reason", [
    ("empty.jpg", b"", "empty file"),
    ("notes.png", b"just some text, not a picture\n", "not an image"),
])
def test_bad_files(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=f"{name}: {reason}"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="nope.jpg: no such file"):
        load_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("side", [40, 100])  # 1600 px: Pillow only warns; 10000 px: Pillow errors
def test_decompression_bomb(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="bomb.png: refused as a possible decompression bomb"):
        load_image(path)


def test_bytes_and_pil_images_decode_exactly_as_the_file(tmp_path):
    # An EXIF-rotated CMYK JPEG exercises orientation and conversion on every input kind.
    stored = Image.new("CMYK", (40, 20), (0, 255, 255, 0))
    stored.paste((255, 0, 255, 0), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    from_file = np.asarray(load_image(path))
    assert from_file.shape == (40, 20, 3)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), from_file)
    with Image.open(path) as opened:
        assert np.array_equal(np.asarray(load_image(opened)), from_file)
        assert opened.size == (40, 20)  # the caller's image is neither rotated nor closed


def test_bytes_errors_use_the_given_name():
    with pytest.raises(ImageError, match="upload.png: not an image"):
        load_image(b"plain text", name="upload.png")
    with pytest.raises(ImageError, match="upload.png: empty file"):
        load_image(b"", name="upload.png")


def test_max_pixels_refuses_before_decoding(tmp_path):
    from ragcap.images import ImageTooLarge

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    with pytest.raises(ImageTooLarge, match=r"wide.png: 300x200 is 60,000 pixels, over the limit of 59,999"):
        load_image(path, max_pixels=59_999)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        load_image(Image.new("RGB", (300, 200)), max_pixels=100)
    assert load_image(path.read_bytes(), max_pixels=60_000).size == (300, 200)
