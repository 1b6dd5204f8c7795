"""The public Python API, `from ragcap import ...`: the README's example and its input kinds."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.serving import CAPTIONS, fill, png, tiny_decoder


@pytest.fixture
def memory(tiny_clip_dir, tmp_path):
    """An embedded store holding CAPTIONS, and a decoder for it."""
    from ragcap.embed import load_embedder
    from ragcap.store import open_store

    embedder = load_embedder(str(tiny_clip_dir))
    with open_store() as store:
        fill(store, embedder)
    return tiny_decoder(tmp_path / "decoder", embedder)


def test_readme_example_captions_paths_bytes_and_pil_images_alike(memory, tmp_path):
    from ragcap import CaptionSettings, load_captioner, open_store

    path = tmp_path / "photo.png"
    path.write_bytes(png(3))
    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("pd", "clipre"), neighbours=2), decoder=memory)
        results = list(captioner.caption_images([path, path.read_bytes(), Image.open(path), b"broken"]))
    by_input = [results[0:2], results[2:4], results[4:6]]
    assert [r.source for r in results] == [str(path)] * 2 + ["image 1"] * 2 + [str(path)] * 2 + ["image 3"]
    for group in by_input[1:]:
        assert [(r.mode, r.caption, r.neighbours) for r in group] == [(r.mode, r.caption, r.neighbours) for r in by_input[0]]
    assert by_input[0][1].caption in CAPTIONS and len(by_input[0][0].neighbours) == 2
    from ragcap import ImageError

    assert isinstance(results[-1].exception, ImageError) and "image 3: not an image" in results[-1].error


def test_caption_each_groups_results_by_input_with_names(memory):
    from ragcap import CaptionSettings, load_captioner, open_store

    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("clipre", "vd")), decoder=memory)
        groups = list(captioner.caption_each([png(1), b"", png(2)], ["a.png", "b.png", "c.png"]))
    assert [[r.source for r in g] for g in groups] == [["a.png", "a.png"], ["b.png"], ["c.png", "c.png"]]
    assert [r.mode for r in groups[0]] == ["clipre", "vd"] and "b.png: empty file" in groups[1][0].error


def test_with_settings_shares_the_loaded_models(memory):
    from dataclasses import replace

    from ragcap import CaptionSettings, load_captioner, open_store

    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("pd",)), decoder=memory)
        other = captioner.with_settings(replace(captioner.settings, modes=("clipre", "nnd"), k=3))
        assert (other.embedder, other.decoder, other.k) == (captioner.embedder, captioner.decoder, 3)
        assert captioner.with_settings(captioner.settings) is captioner
        assert [r.mode for r in other.caption_images([png(5)])] == ["clipre", "nnd"]


def test_search_by_text_path_bytes_and_pil(memory, tmp_path):
    from ragcap import load_image, open_store, search

    path = tmp_path / "q.png"
    path.write_bytes(png(9))
    with open_store() as store:
        text, by_path, by_bytes, by_pil, broken = search(
            store, "mem", [CAPTIONS[5], path, path.read_bytes(), Image.open(io.BytesIO(path.read_bytes())), b"nope"], k=3)
    assert text.source == CAPTIONS[5] and text.neighbours[0].payload["caption"] == CAPTIONS[5]
    assert text.neighbours[0].score == pytest.approx(1.0, abs=1e-3)
    assert by_path.source == str(path) and len(by_path.neighbours) == 3
    for other in (by_bytes, by_pil):
        assert [h.id for h in other.neighbours] == [h.id for h in by_path.neighbours]
    assert broken.neighbours == [] and "not an image" in broken.error
    assert load_image(path).size == (48, 40)


def test_importing_ragcap_stays_light():
    """`import ragcap` (and so every CLI start) must not pay for torch or the web stack."""
    code = "import sys, ragcap; ragcap.__all__; assert not {'torch', 'fastapi'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    # Nor the api layer itself: storing pre-computed vectors (ingest parquet, clip-retrieval) needs no torch.
    code = "import sys, ragcap.api; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_one_input_where_a_list_belongs_is_refused_not_iterated(memory, tmp_path):
    """A str is iterable: caption_images("photo.jpg") used to caption 'p', 'h', ... as missing
    files, search(store, c, "a dog") to search for each letter, ingest_corpus one path per letter."""
    from ragcap import CaptionSettings, ingest_corpus, load_captioner, open_store, search

    path = tmp_path / "photo.png"
    path.write_bytes(png(3))
    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("clipre",)), decoder=memory, image_only=False)
        for one in (str(path), path.read_bytes(), Image.open(path)):
            with pytest.raises(TypeError, match="caption_images takes a list of images, not one"):
                list(captioner.caption_images(one))
        with pytest.raises(TypeError, match=r"caption_texts takes a list of texts, not one str: put it in a list, \['a dog'\]"):
            list(captioner.caption_texts("a dog"))
        with pytest.raises(TypeError, match="search takes a list of queries"):
            search(store, "mem", "a dog", k=2)
        with pytest.raises(TypeError, match="ingest_corpus takes a list of paths"):
            ingest_corpus(store, "text", str(path), "other")
        assert [r.source for r in search(store, "mem", ["a dog"], k=2)] == ["a dog"]
        assert not store.exists("other")


def test_names_of_another_count_than_the_inputs_are_refused(memory):
    """zip() used to drop the images past the last name without a word (and search to raise
    IndexError): a result per input, or an error."""
    from ragcap import CaptionSettings, load_captioner, open_store, search

    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("clipre",)), decoder=memory)
        with pytest.raises(ValueError, match="1 names for 3 images"):
            list(captioner.caption_images([png(1), png(2), png(3)], names=["a.png"]))
        with pytest.raises(ValueError):  # streams: found where the names run out, not after them
            list(captioner.caption_images(iter([png(1), png(2)]), names=iter(["a.png"])))
        assert [r.source for r in captioner.caption_images(iter([png(1)]), names=iter(["a.png"]))] == ["a.png"]
        with pytest.raises(ValueError, match="1 names for 2 queries"):
            search(store, "mem", [CAPTIONS[0], CAPTIONS[1]], k=2, names=["x"])


def test_caption_settings_take_modes_as_the_cli_does():
    """modes="pd,clipre" was iterated letter by letter (KeyError 'p' when loading), an unknown
    mode was a bare KeyError, and modes=() loaded a captioner that captioned nothing."""
    from ragcap import CaptionSettings, RagcapError

    assert CaptionSettings(modes="pd, clipre").modes == ("pd", "clipre")
    assert CaptionSettings(modes=["clipre", "pd"]).modes == ("clipre", "pd")
    assert hash(CaptionSettings(modes=["clipre"])) == hash(CaptionSettings(modes=("clipre",)))
    for wrong in (("xx",), (), "pd,xx"):
        with pytest.raises(RagcapError, match="unknown mode .*choose from pd, nnd, clipre"):
            CaptionSettings(modes=wrong)


def test_ingest_corpus_checks_its_paths_as_the_cli_does(tiny_clip_dir, tmp_path):
    """No paths used to be 'the source yielded no captions: check the file (is it empty?)'."""
    from ragcap import RagcapError, ingest_corpus, open_store

    with open_store() as store:
        with pytest.raises(RagcapError, match="no PATH: give the text files to read"):
            ingest_corpus(store, "text", [], "c", model=str(tiny_clip_dir))
        (tmp_path / "c.txt").write_text("a dog on a beach\n")
        _, summary = ingest_corpus(store, "text", [tmp_path / "c.txt"], "c", model=str(tiny_clip_dir))
        assert summary.stored == 1


def test_readme_python_example_runs_as_written_after_the_quick_start(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    """The README's Python API block, run as written where the quick start left its collection
    and decoder (here a tiny CLIP and decoder under the same names)."""
    import re

    from ragcap.embed import load_embedder
    from ragcap.store import open_store

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", (root / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    embedder = load_embedder(str(tiny_clip_dir))
    captions = (root / "examples" / "quickstart" / "captions.txt").read_text().splitlines()
    with open_store() as store:
        fill(store, embedder, captions, collection="quickstart")
    tiny_decoder(tmp_path / "decoders" / "quickstart", embedder)
    (tmp_path / "examples").symlink_to(root / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    sources = ["examples/quickstart/images/red-circle.png", "image 1", "examples/quickstart/images/brown-box.png"]
    expected = [f"{source} {mode} " for source in sources for mode in ("pd", "clipre")]
    assert [line[: len(start)] for line, start in zip(lines, expected)] == expected
    assert len(lines) == 9 and all(re.match(r"\d\.\d{4} ", line) and line[7:] in captions for line in lines[6:])


def test_blank_texts_are_refused_not_captioned(memory):
    """A blank text embedded like any other, answering captions and neighbours of nothing."""
    from ragcap import CaptionSettings, RagcapError, load_captioner, open_store, search

    with open_store() as store:
        captioner = load_captioner(store, "mem", CaptionSettings(modes=("clipre",)), decoder=memory, image_only=False)
        with pytest.raises(RagcapError, match="text 2 of 3 is empty"):
            list(captioner.caption_texts([CAPTIONS[0], "\t ", CAPTIONS[1]]))
        with pytest.raises(RagcapError, match="query 2 of 2 is empty"):
            search(store, "mem", [png(1), ""], k=2)
