"""Caption evaluation: human reference files, the COCO caption metrics, and the leakage guard.

Scores are pycocoevalcap's (the coco-caption server code every captioning paper reports):
captions are PTB-tokenised by Stanford's tokenizer, then scored with BLEU-1..4, METEOR, ROUGE-L,
CIDEr(-D) and, when its Stanford CoreNLP jars are installed, SPICE. Values are fractions as the
scorers return them; format_table prints them x100 as the papers' tables do.

Java runs the tokenizer, METEOR and SPICE, and each call starts a JVM (seconds), so score()
makes one call per metric over all images, never one per image.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

from pipelines.filters import normalise_caption, normalise_image_id
from ragcap.errors import RagcapError
from ragcap.images import IMAGE_EXTENSIONS

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
FORMATS = ("coco", "karpathy", "coco-by-image", "flickr", "manifest")
FORMAT_HELP = (
    "coco (official annotation JSON with 'images' and 'annotations'), "
    "karpathy (dataset_coco.json / dataset_flickr8k.json with 'images[].sentences'), "
    "coco-by-image (JSON {\"<image id>\": [captions]}), "
    "flickr (token file 'NAME.jpg#0<TAB>caption' or CSV with header 'image,caption'), "
    "manifest (JSONL lines {\"file\", \"references\", \"image_id\"?})"
)
JAVA_HELP = "install a Java runtime: `apt-get install default-jre-headless` (Debian/Ubuntu)"
# METEOR answers a few thousand images in well under a minute once its JVM is up; silence far
# beyond that means the jar is waiting for input it will never get, so it is killed, not awaited.
METEOR_TIMEOUT_S = 300.0
METEOR_TIMEOUT_PER_IMAGE_S = 0.1
SPICE_HEAP = "-Xmx8G"  # what pycocoevalcap passes; SPICE's CoreNLP parse needs several GB


class Reference(NamedTuple):
    file: str | None  # image file name when the format gives one (matches images in a folder)
    captions: list[str]


References = dict[str, Reference]  # normalised image id -> reference


@dataclass
class Scores:
    metrics: dict[str, float | None]  # METRICS -> fraction; SPICE None when skipped
    images: int
    cider_per_image: dict[str, float] = field(default_factory=dict)  # to find the worst captions
    spice_skipped: str | None = None  # why SPICE is None

    def to_dict(self) -> dict[str, Any]:
        return {"images": self.images, **self.metrics, "spice_skipped": self.spice_skipped}


# ---------------------------------------------------------------------------------------------
# reference files


@dataclass
class _Source:
    path: Path
    text: str
    data: Any  # the parsed JSON document; None when the file is not a single JSON document


def load_references(path: str | Path, fmt: str | None = None, split: str | None = None) -> References:
    """Read human reference captions, keyed by normalised image id.

    The format is detected from the content unless fmt names one of FORMATS. split selects
    Karpathy's split (default "test") or a manifest's "split" field; other formats have none.
    Blank captions are dropped; an image left with no caption is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise RagcapError(f"{path}: no such reference file")
    if fmt is not None and fmt not in _LOADERS:
        raise RagcapError(f"unknown reference format {fmt!r}; known formats: {FORMAT_HELP}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise RagcapError(f"{path}: cannot read reference file ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    source = _Source(path, text, data)
    fmt = fmt or _detect(source)
    if split is not None and fmt not in ("karpathy", "manifest"):
        raise RagcapError(f"{path}: a split applies to karpathy and manifest references, not {fmt}")
    refs = _LOADERS[fmt](source, split)
    if not refs:
        raise RagcapError(f"{path}: no references found (read as {fmt})")
    return refs


def _detect(source: _Source) -> str:
    data = source.data
    if not source.text.strip() or data in ({}, []):
        raise RagcapError(f"{source.path}: holds no references (the file is empty); give the human captions of the images to score")
    if isinstance(data, dict):
        images = data.get("images")
        if isinstance(images, list) and "annotations" in data:
            return "coco"
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "karpathy"
        if "references" in data:  # a manifest of one line
            return "manifest"
        if data and all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in data.values()):
            return "coco-by-image"
    first = next((line.strip() for line in source.text.splitlines() if line.strip()), "")
    if data is None and first.startswith("{"):
        with contextlib.suppress(json.JSONDecodeError):
            if "references" in json.loads(first):
                return "manifest"
    if re.match(r"[^\t#]+#\d+\t", first) or first.replace(" ", "").lower() == "image,caption":
        return "flickr"
    raise RagcapError(f"{source.path}: cannot tell the reference format from its content; known formats: {FORMAT_HELP}")


