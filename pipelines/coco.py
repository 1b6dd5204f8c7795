"""MS-COCO captions in any of the forms they circulate in, told apart by content:

- official annotations (captions_train2017.json ...): {"images": [...], "annotations": [...]};
  the split ("val2017") comes from the file name, since the file does not say it.
- Karpathy's dataset_coco.json (also dataset_flickr8k/30k.json): {"images": [{"sentences": ...}]}.
  --split is required there (train/val/test/restval/all), because the file holds the test
  images too. "train" means train+restval (113,287 images), the training set of the
  Karpathy-split literature (DeCap, SmallCap); "restval" alone selects only restval.
- by image: {"<image_id>": ["caption", ...]} (coco-caption evaluation references).
- a Hugging Face hub name instead of a file: read through the hf source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipelines.base import BadRecord, CaptionRecord, ReadOptions
from pipelines.files import bad_line, load_json
from ragcap.errors import SourceError

CORPUS = "coco-captions"
KARPATHY_SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}, "restval": {"restval"}}
# Column names of the common hub copies (e.g. yerevann/coco-karpathy), in order of preference.
HUB_TEXT_FIELDS = ("sentences", "captions", "caption")
HUB_ID_FIELDS = ("cocoid", "image_id", "id")
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def read_coco(paths: Sequence[str], options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    for path in paths:
        if not Path(path).exists() and HUB_NAME.match(path) and not Path(path).suffix:
            yield from _read_hub(path, options)
            continue
        data = load_json(path)
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            yield from _official(path, data, options)
        elif isinstance(data, dict) and isinstance(data.get("images"), list):
            yield from _karpathy(path, data["images"], options)
        elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            yield from _by_image(path, data, options)
        else:
            raise SourceError(f"{path}: not a COCO caption file; expected the official annotation JSON "
                              "(images + annotations), Karpathy's dataset_coco.json, or {\"<image_id>\": [captions]}")


def split_from_name(path: str) -> str | None:
    """'captions_val2017.json' -> 'val2017'; None when the name does not say."""
    found = re.search(r"(train|val|test)(20\d\d)", Path(path).name)
    return found.group(0) if found else None


def _whole_file_split(path: str, options: ReadOptions) -> str | None:
    """These forms hold one split each, so --split can only confirm it, never select within."""
    split = split_from_name(path)
    if options.split and options.split != split:
        raise SourceError(f"{path}: this file holds {split or 'an unnamed split'}, not {options.split!r}; "
                          "--split selects within Karpathy's dataset_coco.json only")
    return split


def _caption(value: Any, location: str, options: ReadOptions) -> Iterator[str | BadRecord]:
    if not isinstance(value, str):
        yield bad_line(location, f"caption is {type(value).__name__}, not text", options)
    elif value.strip():
        yield value


def _official(path: str, data: dict, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    split = _whole_file_split(path, options)
    files = {image.get("id"): image.get("file_name") for image in data.get("images", []) if isinstance(image, dict)}
    for i, annotation in enumerate(data["annotations"]):
        location = f"{path}:annotations[{i}]"
        if not isinstance(annotation, dict) or "image_id" not in annotation:
            yield bad_line(location, "annotation without image_id", options)
            continue
        for caption in _caption(annotation.get("caption"), location, options):
            if isinstance(caption, BadRecord):
                yield caption
                continue
            image_id = annotation["image_id"]
            yield CaptionRecord(caption=caption, corpus=CORPUS, image_id=str(image_id),
                                file=files.get(image_id), split=split, location=location)


def _karpathy(path: str, images: list, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    present = sorted({image.get("split") for image in images if isinstance(image, dict)} - {None})
    if options.split is None or (options.split not in KARPATHY_SPLITS and options.split != "all"):
        given = f"no split {options.split!r}" if options.split else "it holds the test images too"
        raise SourceError(f"{path}: Karpathy split file, {given}; pass --split with one of "
                          f"train (= train+restval), val, test, restval, all (present: {', '.join(present)})")
    wanted = set(present) if options.split == "all" else KARPATHY_SPLITS[options.split]
    for i, image in enumerate(images):
        location = f"{path}:images[{i}]"
        if not isinstance(image, dict) or not isinstance(image.get("sentences"), list):
            yield bad_line(location, "image entry without a sentences list", options)
            continue
        if image.get("split") not in wanted:
            continue
        filename = image.get("filename")
        # Flickr files have no cocoid; their image id is the file name's stem.
        image_id = image.get("cocoid", Path(filename).stem if filename else None)
        for sentence in image["sentences"]:
            raw = sentence.get("raw") if isinstance(sentence, dict) else sentence
            for caption in _caption(raw, location, options):
                if isinstance(caption, BadRecord):
                    yield caption
                    continue
                yield CaptionRecord(caption=caption, corpus=CORPUS, file=filename, split=image["split"],
                                    image_id=None if image_id is None else str(image_id), location=location)


def _by_image(path: str, data: dict, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    split = _whole_file_split(path, options)
    for image_id, captions in data.items():
        location = f"{path}:{image_id!r}"
        for value in captions:
            for caption in _caption(value, location, options):
                if isinstance(caption, BadRecord):
                    yield caption
                    continue
                yield CaptionRecord(caption=caption, corpus=CORPUS, image_id=image_id, split=split, location=location)


def _read_hub(name: str, options: ReadOptions) -> Iterator[CaptionRecord | BadRecord]:
    from pipelines.hf import load_split, read_dataset

    fix = ("download captions_train2017.json (COCO site, annotations_trainval2017.zip) or Karpathy's "
           "dataset_coco.json and pass its path")
    try:
        dataset, split = load_split(name, options)
    except SourceError as exc:
        raise SourceError(f"{exc}\nInstead: {fix}") from exc
    columns = dataset.column_names
    text = options.text_field or next((c for c in HUB_TEXT_FIELDS if c in columns), None)
    if text is None:
        raise SourceError(f"{name}: no caption column among {', '.join(columns)}; pass --text-field")
    id_field = options.id_field or next((c for c in HUB_ID_FIELDS if c in columns), None)
    chosen = ReadOptions(text_field=text, id_field=id_field, split=options.split, skip_bad=options.skip_bad)
    yield from read_dataset(dataset, name, split, chosen, CORPUS)
