"""How results leave ragcap: readable text for people, JSONL/CSV/--json for scripts, progress on stderr."""

from __future__ import annotations

import csv
import json
import sys
from typing import IO, Iterable

from tqdm import tqdm

from ragcap.caption import CaptionResult

CAPTION_FORMATS = ("text", "jsonl", "csv")


def progress(total: int | None, desc: str, unit: str) -> tqdm:
    """A progress bar on stderr with rate and ETA; stdout stays clean for --json and pipes."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


class StepProgress:
    """A training run's bar: call it as progress(step, total_steps, loss) after each step."""

    def __init__(self, desc: str):
        self.bar = progress(None, desc, "steps")

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bar.total = total
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


class CaptionWriter:
    """Writes caption results as they arrive (the folder is a stream; nothing is kept)."""

    def __init__(self, out: IO[str], fmt: str, key: str = "file"):
        self.out, self.fmt, self.key = out, fmt, key
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writerow([key, "mode", "caption", "score", "error", "neighbours"])
        self.last_source: str | None = None

    def write(self, result: CaptionResult) -> None:
        neighbours = [{"caption": c, "score": round(s, 6)} for c, s in result.neighbours] if result.neighbours else None
        if self.fmt == "jsonl":
            record = {self.key: result.source, "mode": result.mode, "caption": result.caption}
            if result.error is not None:
                record = {self.key: result.source, "error": result.error}
            else:
                if result.score is not None:
                    record["score"] = round(result.score, 6)
                if result.alternatives is not None:
                    record["captions"] = [{"caption": c, "score": round(s, 6)} for c, s in result.alternatives]
                if neighbours is not None:
                    record["neighbours"] = neighbours
            self.out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif self.csv is not None:
            self.csv.writerow(
                [result.source, result.mode or "", result.caption or "", "" if result.score is None else round(result.score, 6),
                 result.error or "", json.dumps(neighbours) if neighbours else ""]
            )
        else:
            self._write_text(result)
        self.out.flush()

    def _write_text(self, result: CaptionResult) -> None:
        if result.source != self.last_source:
            self.out.write(f"{result.source}\n")
            self.last_source = result.source
            if result.neighbours:
                for caption, score in result.neighbours:
                    self.out.write(f"    {score:.3f}  {caption}\n")
        if result.error is not None:
            self.out.write(f"  error   {result.error}\n")
        elif result.alternatives is not None:
            for caption, score in result.alternatives:
                self.out.write(f"  {result.mode:<7} {score:8.3f}  {caption}\n")
        else:
            self.out.write(f"  {result.mode:<7} {result.caption}\n")


def write_all(results: Iterable[CaptionResult], writer: CaptionWriter) -> int:
    """Write every result; returns how many inputs failed."""
    failed = 0
    for result in results:
        writer.write(result)
        failed += result.error is not None
    return failed