def _add(refs: References, where: str, key: Any, file: str | None, captions: Iterable[Any]) -> None:
    image = normalise_image_id(key)
    captions = list(captions)
    odd = next((c for c in captions if not isinstance(c, str)), "")
    _require(isinstance(odd, str), where, f"image {key}: a reference caption is {odd!r}, not text; fix or remove it")
    ref = refs.get(image)
    if ref is None:
        ref = refs[image] = Reference(file, [])
    elif file and ref.file is None:
        ref = refs[image] = ref._replace(file=file)
    elif file and normalise_image_id(file) != normalise_image_id(ref.file or file):
        # Merging would score one photo against another's captions and leave the other unmatched.
        raise RagcapError(f"{where}: image {key} is listed again with another file ({ref.file}, then {file}); "
                          "give each image one id")
    ref.captions.extend(" ".join(c.split()) for c in captions if c.strip())
    if not ref.captions:
        raise RagcapError(f"{where}: image {key} has no reference captions; fix the file or drop the image")


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise RagcapError(f"{where}: {what}")


def _load_coco(source: _Source, split: str | None) -> References:
    data, where = source.data, str(source.path)
    _require(isinstance(data, dict), where, "not a COCO annotation JSON object")
    files = {img.get("id"): img.get("file_name") for img in data.get("images", []) if isinstance(img, dict)}
    captions: dict[Any, list[str]] = {image_id: [] for image_id in files}
    for i, ann in enumerate(data.get("annotations", [])):
        _require(isinstance(ann, dict) and "image_id" in ann and "caption" in ann, where,
                 f"annotations[{i}] lacks image_id or caption")
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    refs: References = {}
    for image_id, caps in captions.items():
        _add(refs, f"{where} (image file {files.get(image_id)})", image_id, files.get(image_id), caps)
    return refs


def _load_karpathy(source: _Source, split: str | None) -> References:
    data, where, split = source.data, str(source.path), split or "test"
    _require(isinstance(data, dict) and isinstance(data.get("images"), list), where, "not a Karpathy dataset JSON")
    refs: References = {}
    for i, img in enumerate(data["images"]):
        _require(isinstance(img, dict) and "filename" in img, where, f"images[{i}] lacks a filename")
        if img.get("split") != split:
            continue
        caps = [s.get("raw") for s in img.get("sentences", []) if isinstance(s, dict)]
        _add(refs, f"{where} images[{i}]", img.get("cocoid", img["filename"]), img["filename"], caps)
    if not refs:
        splits = sorted({str(img.get("split")) for img in data["images"] if isinstance(img, dict)})
        raise RagcapError(f"{where}: no images in split {split!r}; the file has splits {splits}")
    return refs


def _load_by_image(source: _Source, split: str | None) -> References:
    data, where = source.data, str(source.path)
    _require(isinstance(data, dict), where, 'expected a JSON object {"<image id>": [captions]}')
    refs: References = {}
    for key, caps in data.items():
        _require(isinstance(caps, list), where, f"image {key}: expected a list of captions")
        _add(refs, where, key, None, caps)
    return refs


def _load_flickr(source: _Source, split: str | None) -> References:
    lines = source.text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), 0)
    refs: References = {}
    if lines and lines[first].replace(" ", "").lower() == "image,caption":  # Flickr8k captions.txt
        for i, row in enumerate(csv.reader(lines[first + 1 :]), start=first + 2):
            if not row:
                continue
            _require(len(row) == 2, f"{source.path}:{i}", f"expected 'image,caption', got {len(row)} fields")
            _add(refs, f"{source.path}:{i}", row[0], _normalise_file(row[0]), [row[1]])
        return refs
    for i, line in enumerate(lines, start=1):  # Flickr8k.token.txt / results_20130124.token
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        _require(bool(tab), f"{source.path}:{i}", "expected 'NAME.jpg#N<TAB>caption'")
        _add(refs, f"{source.path}:{i}", name, _normalise_file(name), [caption])
    return refs


def _normalise_file(name: str) -> str:
    return name.strip().split("#", 1)[0]


