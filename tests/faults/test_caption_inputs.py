"""`caption`'s inputs and options: each mistake refused before any model loads, and every file
that exists captioned, whatever its name."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ragcap.report import _completed
from tests.faults.conftest import cli, ingest, inline, one_error_line


@pytest.fixture
def images(tmp_path, tiny_clip_dir):
    """A collection to caption against (clipre needs no decoder) and two images."""
    ingest("shapes", [f"a {c} square on white" for c in ("red", "green", "blue")], tiny_clip_dir)
    paths = []
    for name, colour in (("red.png", "red"), ("blue.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def clipre(*args):
    return inline("caption", *args, "-c", "shapes", "--mode", "clipre", "--json")


@pytest.mark.parametrize("option,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--batch-size", "-1"], "--batch-size must be at least 1, not -1"),
    (["--k", "0"], "--k must be at least 1, not 0"),
    (["--tau", "0"], "--tau must be a number above 0, not 0.0"),
    (["--tau", "-1"], "--tau must be a number above 0, not -1.0"),
    (["--tau", "nan"], "--tau must be a number above 0, not nan"),
    (["--max-pixels", "0"], "--max-pixels must be at least 1, not 0"),
])
def test_settings_that_would_caption_nothing_or_nan_are_refused(images, option, message):
    """Issue rows: --batch-size 0 captioned nothing and exited 0; --tau 0 wrote NaN scores."""
    assert message in one_error_line(clipre(*images, *option))


def test_texts_and_images_are_not_mixed_in_one_output(images):
    """Issue row: the image's result was written under "text", where scripts and --resume read a query."""
    assert "caption the images and the texts in separate runs" in one_error_line(clipre(images[0], "--text", "a red thing"))


def test_an_output_that_is_a_folder_is_refused_before_any_work(images, tmp_path):
    """Issue row: the whole run was captioned, then renaming FILE.partial onto the folder failed."""
    folder = tmp_path / "results"
    folder.mkdir()
    assert f"cannot write {folder}: it is a folder" in one_error_line(clipre(*images, "-o", folder))
    assert not (tmp_path / "results.partial").exists()


def test_existing_files_named_like_patterns_or_lists_are_captioned(images, tmp_path, monkeypatch):
    """Issue row: photo[1].png was taken for a glob and @home.png for a list, and the run stopped."""
    monkeypatch.chdir(tmp_path)
    for name in ("photo[1].png", "@home.png"):
        (tmp_path / name).write_bytes(images[0].read_bytes())
    result = clipre("photo[1].png", "@home.png")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["file"] for line in result.stdout.splitlines()] == ["photo[1].png", "@home.png"]


def test_an_empty_stdin_is_an_error_not_an_empty_result(images):
    """Issue row: `find ... | ragcap caption -` that found nothing exited 0 with nothing written."""
    run = cli("caption", "-", "-c", "shapes", "--mode", "clipre", input="")
    assert run.returncode == 1 and "nothing to caption: - listed no images" in run.stderr


def test_max_pixels_admits_a_photo_over_pillows_bomb_limit(images, monkeypatch):
    """Issue row: a 100-megapixel camera's photo was refused as a decompression bomb, and the
    remedy offered (PIL.Image.MAX_IMAGE_PIXELS) was out of a CLI user's reach. Pillow's limit is
    lowered here so that a 64x64 image stands for the large photo."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused = json.loads(clipre(images[0]).stdout)
    assert "decompression bomb" in refused["error"] and "--max-pixels N" in refused["error"]
    assert json.loads(clipre(images[0], "--max-pixels", "5000").stdout)["caption"] == "a red square on white"
    too_large = json.loads(clipre(images[0], "--max-pixels", "4000").stdout)
    assert "4,096 pixels, over the limit of 4,000" in too_large["error"]


def test_resume_reads_smallcap_text_lines_and_csv_names_with_line_breaks(tmp_path):
    """Issue rows: text output's "smallcap" (8 characters) was read as mode "smallca"; a CSV row
    whose file name holds a line break was read as two broken rows."""
    text = b"a.jpg\n  smallcap a dog on grass\nb.jpg\n  smallcap a cat\n"
    assert _completed(text, "text", ["smallcap"], "file", tmp_path / "out.txt")[1] == {"a.jpg"}  # the last is redone
    rows = ('file,mode,caption,score,error,neighbours\r\n"new\nline.jpg",clipre,a dog,,,\r\n'
            'ok.jpg,clipre,a cat,,,\r\n"cut\nshort.jpg",clip').encode()
    kept, done, failed = _completed(rows, "csv", ["clipre"], "file", tmp_path / "out.csv")
    assert done == {"new\nline.jpg", "ok.jpg"} and failed == 0 and rows[:kept].endswith(b"a cat,,,\r\n")
