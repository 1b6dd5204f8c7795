"""Readers (pipelines/*) and the mapper stage (pipelines/filters.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines import SOURCES, BadRecord, CaptionRecord, ReadOptions, get_reader
from pipelines.filters import (GPT2TokenCounter, is_excluded, load_image_ids, normalise_caption,
                               normalise_image_id, parse_shard, shard_of)
from ragcap.errors import ModelError, RagcapError, SourceError

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real COCO/Flickr data) is absent")


def read(source: str, *paths: Path, **options) -> list:
    return list(get_reader(source)([str(p) for p in paths], ReadOptions(**options)))


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


# --- registry ---------------------------------------------------------------------------

def test_unknown_source_lists_all_sources():
    with pytest.raises(SourceError) as exc:
        get_reader("cocoa")
    for name in SOURCES:
        assert name in str(exc.value)
    assert {"coco-captions", "flickr", "cc3m", "text", "jsonl", "csv", "parquet", "hf", "clip-retrieval"} <= set(SOURCES)


@pytest.mark.parametrize("source", ["coco-captions", "flickr", "cc3m", "text", "jsonl", "csv", "parquet"])
def test_missing_file_is_named(tmp_path, source):
    missing = tmp_path / "nope.data"
    with pytest.raises(SourceError, match="nope.data: no such file"):
        read(source, missing, text_field="caption")


# --- coco-captions ----------------------------------------------------------------------

def test_coco_official(tmp_path):
    path = write(tmp_path / "captions_val2017.json", json.dumps({
        "images": [{"id": 7, "file_name": "000000000007.jpg"}, {"id": 9, "file_name": "000000000009.jpg"}],
        "annotations": [{"image_id": 7, "id": 1, "caption": "A cat."},
                        {"image_id": 9, "id": 2, "caption": "  "},
                        {"image_id": 9, "id": 3, "caption": "A dog."}]}))
    records = read("coco-captions", path)
    assert [r.payload() for r in records] == [
        {"caption": "A cat.", "corpus": "coco-captions", "image_id": "7", "file": "000000000007.jpg", "split": "val2017"},
        {"caption": "A dog.", "corpus": "coco-captions", "image_id": "9", "file": "000000000009.jpg", "split": "val2017"},
    ]
    assert records[1].location.endswith("captions_val2017.json:annotations[2]")
    with pytest.raises(SourceError, match="holds val2017, not 'train'"):
        read("coco-captions", path, split="train")


def karpathy(tmp_path: Path) -> Path:
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "cocoid": i, "split": split,
               "sentences": [{"raw": f"caption {i} {j}", "tokens": ["caption"]} for j in range(2)]}
              for i, split in enumerate(["train", "restval", "val", "test", "test"])]
    return write(tmp_path / "dataset_coco.json", json.dumps({"images": images, "dataset": "coco"}))


@pytest.mark.parametrize("split, images", [("train", {"0", "1"}), ("restval", {"1"}), ("val", {"2"}),
                                           ("test", {"3", "4"}), ("all", {"0", "1", "2", "3", "4"})])
def test_coco_karpathy_splits(tmp_path, split, images):
    records = read("coco-captions", karpathy(tmp_path), split=split)
    assert {r.image_id for r in records} == images
    assert len(records) == 2 * len(images)
    first = records[0]
    assert first.file == f"COCO_val2014_{int(first.image_id):012d}.jpg" and first.caption == f"caption {first.image_id} 0"


def test_coco_karpathy_needs_split(tmp_path):
    with pytest.raises(SourceError, match="pass --split with one of train .*present: restval, test, train, val"):
        read("coco-captions", karpathy(tmp_path))


def test_coco_by_image(tmp_path):
    path = write(tmp_path / "refs.json", json.dumps({"42": ["a", "b", ""], "73": ["c"]}))
    records = read("coco-captions", path)
    assert [(r.image_id, r.caption, r.split) for r in records] == [("42", "a", None), ("42", "b", None), ("73", "c", None)]


def test_coco_bad_json_has_line(tmp_path):
    path = write(tmp_path / "c.json", '{"images": [],\n "annotations": [\n {"image_id": 1,}]}')
    with pytest.raises(SourceError, match=r"c\.json:3: invalid JSON"):
        read("coco-captions", path)


def test_coco_not_utf8_is_error_even_with_skip_bad(tmp_path):
    path = write(tmp_path / "c.json", b'{"1": ["ok"],\n "2": ["caf\xe9"]}')
    with pytest.raises(SourceError, match=r"c\.json:2: not UTF-8"):
        read("coco-captions", path, skip_bad=True)


def test_coco_bad_annotation_skip_bad(tmp_path):
    path = write(tmp_path / "captions_train2014.json", json.dumps(
        {"images": [], "annotations": [{"image_id": 1, "caption": 5}, {"image_id": 1, "caption": "ok"}]}))
    with pytest.raises(SourceError, match=r"annotations\[0\]: caption is int.*--skip-bad"):
        read("coco-captions", path)
    records = read("coco-captions", path, skip_bad=True)
    assert [type(r) for r in records] == [BadRecord, CaptionRecord] and records[1].split == "train2014"


def test_coco_hub_name_offline_says_what_to_pass(monkeypatch):
    monkeypatch.setattr("pipelines.hf.hub_reachable", lambda: False)
    with pytest.raises(SourceError, match="download captions_train2017.json"):
        read("coco-captions", Path("ragcap-test/no-such-dataset"))


@needs_shared
def test_coco_real_official():
    records = read("coco-captions", SHARED / "data/coco/captions_val2017.json")
    assert len(records) == 25_014
    assert len({r.image_id for r in records}) == 5_000
    assert all(r.file == f"{int(r.image_id):012d}.jpg" and r.split == "val2017" for r in records)


@needs_shared
def test_coco_real_by_image():
    records = read("coco-captions", SHARED / "data/coco/captions_val2014_by_image.json")
    assert len(records) == 202_654
    assert len({r.image_id for r in records}) == 40_504


# --- flickr -----------------------------------------------------------------------------

def test_flickr_token_file(tmp_path):
    path = write(tmp_path / "Flickr8k.token.txt",
                 "1000268201_693b08cb0e.jpg#0\tA child .\n1000268201_693b08cb0e.jpg#1\tA girl .\n\n"
                 "1000092795.jpg#0\tTwo guys .\n")
    records = read("flickr", path)
    assert [(r.image_id, r.file, r.caption) for r in records] == [
        ("1000268201_693b08cb0e", "1000268201_693b08cb0e.jpg", "A child ."),
        ("1000268201_693b08cb0e", "1000268201_693b08cb0e.jpg", "A girl ."),
        ("1000092795", "1000092795.jpg", "Two guys .")]


def test_flickr_csv_quoted_commas_and_split_column(tmp_path):
    path = write(tmp_path / "captions.csv", 'image,caption,split\na.jpg,"A dog , a ball .",train\nb.jpg,A cat .,test\n')
    records = read("flickr", path)
    assert [(r.caption, r.split) for r in records] == [("A dog , a ball .", "train"), ("A cat .", "test")]
    assert [r.image_id for r in read("flickr", path, split="test")] == ["b"]


def test_flickr_split_without_split_column_is_error(tmp_path):
    path = write(tmp_path / "captions.txt", "image,caption\na.jpg,A dog .\n")
    with pytest.raises(SourceError, match="--exclude-images"):
        read("flickr", path, split="test")


def test_flickr_malformed_lines(tmp_path):
    path = write(tmp_path / "captions.txt", 'image,caption\na.jpg,ok\nb.jpg,"bad"quote\nc.jpg,x,extra\nd.jpg,fine\n')
    with pytest.raises(SourceError, match=r"captions\.txt:3: malformed CSV.*use --skip-bad"):
        read("flickr", path)
    records = read("flickr", path, skip_bad=True)
    assert [r.caption for r in records if isinstance(r, CaptionRecord)] == ["ok", "fine"]
    assert [r.location.rsplit(":", 1)[1] for r in records if isinstance(r, BadRecord)] == ["3", "4"]


def test_csv_fields_over_pythons_128_kib_default_are_read(tmp_path):
    # Issue row: a 200,000-character notes column made the row "malformed CSV (field larger than field limit)".
    notes = "x" * 200_000
    path = write(tmp_path / "long.csv", f'caption,notes\na dog on a sofa,"{notes}"\n')
    (record,) = read("csv", path, text_field="caption")
    assert record.caption == "a dog on a sofa"


def test_csv_headers_that_are_not_utf8(tmp_path):
    """A header cannot be skipped: it names the columns. Lines before a Flickr header can."""
    csv_path = write(tmp_path / "h.csv", b"caf\xe9,caption\nx,hello there\n")
    for skip_bad in (False, True):
        with pytest.raises(SourceError, match=r"h\.csv:1: (cannot read the header row \()?not UTF-8"):
            read("csv", csv_path, text_field="caption", skip_bad=skip_bad)
    flickr = write(tmp_path / "f.csv", b"\xe9\nimage,caption\n1.jpg,hello there\n")
    records = read("flickr", flickr, skip_bad=True)
    assert [r.location.rsplit(":", 1)[1] for r in records if isinstance(r, BadRecord)] == ["1"]
    assert [(r.file, r.caption) for r in records if isinstance(r, CaptionRecord)] == [("1.jpg", "hello there")]


def test_flickr_unknown_format(tmp_path):
    with pytest.raises(SourceError, match="not a Flickr caption file"):
        read("flickr", write(tmp_path / "x.txt", "just a caption\n"))


@needs_shared
def test_flickr_real_csv_and_test_exclusion():
    records = read("flickr", SHARED / "data/flickr8k/captions.txt")
    assert len(records) == 40_455
    assert len({r.image_id for r in records}) == 8_091
    assert sum("," in r.caption for r in records) > 2_000  # quoted commas kept inside captions
    test_ids = load_image_ids(SHARED / "data/flickr8k/Flickr_8k.testImages.txt")
    assert sum(is_excluded(r, test_ids) for r in records) == 5_000  # 1,000 test images x 5


# --- cc3m / text ------------------------------------------------------------------------

def test_cc3m(tmp_path):
    path = write(tmp_path / "cc3m.tsv", "caption\turl\na house\thttp://x/1.jpg\nempty url\t\n\t\nsame url\thttp://x/1.jpg\nno tab\n")
    with pytest.raises(SourceError, match=r"cc3m\.tsv:3: expected 'caption<TAB>url'"):
        read("cc3m", path)
    records = read("cc3m", path, skip_bad=True)
    good = [r for r in records if isinstance(r, CaptionRecord)]
    assert [r.payload()["url"] for r in good] == ["http://x/1.jpg", "http://x/1.jpg"]
    assert good[0].image_id == good[1].image_id and len(good[0].image_id) == 16
    assert [r.location.rsplit(":", 1)[1] for r in records if isinstance(r, BadRecord)] == ["3", "6"]


def test_text_gz_blank_lines_and_bom(tmp_path):
    path = tmp_path / "caps.txt.gz"
    with gzip.open(path, "wb") as f:
        f.write("\ufeffA dog.\r\n\n   \nA cat.\n".encode("utf-8"))
    records = read("text", path)
    assert [(r.caption, r.location.rsplit(":", 1)[1]) for r in records] == [("A dog.", "1"), ("A cat.", "4")]


def test_lone_carriage_returns_end_lines(tmp_path):
    """Classic Mac OS and some spreadsheet exports end lines with \r alone: each is a caption
    (a CSV row), numbered as such, not one caption of the whole file."""
    text = write(tmp_path / "cr.txt", b"first caption\rsecond caption\r\rthird caption\r")
    assert [(r.caption, r.location.rsplit(":", 1)[1]) for r in read("text", text)] == [
        ("first caption", "1"), ("second caption", "2"), ("third caption", "4")]
    table = write(tmp_path / "cr.csv", b'id,caption\r1,"two\r\nlines"\r2,plain\r')
    assert [(r.image_id, r.caption) for r in read("csv", table, text_field="caption", id_field="id")] == [
        ("1", "two\r\nlines"), ("2", "plain")]


def test_text_not_utf8(tmp_path):
    path = write(tmp_path / "caps.txt", b"good\nbad \xff\xfe\nalso good\n")
    with pytest.raises(SourceError, match=r"caps\.txt:2: not UTF-8.*--skip-bad"):
        read("text", path)
    records = read("text", path, skip_bad=True)
    assert [type(r).__name__ for r in records] == ["CaptionRecord", "BadRecord", "CaptionRecord"]


# --- jsonl / csv / parquet ----------------------------------------------------------------

def test_jsonl_fields_and_bad_lines(tmp_path):
    path = write(tmp_path / "c.jsonl", '{"text": "a", "img": 1}\n{"text": ["b", "c"], "img": "x"}\n{oops\n'
                                       '{"img": 2}\n{"text": null, "img": 3}\n')
    with pytest.raises(SourceError, match="no field 'caption'.*available fields: text, img"):
        read("jsonl", path, text_field="caption")
    with pytest.raises(SourceError, match=r"c\.jsonl:3: invalid JSON"):
        read("jsonl", path, text_field="text", id_field="img")
    records = read("jsonl", path, text_field="text", id_field="img", skip_bad=True)
    assert [(r.caption, r.image_id) for r in records if isinstance(r, CaptionRecord)] == [("a", "1"), ("b", "x"), ("c", "x")]
    assert sum(isinstance(r, BadRecord) for r in records) == 2


def test_csv_and_tsv(tmp_path):
    csv_path = write(tmp_path / "c.csv", 'id,caption\n1,"a, b"\n2,"multi\nline"\n')
    assert [(r.image_id, r.caption) for r in read("csv", csv_path, text_field="caption", id_field="id")] == [
        ("1", "a, b"), ("2", "multi\nline")]
    tsv_path = write(tmp_path / "c.tsv", "id\tcaption\n1\ta, b\n")
    assert [r.caption for r in read("csv", tsv_path, text_field="caption")] == ["a, b"]
    with pytest.raises(SourceError, match="pass --text-field.*available fields: id, caption"):
        read("csv", csv_path)


def test_parquet_export_round_trip(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    payloads = [{"caption": f"cap {i}", "corpus": "coco-captions", "image_id": str(i), "file": f"{i}.jpg",
                 "split": "train", "url": "u"} for i in range(5)]
    vectors = [[float(i), 0.5, -1.0] for i in range(5)]
    table = pa.table({"id": [f"id{i}" for i in range(5)], "caption": [p["caption"] for p in payloads],
                      "payload": [json.dumps(p) for p in payloads],
                      "vector": pa.array(vectors, type=pa.list_(pa.float32()))})
    path = tmp_path / "export.parquet"
    pq.write_table(table, path, row_group_size=2)  # several row groups: batches must line up
    records = read("parquet", path, text_field="caption", vector_field="vector")
    assert [r.payload() for r in records] == payloads
    assert [r.vector.tolist() for r in records] == vectors  # one float32 array per batch, not Python floats
    assert records[4].location.endswith("export.parquet:row 5")
    with pytest.raises(SourceError, match="no field 'emb'.*available fields: id, caption, payload, vector"):
        read("parquet", path, text_field="caption", vector_field="emb")


def test_parquet_vectors_of_uneven_or_missing_rows_are_reported_row_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = [[1.0, 2.0], None, [3.0], [4.0, 5.0]]
    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c", "d"], "vector": pa.array(vectors, type=pa.list_(pa.float32()))}), path)
    records = read("parquet", path, text_field="caption", vector_field="vector", skip_bad=True)
    good = [r for r in records if isinstance(r, CaptionRecord)]
    assert [(r.caption, list(r.vector)) for r in good] == [("a", [1.0, 2.0]), ("c", [3.0]), ("d", [4.0, 5.0])]
    bad = [r for r in records if not isinstance(r, CaptionRecord)]
    assert len(bad) == 1 and "ragged.parquet:row 2" in bad[0].location and "no vector in field 'vector'" in bad[0].reason


def test_parquet_vectors_that_cannot_be_stored_are_bad_rows(tmp_path):
    """Not numbers, NaN, infinity, all zeros: each its row's error (or a skipped row), never a
    crash, a stored point that breaks search, or an empty collection left behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "int": (pa.array([7, 8]), "field 'vector' holds int, not a list of numbers"),
        "text": (pa.array([["a", "b"], ["c", "d"]]), "field 'vector' holds list, not a list of numbers"),
        "nested": (pa.array([[[1.0]], [[2.0]]]), "field 'vector' holds list, not a list of numbers"),
        "nan": (pa.array([[1.0, float("nan")], [0.6, 0.8]]), "field 'vector' holds NaN or infinity"),
        "inf": (pa.array([[float("inf"), 1.0], [0.6, 0.8]]), "field 'vector' holds NaN or infinity"),
        "zero": (pa.array([[0.0, 0.0], [0.6, 0.8]]), "field 'vector' is all zeros, a vector without a direction"),
    }
    for kind, (vectors, reason) in columns.items():
        path = tmp_path / f"{kind}.parquet"
        pq.write_table(pa.table({"caption": ["first", "second"], "vector": vectors}), path)
        records = read("parquet", path, text_field="caption", vector_field="vector", skip_bad=True)
        assert (records[0].location, records[0].reason) == (f"{path}:row 1", reason), kind
        if kind in ("nan", "inf", "zero"):
            assert records[1].vector.dtype == np.float32 and records[1].vector.tolist() == pytest.approx([0.6, 0.8])
    with pytest.raises(SourceError, match=r"zero.parquet:row 1: field 'vector' is all zeros.*--skip-bad"):
        read("parquet", tmp_path / "zero.parquet", text_field="caption", vector_field="vector")