def _load_manifest(source: _Source, split: str | None) -> References:
    refs: References = {}
    splits: set[str] = set()
    for i, line in enumerate(source.text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source.path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RagcapError(f"{where}: not JSON ({e.msg})") from e
        _require(isinstance(rec, dict) and ("file" in rec or "image_id" in rec), where,
                 'expected {"file": ..., "references": [...], "image_id"?: ...}')
        _require(isinstance(rec.get("references", []), list), where, "references must be a list of captions")
        splits.add(str(rec.get("split")))
        if split is not None and rec.get("split") != split:
            continue
        key = rec["image_id"] if rec.get("image_id") is not None else rec["file"]
        _add(refs, where, key, rec.get("file"), rec.get("references", []))
    if split is not None and not refs:
        raise RagcapError(f"{source.path}: no images in split {split!r}; the file has splits {sorted(splits)}")
    return refs


_LOADERS = {
    "coco": _load_coco,
    "karpathy": _load_karpathy,
    "coco-by-image": _load_by_image,
    "flickr": _load_flickr,
    "manifest": _load_manifest,
}


class ImageMatch(NamedTuple):
    pairs: dict[str, Path]  # image key -> image file, for images that have references
    missing: list[Path]  # image files with no references (cannot be scored)


def match_images(refs: References, images: str | Path | Sequence[str | Path]) -> ImageMatch:
    """Pair image files (a folder, non-recursive, or a list) with reference keys by normalised name."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise RagcapError(f"{folder}: not a directory of images")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    else:
        files = [Path(p) for p in images]
    by_name = {normalise_image_id(ref.file): key for key, ref in refs.items() if ref.file}
    pairs: dict[str, Path] = {}
    missing: list[Path] = []
    for file in files:
        name = normalise_image_id(file.name)
        key = name if name in refs else by_name.get(name)
        if key is None:
            missing.append(file)
        elif key in pairs:
            raise RagcapError(f"{pairs[key]} and {file} are both image {key}; keep one of them")
        else:
            pairs[key] = file
    return ImageMatch(pairs, missing)


def find_leakage(eval_image_keys: set[str], stored_payloads: Iterable[Mapping[str, Any]],
                 references: Iterable[str] = ()) -> int:
    """How many stored captions describe an image under evaluation: by payload image_id or file,
    or, for memories that record no ids (a text or CSV corpus), by being one of the `references`
    (the evaluated images' human captions) word for word, case and spacing aside.

    Retrieving an evaluated image's own human captions inflates every score, so the CLI refuses
    such a collection unless told otherwise.
    """
    texts = {normalise_caption(r).lower() for r in references}
    leaked = 0
    for payload in stored_payloads:
        ids = [v for v in (payload.get("image_id"), payload.get("file")) if v is not None]
        if ids:  # its id says which image it describes; the same words under another id are not leakage
            leaked += any(normalise_image_id(v) in eval_image_keys for v in ids)
        else:  # generic captions ("a man riding a skateboard") recur across images, so only id-less ones are matched by text
            leaked += normalise_caption(str(payload.get("caption", ""))).lower() in texts
    return leaked


# ---------------------------------------------------------------------------------------------
# scoring


def require_java() -> None:
    if shutil.which("java") is None:
        raise RagcapError(
            "scoring captions needs Java (pycocoevalcap's PTB tokenizer, METEOR and SPICE are Java "
            f"programs) but no `java` is on PATH; {JAVA_HELP}"
        )


def spice_unavailable() -> str | None:
    """Why SPICE cannot run here, or None. Never downloads: pycocoevalcap's Spice() would
    fetch CoreNLP (a ~400 MB zip from nlp.stanford.edu) on construction, so its jars are looked
    for where that download would put them."""
    from pycocoevalcap.spice import get_stanford_models as models

    lib = Path(models.SPICEDIR) / models.SPICELIB
    wanted = [lib / f"{models.JAR}.jar", lib / f"{models.JAR}-models.jar", Path(models.SPICEDIR) / "spice-1.0.jar"]
    absent = [p.name for p in wanted if not p.exists()]
    if absent:
        return (
            f"Stanford CoreNLP jars not installed ({', '.join(absent)} missing in {lib}); "
            "to enable SPICE, run `python -m pycocoevalcap.spice.get_stanford_models` once with internet access"
        )
    return None


def _clean(text: str) -> str:
    # One line per caption is what both Java programs rely on: the tokenizer maps output lines
    # back to captions by position, and METEOR reads one command per line, so a stray \r or
    # U+2028 would silently shift every later score or leave METEOR waiting forever. str.split()
    # breaks on all of them. Empty captions stay empty: they score 0 and do not upset either tool.
    return " ".join(text.split())


def _tokenize(candidates: Mapping[str, str], references: Mapping[str, list[str]], keys: list[str]):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One JVM for both sides: the tokenizer treats every line alike, so this equals two calls.
    batch = {("ref", k): [{"caption": _clean(c)} for c in references[k]] for k in keys}
    batch.update({("cand", k): [{"caption": _clean(candidates[k])}] for k in keys})
    try:
        tokens = PTBTokenizer().tokenize(batch)
    except OSError as e:
        raise RagcapError(f"the PTB tokenizer could not run ({e}); check `java -version`") from e
    if len(tokens) != len(batch) or not any(any(t) for t in tokens.values()):
        raise RagcapError("the PTB tokenizer returned no tokens; check that `java -version` works")
    return {k: tokens[("ref", k)] for k in keys}, {k: tokens[("cand", k)] for k in keys}


def _meteor(gts: dict[str, list[str]], res: dict[str, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    watchdog = threading.Timer(METEOR_TIMEOUT_S + METEOR_TIMEOUT_PER_IMAGE_S * len(gts), meteor.meteor_p.kill)
    watchdog.start()
    try:
        value, _ = meteor.compute_score(gts, res)
        return float(value)
    except (ValueError, OSError) as e:  # the jar died or was killed: readline gave b""
        meteor.meteor_p.kill()
        stderr = meteor.meteor_p.stderr.read().decode(errors="replace").strip()[-500:]
        raise RagcapError(f"METEOR failed or stopped answering ({stderr or e}); check `java -version`") from e
    finally:
        watchdog.cancel()
        if meteor.lock.locked():  # compute_score raised while holding it; Meteor.__del__ takes it
            meteor.lock.release()


def _spice(gts: dict[str, list[str]], res: dict[str, list[str]]) -> tuple[float | None, str | None]:
    """SPICE as pycocoevalcap computes it (mean F-score of all tuples), run without its
    '-cache' option: the cache's serialiser fails on Java >= 9 (InaccessibleObjectException),
    and pycocoevalcap's Spice also writes its temp files inside site-packages."""
    from pycocoevalcap.spice import get_stanford_models as models

    with tempfile.TemporaryDirectory(prefix="ragcap-spice-") as tmp:
        in_file, out_file = Path(tmp) / "in.json", Path(tmp) / "out.json"
        keys = sorted(gts)
        in_file.write_text(json.dumps([{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in keys]))
        cmd = ["java", "-jar", SPICE_HEAP, "spice-1.0.jar", str(in_file), "-out", str(out_file), "-subset", "-silent"]
        run = subprocess.run(cmd, cwd=models.SPICEDIR, capture_output=True, text=True)
        if run.returncode != 0 or not out_file.exists():
            return None, f"SPICE failed (exit {run.returncode}): {run.stderr.strip()[-300:]}"
        results = json.loads(out_file.read_text())
    values = [float(item["scores"]["All"]["f"]) for item in results if item["scores"]["All"]["f"] is not None]
    return (sum(values) / len(values) if values else 0.0), None


def score(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str] | Reference],
    spice: bool = True,
) -> Scores:
    """Score one caption per image against its references (references may be load_references()'s
    output). Only the candidates' images are scored, as the COCO server does: CIDEr's document
    frequencies come from their references alone. spice=False skips the slow SPICE parse."""
    if not candidates:
        raise RagcapError("no captions to score")
    keys = sorted(candidates)
    unknown = [k for k in keys if k not in references]
    if unknown:
        raise RagcapError(
            f"{len(unknown)} captioned images have no references (e.g. {', '.join(unknown[:3])}); "
            "caption only the images listed in the reference file"
        )
    refs = {k: [c for c in _captions(references[k]) if c.strip()] for k in keys}
    empty = [k for k in keys if not refs[k]]
    if empty:
        raise RagcapError(f"images {', '.join(empty[:5])} have no reference captions; fix the reference file")
    require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _tokenize(candidates, refs, keys)
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts to stdout
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    metrics: dict[str, float | None] = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    metrics.update(METEOR=_meteor(gts, res), ROUGE_L=float(rouge), CIDEr=float(cider), SPICE=None)
    skipped = "disabled" if not spice else spice_unavailable()
    if skipped is None:
        metrics["SPICE"], skipped = _spice(gts, res)
    return Scores(metrics, len(keys), {k: float(c) for k, c in zip(keys, cider_each)}, skipped)


def _captions(ref: Sequence[str] | Reference) -> Sequence[str]:
    return ref.captions if isinstance(ref, Reference) else ref


_COLUMNS = (("B@1", "Bleu_1"), ("B@4", "Bleu_4"), ("M", "METEOR"), ("R", "ROUGE_L"), ("C", "CIDEr"), ("S", "SPICE"))


def format_table(rows: Mapping[str, Scores]) -> str:
    """A DeCap-style table: a row per mode, metrics x100 with one decimal, '-' for skipped."""
    width = max([len("mode"), *map(len, rows)])
    lines = ["mode".ljust(width) + "".join(f"{name:>7}" for name, _ in _COLUMNS)]
    for mode, scores in rows.items():
        cells = [scores.metrics.get(metric) for _, metric in _COLUMNS]
        lines.append(mode.ljust(width) + "".join(f"{'-' if v is None else f'{100 * v:.1f}':>7}" for v in cells))
    reasons = sorted({s.spice_skipped for s in rows.values() if s.spice_skipped})
    lines += [f"S skipped: {reason}" for reason in reasons]
    return "\n".join(lines)
