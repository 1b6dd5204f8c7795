import csv
import json
import shutil
from pathlib import Path

import pytest

from ragcap.errors import RagcapError
from ragcap.evaluate import (
    FORMATS,
    Reference,
    Scores,
    _spice,
    find_leakage,
    format_table,
    load_references,
    match_images,
    score,
    spice_unavailable,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
COCO_MANIFEST = SHARED / "data" / "coco" / "images" / "manifest.jsonl"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="no Java: apt-get install default-jre-headless")

INLINE = {  # used when ../shared is absent: 3 COCO val images, 5 human references each
    "73": [
        "An old motorcycle parked beside other motorcycles with a brown leather seat.",
        "Motorcycle parked in the parking lot of asphalt.",
        "A close up view of a motorized bicycle, sitting in a rack. ",
        "The back tire of an old style motorcycle is resting in a metal stand. ",
        "A motorcycle parked in a parking space next to another motorcycle.",
    ],
    "74": [
        "Dog snoozing by a bike on the edge of a cobblestone street",
        "The white dog lays next to the bicycle on the sidewalk.",
        "A puppy rests on the street next to a bicycle.",
        "a white dog is sleeping on a street and a bicycle",
        "A picture of a dog laying on the ground.",
    ],
    "133": [
        "A bed and desk in a small room.",
        "Wooden bed on top of a white dresser.",
        "A bed sits on top of a dresser and a desk.",
        "Bunk bed with a narrow shelf sitting underneath it. ",
        "A loft bed with a dresser underneath it.",
    ],
}


def example_references() -> dict[str, list[str]]:
    if not COCO_MANIFEST.exists():
        return INLINE
    with COCO_MANIFEST.open() as f:
        records = [json.loads(line) for line, _ in zip(f, range(3))]
    return {str(r["image_id"]): r["references"] for r in records}


@pytest.fixture(scope="module")
def scored():
    """One score() call (each starts JVMs) shared by the tests that read its numbers."""
    refs = example_references()
    a, b, c = refs
    own = refs[a][0]
    refs = {**refs, a: refs[a][1:], "unrelated": refs[a][1:]}
    candidates = {  # what score() receives, messy whitespace included
        a: own,
        b: "a white dog\r\nsleeping next\u2028to a bicycle .",
        c: "",
        "unrelated": "two plates of pasta with broccoli on a wooden table",
    }
    clean = {**candidates, b: "a white dog sleeping next to a bicycle ."}  # what it must score
    return candidates, clean, refs, score(candidates, refs)