def test_parquet_not_parquet(tmp_path):
    with pytest.raises(SourceError, match="not a readable Parquet file"):
        read("parquet", write(tmp_path / "x.parquet", "hello"), text_field="caption")


# --- hf ---------------------------------------------------------------------------------

def test_hf_save_to_disk_round_trip(tmp_path):
    import datasets

    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentences": [["a", "b"], ["c"]], "cocoid": [1, 2]}),
        "test": datasets.Dataset.from_dict({"sentences": [["t"]], "cocoid": [3]})})
    data.save_to_disk(str(tmp_path / "ds"))
    records = read("hf", tmp_path / "ds", text_field="sentences", id_field="cocoid", split="train")
    assert [(r.caption, r.image_id, r.split) for r in records] == [("a", "1", "train"), ("b", "1", "train"), ("c", "2", "train")]
    with pytest.raises(SourceError, match="several splits; pass --split with one of: train, test"):
        read("hf", tmp_path / "ds", text_field="sentences")
    with pytest.raises(SourceError, match="no field 'caption'.*available fields: sentences, cocoid"):
        read("hf", tmp_path / "ds", text_field="caption", split="test")


def test_hf_offline_hub_name(monkeypatch):
    monkeypatch.setattr("pipelines.hf.hub_reachable", lambda: False)
    with pytest.raises(SourceError, match="hub is unreachable"):
        read("hf", Path("ragcap-test/no-such-dataset"), text_field="caption")


