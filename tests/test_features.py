"""`ragcap embed-images`: the paired image-feature cache on real COCO photographs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from ragcap.cli import app
from ragcap.errors import RagcapError
from ragcap.export import parquet_embedder
from ragcap.features import parts_dir, read_features
from tests.conftest import shared_path

runner = CliRunner()
N_IMAGES = 6


def ragcap(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """N real photographs in a folder, a manifest listing them plus one absent and one corrupt image."""
    manifest = shared_path("data", "coco", "images", "manifest.jsonl")
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][: N_IMAGES + 1]
    root = tmp_path_factory.mktemp("photos")
    (root / "images").mkdir()
    for row in rows[:N_IMAGES]:
        shutil.copy(manifest.parent / row["file"], root / "images" / row["file"])
    absent = rows[N_IMAGES]
    broken = {"file": "000000999999.jpg", "image_id": 999999, "references": ["a broken file"]}
    (root / "images" / broken["file"]).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    refs = root / "refs.jsonl"
    refs.write_text("".join(json.dumps(r) + "\n" for r in rows + [broken]))
    return {"dir": root / "images", "refs": refs, "rows": rows[:N_IMAGES], "absent": absent, "broken": broken}


def embed(photos, out, *extra):
    return ragcap("embed-images", photos["refs"], "--images", photos["dir"], "-o", out, *extra)


def test_every_image_once_with_its_references_and_the_embedder(photos, tiny_clip_dir, tmp_path):
    from ragcap.embed import load_embedder
    from ragcap.images import load_image

    out = tmp_path / "features.parquet"
    result = embed(photos, out, "-m", tiny_clip_dir, "--json", "--batch-size", "4")
    assert result.exit_code == 1  # written, but one image is absent and one unreadable
    summary = json.loads(result.stdout)
    assert (summary["images"], summary["encoded"], summary["reused"]) == (N_IMAGES, N_IMAGES, 0)
    assert summary["missing"] == [str(photos["absent"]["image_id"])]
    assert list(summary["broken"]) == [str(photos["dir"] / photos["broken"]["file"])]
    assert "1 referenced images are not in" in result.stderr and "could not read" in result.stderr

    embedder = load_embedder(str(tiny_clip_dir))
    assert parquet_embedder(out) == embedder.info
    features = read_features(out)
    assert features.image_ids == [str(r["image_id"]) for r in photos["rows"]]
    assert features.files == [r["file"] for r in photos["rows"]]
    assert features.references == [[" ".join(c.split()) for c in r["references"]] for r in photos["rows"]]
    expected = embedder.encode_images([load_image(photos["dir"] / r["file"]) for r in photos["rows"]])
    np.testing.assert_allclose(features.vectors, expected, atol=1e-6)
    captions, vectors, groups = features.pairs()
    assert len(captions) == sum(len(r["references"]) for r in photos["rows"]) and groups[0] == groups[4] != groups[5]
    np.testing.assert_array_equal(vectors[4], features.vectors[0])
    assert not parts_dir(out).exists()


def test_interrupted_run_resumes_and_a_rerun_encodes_nothing(photos, tiny_clip_dir, tmp_path):
    from ragcap import api
    from ragcap.evaluate import load_references, match_images

    refs = load_references(photos["refs"])
    pairs = match_images(refs, photos["dir"]).pairs
    out = tmp_path / "features.parquet"

    class Interrupted(Exception):
        pass

    def stop_after_first_batch(n):
        raise Interrupted

    with pytest.raises(Interrupted):
        api.embed_images(refs, pairs, out, model=str(tiny_clip_dir), batch_size=3, on_progress=stop_after_first_batch)
    assert not out.exists() and len(list(parts_dir(out).glob("part-*.parquet"))) == 1
    resumed = api.embed_images(refs, pairs, out, batch_size=3, model=str(tiny_clip_dir))
    assert (resumed.encoded, resumed.reused, resumed.images) == (N_IMAGES - 3, 3, N_IMAGES)
    assert list(resumed.broken) == [str(photos["dir"] / photos["broken"]["file"])]  # retried, still reported

    straight = tmp_path / "straight.parquet"
    api.embed_images(refs, pairs, straight, model=str(tiny_clip_dir), batch_size=3)
    assert pq.read_table(out).equals(pq.read_table(straight))

    again = json.loads(embed(photos, out, "--json").stdout)  # the file's own embedder by default
    assert (again["encoded"], again["reused"]) == (0, N_IMAGES)
    assert pq.read_table(out).equals(pq.read_table(straight))


def test_a_file_of_another_embedder_is_not_extended(photos, tiny_clip_dir, tmp_path):
    from tests.helpers import make_tiny_clip

    out = tmp_path / "features.parquet"
    embed(photos, out, "-m", tiny_clip_dir)
    other = make_tiny_clip(tmp_path / "other", seed=3)
    before = out.read_bytes()
    result = embed(photos, out, "-m", other)
    assert result.exit_code == 1 and f"holds features of local:{tiny_clip_dir.resolve()}" in result.output
    assert f"pass -m local:{tiny_clip_dir.resolve()} to extend it" in result.output
    assert out.read_bytes() == before


def test_a_text_only_model_is_refused_before_it_loads(photos, tmp_path, monkeypatch):
    # Before: the sentence-transformers model loaded (seconds) and was refused at the first image.
    import ragcap.embed

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before it was refused")

    monkeypatch.setattr(ragcap.embed, "_load_sentence_transformer", refuse)
    result = embed(photos, tmp_path / "features.parquet", "-m", "st:all-MiniLM-L6-v2")
    assert result.exit_code == 1 and "st:all-MiniLM-L6-v2 is a text-only embedder" in result.output
    assert not (tmp_path / "features.parquet").exists()


def test_no_matching_image_and_not_a_features_file_are_clear_errors(photos, tiny_clip_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = ragcap("embed-images", photos["refs"], "--images", empty, "-o", tmp_path / "f.parquet", "-m", tiny_clip_dir)
    assert result.exit_code == 1 and "none of the" in result.output
    (tmp_path / "notes.parquet").write_text("not parquet")
    with pytest.raises(RagcapError, match="not a features file"):
        read_features(tmp_path / "notes.parquet")
    with pytest.raises(RagcapError, match="no such features file"):
        read_features(tmp_path / "absent.parquet")
    (tmp_path / "d.parquet").mkdir()
    result = ragcap("embed-images", photos["refs"], "--images", photos["dir"], "-o", tmp_path / "d.parquet", "-m", tiny_clip_dir)
    assert result.exit_code == 1 and f"cannot write {tmp_path / 'd.parquet'}: it is a folder" in result.output


def test_a_later_column_leaves_the_reader_working(photos, tiny_clip_dir, tmp_path):
    """SmallCap will add patch features as another column; files with it must still train."""
    import pyarrow as pa

    out = tmp_path / "features.parquet"
    embed(photos, out, "-m", tiny_clip_dir)
    table = pq.read_table(out)
    patches = pa.array([[[0.5] * 4] * 3] * table.num_rows, pa.list_(pa.list_(pa.float32(), 4)))
    extended = tmp_path / "extended.parquet"
    pq.write_table(table.append_column("patches", patches).replace_schema_metadata(table.schema.metadata), extended)
    before, after = read_features(out), read_features(extended)
    assert after.embedder == before.embedder and after.pairs()[0] == before.pairs()[0]
    np.testing.assert_array_equal(after.vectors, before.vectors)


def test_nothing_readable_writes_nothing(photos, tiny_clip_dir, tmp_path):
    refs = tmp_path / "broken.jsonl"
    refs.write_text(json.dumps(photos["broken"]) + "\n")
    out = tmp_path / "features.parquet"
    result = ragcap("embed-images", refs, "--images", photos["dir"], "-o", out, "-m", tiny_clip_dir)
    assert result.exit_code == 1 and "could be read; nothing written" in result.output and "could not read" in result.output
    assert not out.exists() and not parts_dir(out).exists()