def standard_pycocoevalcap(clean: dict[str, str], refs: dict[str, list[str]]) -> tuple[dict[str, float], list]:
    """The coco-caption recipe: tokenise gts and res with PTBTokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs[k]] for k in clean})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in clean.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    out = {f"Bleu_{i + 1}": b for i, b in enumerate(bleu)}
    out["METEOR"], _ = Meteor().compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], cider_each = Cider().compute_score(gts, res)
    return out, list(zip(gts.keys(), cider_each))


@needs_java
def test_scores_equal_pycocoevalcap_run_the_standard_way(scored):
    _, clean, refs, scores = scored
    expected, cider_each = standard_pycocoevalcap(clean, refs)
    assert scores.images == 4
    for metric, value in expected.items():
        assert scores.metrics[metric] == pytest.approx(value, abs=1e-9), metric
    assert scores.cider_per_image == pytest.approx(dict(cider_each))


@needs_java
def test_cider_rewards_a_human_caption_over_an_unrelated_one(scored):
    candidates, _, _, scores = scored
    own, _, empty, _ = candidates
    assert scores.cider_per_image[own] > 0.2
    assert scores.cider_per_image["unrelated"] < 0.1 * scores.cider_per_image[own]
    assert scores.cider_per_image[empty] == 0.0


@needs_java
def test_spice_is_skipped_with_a_reason_when_corenlp_is_absent(scored):
    *_, scores = scored
    reason = spice_unavailable()
    if reason is None:  # CoreNLP installed: SPICE must then have run
        assert scores.spice_skipped is None and 0.0 <= scores.metrics["SPICE"] <= 1.0
    else:
        assert scores.metrics["SPICE"] is None
        assert scores.spice_skipped == reason
        assert "stanford-corenlp-3.6.0" in reason and "get_stanford_models" in reason


def fake_java(tmp_path: Path, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    java = bin_dir / "java"
    java.write_text("#!/bin/sh\n" + body)
    java.chmod(0o755)
    return bin_dir


def test_spice_runner_averages_the_f_scores_spice_writes(tmp_path, monkeypatch):
    spice_output = [
        {"image_id": "1", "scores": {"All": {"f": 0.5, "pr": 0.5, "re": 0.5}}},
        {"image_id": "2", "scores": {"All": {"f": 0.25, "pr": 0.2, "re": 0.3}}},
    ]
    body = (
        'while [ $# -gt 0 ]; do [ "$1" = "-out" ] && out="$2"; shift; done\n'
        f"echo '{json.dumps(spice_output)}' > \"$out\"\n"
    )
    monkeypatch.setenv("PATH", str(fake_java(tmp_path, body)))
    gts, res = {"1": ["a dog"], "2": ["a cat"]}, {"1": ["a dog"], "2": ["a bird"]}
    assert _spice(gts, res) == (pytest.approx(0.375), None)


def test_spice_failure_is_reported_as_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_java(tmp_path, "echo 'InaccessibleObjectException' >&2\nexit 1\n")))
    value, reason = _spice({"1": ["a dog"]}, {"1": ["a dog"]})
    assert value is None
    assert "exit 1" in reason and "InaccessibleObjectException" in reason


def test_missing_java_names_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RagcapError, match=r"apt-get install default-jre-headless"):
        score({"73": "a motorcycle"}, {"73": ["a motorcycle parked"]})


def test_captions_of_unreferenced_images_are_refused():
    with pytest.raises(RagcapError, match="999"):
        score({"73": "a motorcycle", "999": "a cat"}, {"73": ["a motorcycle parked"]})


def test_table_prints_percent_with_one_decimal_and_the_spice_reason():
    metrics = {"Bleu_1": 0.7012, "Bleu_2": 0.5, "Bleu_3": 0.4, "Bleu_4": 0.2534, "METEOR": 0.2409,
               "ROUGE_L": 0.5123, "CIDEr": 0.91249, "SPICE": None}
    table = format_table({"decap": Scores(metrics, 10, spice_skipped="no CoreNLP"),
                          "prompt": Scores({**metrics, "SPICE": 0.181}, 10)})
    assert table.splitlines() == [
        "mode      B@1    B@4      M      R      C      S",
        "decap    70.1   25.3   24.1   51.2   91.2      -",
        "prompt   70.1   25.3   24.1   51.2   91.2   18.1",
        "S skipped: no CoreNLP",
    ]


# ---------------------------------------------------------------------------------------------
# reference formats

COCO_CONTENT = {  # file name -> (COCO image id, captions); a comma and stray spaces on purpose
    "COCO_val2014_000000000073.jpg": (73, ["A motorcycle parked, seat brown.", "Motorcycle in a lot. "]),
    "COCO_val2014_000000000074.jpg": (74, ["Dog snoozing by a bike", "A  puppy rests on the street."]),
}
FLICKR_CONTENT = {
    "1022454332_6af2c1449a.jpg": (None, ["A child and a woman , at waters edge .", "A boy at a lake ."]),
    "103106960_e8a41d64f8.jpg": (None, ['A boy "kneeling" in front of a net', "A kid playing goalie ."]),
}


def write_formats(tmp_path: Path, content: dict, coco_ids: bool) -> dict[str, Path]:
    out: dict[str, Path] = {}

    def write(name: str, text: str) -> None:
        out[name] = tmp_path / name
        out[name].write_text(text)

    items = list(content.items())
    karpathy = [{"filename": f, "split": "test", "sentences": [{"raw": c, "tokens": c.split()} for c in caps],
                 **({"cocoid": i} if coco_ids else {})} for f, (i, caps) in items]
    karpathy.append({"filename": "held_out.jpg", "split": "train", "cocoid": 5, "sentences": [{"raw": "x"}]})
    write("karpathy.json", json.dumps({"dataset": "coco", "images": karpathy}))
    write("by_image.json", json.dumps({str(i if coco_ids else f): caps for f, (i, caps) in items}))
    manifest = [{"file": f, "references": caps, **({"image_id": i} if coco_ids else {})} for f, (i, caps) in items]
    write("manifest.jsonl", "".join(json.dumps(record) + "\n" for record in manifest))
    if coco_ids:
        images = [{"id": i, "file_name": f} for f, (i, _) in items]
        annotations = [{"id": n, "image_id": i, "caption": c} for n, (i, c) in
                       enumerate((i, c) for _, (i, caps) in items for c in caps)]
        write("coco.json", json.dumps({"images": images, "annotations": annotations, "licenses": []}))
    else:
        write("flickr.token.txt", "".join(f"{f}#{n}\t{c}\n" for f, (_, caps) in items for n, c in enumerate(caps)))
        with (tmp_path / "captions.txt").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "caption"])
            writer.writerows((f, c) for f, (_, caps) in items for c in caps)
        out["captions.txt"] = tmp_path / "captions.txt"
    return out


@pytest.mark.parametrize("content, coco_ids, keys", [
    (COCO_CONTENT, True, ["73", "74"]),
    (FLICKR_CONTENT, False, ["1022454332_6af2c1449a", "103106960_e8a41d64f8"]),
])
def test_every_format_reads_the_same_references(tmp_path, content, coco_ids, keys):
    expected = {k: [" ".join(c.split()) for c in caps] for k, (_, caps) in zip(keys, content.values())}
    files = write_formats(tmp_path, content, coco_ids)
    assert len(files) == (4 if coco_ids else 5)
    for name, path in files.items():
        refs = load_references(path)
        assert {k: r.captions for k, r in refs.items()} == expected, name
        if name != "by_image.json":  # the only format without file names
            assert [r.file for r in refs.values()] == list(content), name


def test_karpathy_split_selects_images(tmp_path):
    path = write_formats(tmp_path, COCO_CONTENT, True)["karpathy.json"]
    assert list(load_references(path, split="train")) == ["5"]
    with pytest.raises(RagcapError, match=r"no images in split 'val'.*\['test', 'train'\]"):
        load_references(path, split="val")


def test_manifest_split_selects_lines(tmp_path):
    path = tmp_path / "manifest.jsonl"  # as the Flickr8k manifest: a "split" field per line
    path.write_text('{"file": "a.jpg", "split": "dev", "references": ["a"]}\n{"file": "b.jpg", "split": "test", "references": ["b"]}\n')
    assert list(load_references(path)) == ["a", "b"]
    assert list(load_references(path, split="test")) == ["b"]
    with pytest.raises(RagcapError, match=r"no images in split 'val'.*\['dev', 'test'\]"):
        load_references(path, split="val")


def test_real_reference_files_agree(tmp_path):
    coco = SHARED / "data" / "coco"
    if not (coco / "captions_val2014_by_image.json").exists():
        pytest.skip(f"{SHARED} absent: real COCO references not available")
    manifest = load_references(coco / "images" / "manifest.jsonl")
    by_image = load_references(coco / "captions_val2014_by_image.json")
    assert len(manifest) == 235
    assert all(by_image[k].captions == r.captions for k, r in manifest.items())


@pytest.mark.parametrize("content", ["", "\n  \n", "{}", "[]"])
def test_an_empty_reference_file_says_so(tmp_path, content):
    path = tmp_path / "refs.json"
    path.write_text(content)
    with pytest.raises(RagcapError, match=r"refs\.json: holds no references \(the file is empty\)"):
        load_references(path)


@pytest.mark.parametrize("name, text, match", [
    # Two photos under one id: merged, one would be scored against both photos' captions.
    ("refs.jsonl", '{"file": "a.jpg", "image_id": 5, "references": ["a cat"]}\n'
                   '{"file": "b.jpg", "image_id": 5, "references": ["a dog"]}\n', r"refs\.jsonl:2: image 5 is listed again with another file \(a\.jpg, then b\.jpg\)"),
    # A caption that is not text was dropped, silently scoring against fewer references.
    ("refs.jsonl", '{"file": "a.jpg", "references": ["a cat", 7]}\n', r"refs\.jsonl:1: image a\.jpg: a reference caption is 7, not text"),
    ("coco.json", json.dumps({"images": [{"id": 7, "file_name": "seven.jpg"}], "annotations": [{"image_id": 7, "caption": "a"}, {"image_id": 7, "caption": None}]}),
     r"image 7: a reference caption is None"),
])
def test_conflicting_or_non_text_references_are_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RagcapError, match=match):
        load_references(path)


def test_repeated_lines_of_one_image_merge(tmp_path):
    path = tmp_path / "refs.jsonl"  # the same image in two lines (one file spelt two ways) is one image
    path.write_text('{"file": "COCO_val2014_000000000073.jpg", "image_id": 73, "references": ["a"]}\n'
                    '{"file": "000000000073.jpg", "image_id": 73, "references": ["b"]}\n')
    assert load_references(path) == {"73": Reference("COCO_val2014_000000000073.jpg", ["a", "b"])}


def test_unknown_format_lists_the_known_ones(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("just some text\nand more\n")
    for fmt in (None, "xml"):
        with pytest.raises(RagcapError) as err:
            load_references(path, fmt=fmt)
        assert all(name in str(err.value) for name in FORMATS)


@pytest.mark.parametrize("name, text, where", [
    ("refs.jsonl", '{"file": "a.jpg", "references": ["a cat"]}\n{"file": "b.jpg", "references": []}\n',
     ":2: image b.jpg"),
    ("coco.json", json.dumps({"images": [{"id": 7, "file_name": "seven.jpg"}], "annotations": []}), "seven.jpg"),
    ("by_image.json", json.dumps({"7": ["a cat"], "8": ["  "]}), "image 8"),
])
def test_an_image_without_captions_is_an_error_naming_it(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RagcapError, match="no reference captions") as err:
        load_references(path)
    assert str(path) in str(err.value) and where in str(err.value)


def test_images_match_references_by_normalised_name(tmp_path):
    refs = {"73": Reference("COCO_val2014_000000000073.jpg", ["a"]), "74": Reference(None, ["b"]),
            "1022454332_6af2c1449a": Reference("1022454332_6af2c1449a.jpg", ["c"])}
    flickr = "1022454332_6af2c1449a"
    for name in ("000000000073.jpg", "COCO_val2014_000000000074.png", f"{flickr}.jpg", "cat.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    pairs, missing = match_images(refs, tmp_path)
    assert {k: p.name for k, p in pairs.items()} == {
        "73": "000000000073.jpg", "74": "COCO_val2014_000000000074.png", flickr: f"{flickr}.jpg"}
    assert [p.name for p in missing] == ["cat.jpg"]
    with pytest.raises(RagcapError, match="both image 73"):
        match_images(refs, ["73.jpg", "x/COCO_val2014_000000000073.jpg"])


def test_leakage_counts_stored_captions_of_evaluated_images():
    payloads = [
        {"caption": "a", "image_id": 73},
        {"caption": "b", "image_id": "73", "file": "COCO_val2014_000000000073.jpg"},  # counted once
        {"caption": "c", "file": "COCO_train2014_000000000074.jpg"},
        {"caption": "d", "image_id": "999"},
        {"caption": "e"},
    ]
    assert find_leakage({"73", "74"}, payloads) == 3
    assert find_leakage(set(), payloads) == 0
    # A memory without ids (a text corpus) leaks by holding the references themselves.
    texts = [{"caption": "A man  riding a wave"}, {"caption": "a dog"}, {"caption": "a man riding a wave on a board"}]
    assert find_leakage({"73"}, texts, ["a man riding a wave", "two cats"]) == 1
    # A memory with ids leaks by id only: another image's caption that happens to equal a
    # reference ("a man riding a wave" is common) is not the evaluated image's own caption.
    other = [{"caption": "a man riding a wave", "image_id": 999}, {"caption": "A man riding a wave", "file": "x.jpg"}]
    assert find_leakage({"73"}, other, ["a man riding a wave"]) == 0