# --- filters ----------------------------------------------------------------------------

def test_normalise_caption():
    assert normalise_caption("  A  dog,\n\tRUNS .\u00a0 ") == "A dog, RUNS ."


@pytest.mark.parametrize("value", [391895, "000000391895", "COCO_val2014_000000391895.jpg", "000000391895.jpg",
                                   "val2014/COCO_val2014_000000391895.jpg"])
def test_normalise_coco_ids(value):
    assert normalise_image_id(value) == "391895"


def test_normalise_flickr_ids():
    assert normalise_image_id("1000268201_693b08cb0e.jpg") == "1000268201_693b08cb0e"
    assert normalise_image_id("1000092795.jpg") == "1000092795"


def test_load_image_ids_and_exclusion(tmp_path):
    as_json = load_image_ids(write(tmp_path / "ids.json", json.dumps([391895, "000000000042"])))
    as_lines = load_image_ids(write(tmp_path / "ids.txt", "COCO_val2014_000000391895.jpg\n\n42\n"))
    assert as_json == as_lines == {"391895", "42"}
    assert is_excluded(CaptionRecord("c", "x", file="000000391895.jpg"), as_json)
    assert is_excluded(CaptionRecord("c", "x", image_id="42"), as_json)
    assert not is_excluded(CaptionRecord("c", "x", image_id="43", file="43.jpg"), as_json)
    with pytest.raises(SourceError, match="JSON list of image ids"):
        load_image_ids(write(tmp_path / "bad.json", '[{"id": 1}]'))
    for empty in (write(tmp_path / "empty.txt", "\n \n"), write(tmp_path / "empty.json", "[]")):
        with pytest.raises(SourceError, match=f"{empty.name}: lists no image ids"):
            load_image_ids(empty)


