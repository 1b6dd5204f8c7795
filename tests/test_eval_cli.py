"""`ragcap eval` end to end on real COCO photographs and their human references."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ragcap.cli import app
from tests.conftest import shared_path

runner = CliRunner()
N_IMAGES = 4


def ragcap(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def eval_set(tmp_path_factory, tiny_clip_dir):
    """N real images with their manifest, a memory of other images' captions plus theirs, and a random decoder."""
    from ragcap.decoders import DeCapConfig, DeCapDecoder
    from ragcap.embed import load_embedder

    manifest = shared_path("data", "coco", "images", "manifest.jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    root = tmp_path_factory.mktemp("eval")
    images = root / "images"
    images.mkdir()
    for row in rows[:N_IMAGES]:
        shutil.copy(manifest.parent / row["file"], images / row["file"])
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in rows[:N_IMAGES]))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": c, "image": r["image_id"]}) + "\n" for r in rows[: N_IMAGES + 20] for c in r["references"]))
    exclude = root / "exclude.txt"
    exclude.write_text("\n".join(str(r["image_id"]) for r in rows[:N_IMAGES]))
    info = load_embedder(str(tiny_clip_dir)).info
    decoder = DeCapDecoder(DeCapConfig(embed_dim=info.dim, n_layer=1, n_head=2, n_embd=32, max_tokens=8), info)
    decoder.save(root / "decoder")
    return {"images": images, "refs": refs, "corpus": corpus, "exclude": exclude, "decoder": root / "decoder", "clip": tiny_clip_dir}


def ingest(s, collection, *extra):
    result = ragcap("ingest", "jsonl", s["corpus"], "-c", collection, "-m", s["clip"], "--text-field", "text", "--id-field", "image", *extra)
    assert result.exit_code == 0, result.output


def test_leakage_guard_trips_then_passes_after_exclusion(eval_set):
    ingest(eval_set, "leaky")
    refused = ragcap("eval", eval_set["refs"], "--images", eval_set["images"], "-c", "leaky", "--mode", "clipre")
    assert refused.exit_code == 1
    assert f"holds {5 * N_IMAGES} captions of the {N_IMAGES} images" in refused.output and "--exclude-images" in refused.output
    allowed = ragcap("eval", eval_set["refs"], "--images", eval_set["images"], "-c", "leaky", "--mode", "clipre", "--allow-leakage", "--json")
    assert allowed.exit_code == 0, allowed.output
    report = json.loads(allowed.stdout)
    assert report["images_scored"] == N_IMAGES and 0 <= report["scores"]["clipre"]["CIDEr"]
    corpus = {json.loads(line)["text"] for line in eval_set["corpus"].read_text().splitlines()}
    assert all(" ".join(c.split()) in {" ".join(t.split()) for t in corpus} for c in (v["clipre"] for v in report["captions"].values()))

    ingest(eval_set, "clean", "--exclude-images", eval_set["exclude"])
    clean = ragcap("eval", eval_set["refs"], "--images", eval_set["images"], "-c", "clean", "--mode", "clipre", "--json")
    assert clean.exit_code == 0, clean.output
    report = json.loads(clean.stdout)
    assert report["images_scored"] == N_IMAGES and report["images_missing"] == []


def test_leakage_guard_finds_the_references_in_a_memory_without_ids(eval_set, tmp_path):
    """Issue row: the same captions ingested as plain text (no image ids) were scored unseen."""
    rows = [json.loads(line) for line in eval_set["refs"].read_text().splitlines()]
    corpus = tmp_path / "refs.txt"
    corpus.write_text("".join(c.upper() + "\n" for c in rows[0]["references"]) + "a caption of no evaluated image\n")
    assert ragcap("ingest", "text", corpus, "-c", "textual", "-m", eval_set["clip"]).exit_code == 0
    refused = ragcap("eval", eval_set["refs"], "--images", eval_set["images"], "-c", "textual", "--mode", "clipre")
    assert refused.exit_code == 1 and f"holds {len(rows[0]['references'])} captions of the {N_IMAGES} images" in refused.output


def test_modes_in_one_run_score_as_separate_runs(eval_set):
    ingest(eval_set, "clean", "--exclude-images", eval_set["exclude"])
    common = ["--images", eval_set["images"], "-c", "clean", "--decoder", eval_set["decoder"], "--k", "10", "--no-spice", "--json"]
    together = json.loads(ragcap("eval", eval_set["refs"], "--mode", "clipre,vd,pd", *common).stdout)
    for mode in ("clipre", "vd", "pd"):
        alone = json.loads(ragcap("eval", eval_set["refs"], "--mode", mode, *common).stdout)
        assert alone["scores"][mode] == together["scores"][mode]
        assert {k: v[mode] for k, v in alone["captions"].items()} == {k: v[mode] for k, v in together["captions"].items()}


def test_missing_images_are_reported_and_the_rest_scored(eval_set, tmp_path):
    ingest(eval_set, "clean", "--exclude-images", eval_set["exclude"])
    partial = tmp_path / "partial"
    shutil.copytree(eval_set["images"], partial)
    removed = sorted(partial.iterdir())[0]
    shutil.copy(removed, partial / "stray.png")  # an image without references: said, not scored
    removed.unlink()
    result = ragcap("eval", eval_set["refs"], "--images", partial, "-c", "clean", "--mode", "clipre", "--json")
    assert result.exit_code == 1
    assert "referenced images are not in" in result.stderr and "--allow-missing" in result.stderr
    assert json.loads(result.stdout)["images_scored"] == N_IMAGES - 1
    subset = ragcap("eval", eval_set["refs"], "--images", partial, "-c", "clean", "--mode", "clipre", "--json", "--allow-missing")
    assert subset.exit_code == 0, subset.output
    assert json.loads(subset.stdout)["images_missing"] == [json.loads(result.stdout)["images_missing"][0]]
    assert "referenced images are not in" in subset.stderr  # still said, no longer an error
    assert json.loads(subset.stdout)["images_unreferenced"] == ["stray.png"]
    assert "1 image in" in subset.stderr and "has no references" in subset.stderr and "stray.png" in subset.stderr


def test_missing_images_are_listed_in_numeric_order():
    from ragcap.cli.decode import _image_order

    assert sorted(["100000", "1000", "99", "b.jpg", "a.jpg"], key=_image_order) == ["99", "1000", "100000", "a.jpg", "b.jpg"]


def test_unknown_reference_format_lists_known_ones(eval_set, tmp_path):
    odd = tmp_path / "refs.json"
    odd.write_text(json.dumps({"whatever": {"nested": 1}}))
    result = ragcap("eval", odd, "--images", eval_set["images"], "-c", "clean")
    assert result.exit_code == 1
    assert all(name in result.output for name in ("coco", "karpathy", "flickr", "manifest"))