@needs_shared
def test_karpathy_test_ids_exclude_from_coco_val2014():
    ids = load_image_ids(SHARED / "data/coco/karpathy_test_image_ids.json")
    assert len(ids) == 5_000
    records = read("coco-captions", SHARED / "data/coco/captions_val2014_by_image.json")
    excluded = {r.image_id for r in records if is_excluded(r, ids)}
    assert excluded == ids  # all test images are in val2014


def test_shards_disjoint_and_complete():
    keys = [f"key-{i}" for i in range(10_000)]
    shards = [{k for k in keys if shard_of(k, 4) == i} for i in range(1, 5)]
    assert sum(map(len, shards)) == len(keys) and set().union(*shards) == set(keys)
    assert all(2_000 < len(s) < 3_000 for s in shards)  # roughly balanced


def test_shard_is_stable_across_processes():
    # Another interpreter must agree: guards against the per-process salted hash().
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "from pipelines.filters import shard_of; print(shard_of('a', 1000))"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    assert int(out.stdout) == shard_of("a", 1000)


@pytest.mark.parametrize("text", ["0/4", "5/4", "a/b", "2", "1/0"])
def test_parse_shard_errors(text):
    with pytest.raises(RagcapError, match="expected I/N"):
        parse_shard(text)


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 4 / 4 ") == (4, 4)


@needs_shared
def test_gpt2_token_counts():
    counter = GPT2TokenCounter(str(SHARED / "models/gpt2-tokenizer"))
    assert counter.count(["A dog runs.", "hello world", ""]) == [4, 2, 0]
    # "A man" repeated: 2 tokens each; a trailing space would be a token of its own.
    assert counter.count([("A man " * 13).strip(), ("A man " * 12).strip(), "A man "]) == [26, 24, 3]


def test_gpt2_tokenizer_unavailable(monkeypatch):
    monkeypatch.setattr("pipelines.filters.hub_reachable", lambda: False)
    with pytest.raises(ModelError, match="--tokenizer DIR"):
        GPT2TokenCounter("ragcap-test/no-such-tokenizer")
