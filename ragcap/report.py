"""How results leave ragcap: readable text for people, JSONL/CSV/--json for scripts, progress on stderr.

Caption output to a file goes to FILE.partial, renamed to FILE when the run completes: a
failure before the first result leaves nothing (and an existing FILE untouched), a later one
or Ctrl-C leaves FILE.partial, which `--resume` continues, skipping the inputs it holds.
A FILE that is a device or a pipe (/dev/null, /dev/stdout, a FIFO) is written directly: a
rename would replace the device itself, and a stream has nothing to resume.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Iterator, Sequence

from tqdm import tqdm

from ragcap.errors import Interrupted, RagcapError
from ragcap.util import disk_full_error, not_a_file

if TYPE_CHECKING:  # ragcap.caption imports torch, which listing collections does not need
    from ragcap.caption import CaptionResult

CAPTION_FORMATS = ("text", "jsonl", "csv")
PARTIAL_SUFFIX = ".partial"


def progress(total: int | None, desc: str, unit: str) -> tqdm:
    """A progress bar on stderr with rate and ETA; stdout stays clean for --json and pipes."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


class StepProgress:
    """A training run's bar: call it as progress(step, total_steps, loss) after each step.

    expected(estimate) announces the time per epoch timed before training; with epochs, the
    measured pace is announced once ESTIMATE_STEPS steps (fewer in a short run) have run after
    the first, which pays for allocation and warm-up and is left out; and epoch(row) prints each
    epoch's training and held-out loss above the bar.
    """

    ESTIMATE_STEPS = 5

    def __init__(self, desc: str, epochs: int | None = None, hint: str = ""):
        self.bar = progress(None, desc, "steps")
        self.epochs, self.hint = epochs, hint
        self.first_step_at: float | None = None
        self.first_step = 0

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.bar.total = total
        self.bar.n = step
        self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        self.bar.refresh()
        if self.epochs:
            self._estimate(step, total)

    def _estimate(self, step: int, total: int) -> None:
        import time

        if self.first_step_at is None:
            self.first_step_at, self.first_step = time.monotonic(), step
        elif step - self.first_step == min(self.ESTIMATE_STEPS, max(1, total // 10)) or step == total:
            per_step = (time.monotonic() - self.first_step_at) / (step - self.first_step)
            self.epochs, epoch_s = None, per_step * total / self.epochs
            self.bar.write(f"{self.bar.desc}: {per_step:.2f} s per step, about {duration(epoch_s)} per epoch and "
                           f"{duration(per_step * (total - step))} to go{self.hint}", file=sys.stderr)

    def expected(self, estimate: dict) -> None:
        """estimate: ragcap.train.train_decoder's on_estimate argument."""
        epoch_s, steps, epochs = estimate["expected_epoch_s"], estimate["steps_per_epoch"], estimate["epochs"]
        self.bar.write(f"{self.bar.desc}: expected ~{duration(epoch_s)} per epoch ({steps:,} steps), "
                       f"~{duration(epoch_s * epochs)} for {epochs} epoch{'s' * (epochs != 1)}{self.hint}", file=sys.stderr)
        self.hint = ""  # said once, before training

    def epoch(self, row: dict) -> None:
        held_out = "none held out" if row.get("val_loss") is None else f"held-out loss {row['val_loss']:.4f}"
        self.bar.write(f"epoch {row['epoch']}: training loss {row['train_loss']:.4f}, {held_out}", file=sys.stderr)

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """'42 s', '7.5 min', '3.2 h', '2.1 days'."""
    for unit, size, from_ in (("days", 86400, 2 * 86400), ("h", 3600, 2 * 3600), ("min", 60, 100)):
        if seconds >= from_:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def is_stdout(path: Path) -> bool:
    """Whether writing `path` writes this process's stdout (-o /dev/stdout, /proc/self/fd/1)."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):  # no such file; stdout replaced (tests)
        return False


def emit_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def announce_runtime(runtime: dict[str, str], actors: int | None = None) -> None:
    """One stderr line at start saying where the models run, so a CPU fallback is never silent.
    actors: the models run in that many Ray actors, whose threads are their own."""
    import torch

    where = f"{runtime['device']}, {runtime['precision']}"
    if actors is not None:
        where += f" ({actors} Ray actor{'s' if actors != 1 else ''})"
    elif runtime["device"] == "cpu":
        where += f", {torch.get_num_threads()} threads" + ("" if torch.cuda.is_available() else " (no CUDA GPU found)")
    print(f"ragcap: running on {where}", file=sys.stderr, flush=True)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns))


class CaptionWriter:
    """Writes caption results as they arrive (the folder is a stream; nothing is kept)."""

    def __init__(self, out: IO[str], fmt: str, key: str = "file", header: bool = True, runtime: dict[str, str] | None = None):
        self.out, self.fmt, self.key = out, fmt, key
        self.runtime = runtime or {}  # device and precision, added to every JSONL record
        self.csv = csv.writer(out) if fmt == "csv" else None
        if self.csv is not None and header:
            self.csv.writerow(_csv_header(key))
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
            self.out.write(json.dumps({**record, **self.runtime}, ensure_ascii=False) + "\n")
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


def _csv_header(key: str) -> list[str]:
    return [key, "mode", "caption", "score", "error", "neighbours"]


@dataclass
class CaptionOutput:
    """Where `caption` writes, and what an earlier run already wrote there (with --resume)."""

    stream: IO[str]
    done: set[str] = field(default_factory=set)  # inputs whose results are all in the output
    failed: int = 0  # of those, how many failed
    header: bool = True  # whether the CSV header is still to be written


@contextmanager
def caption_output(path: Path | None, fmt: str, modes: Sequence[str], key: str, resume: bool) -> Iterator[CaptionOutput]:
    """stdout, or FILE written through FILE.partial (see the module's docstring)."""
    if path is None:
        if resume:
            raise RagcapError("--resume continues an output file: pass -o FILE")
        yield CaptionOutput(sys.stdout)
        return
    path = Path(path)
    if not path.parent.is_dir():
        raise RagcapError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise RagcapError(f"cannot write {path}: it is a folder; give a file name such as {path / ('captions.' + fmt)}")
    if not_a_file(path):
        if resume:
            raise RagcapError(f"--resume continues an output file, and {path} is a device or a pipe: pass -o FILE")
        with open(path, "w", encoding="utf-8", newline="") as stream:
            yield CaptionOutput(stream)
        return
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    stream = _open_locked(partial)
    try:
        earlier = partial.read_bytes()
        if earlier and not resume:
            raise RagcapError(f"{partial} holds the results of an interrupted run: add --resume to continue it, or delete it to start over")
        if not earlier and resume and path.exists():
            earlier = path.read_bytes()  # continue a finished run with more inputs
        kept, done, failed = _completed(earlier, fmt, modes, key, partial) if resume else (0, set(), 0)
        stream.truncate(0)
        stream.write(earlier[:kept].decode("utf-8"))
        stream.flush()
    except BaseException:
        if partial.stat().st_size == 0:
            partial.unlink()  # made just now: leave no trace
        stream.close()
        raise
    try:
        yield CaptionOutput(stream, done, failed, header=kept == 0)
        stream.flush()
        os.fsync(stream.fileno())
        os.replace(partial, path)
    except BaseException as err:
        try:
            stream.flush()
        except OSError:
            pass  # a full disk: what reached the file is kept, a cut line is dropped on resume
        if not partial.exists() or partial.stat().st_size == 0:
            partial.unlink(missing_ok=True)  # nothing to keep: leave no trace
            raise
        note = f"the results so far are kept in {partial}: rerun with --resume to continue"
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {note}") from None
        if isinstance(err, Exception):
            full = disk_full_error(err, partial)
            if full is not None:
                full.add_note(note)
                raise full from err
            err.add_note(note)
        raise
    finally:
        stream.close()  # drops the lock


def _open_locked(partial: Path) -> IO[str]:
    """FILE.partial opened for writing and locked against a second run writing the same FILE."""
    while True:
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RagcapError(f"another ragcap process is writing {partial}; wait for it to finish, or write to another file") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(partial).st_ino
        except FileNotFoundError:  # renamed into place by the run that held it just now
            same = False
        if same:
            return os.fdopen(fd, "r+", encoding="utf-8", newline="")
        os.close(fd)


def _completed(data: bytes, fmt: str, modes: Sequence[str], key: str, source: Path) -> tuple[int, set[str], int]:
    """(bytes to keep, inputs done, inputs failed) of an earlier run's output: every input whose
    results are complete. What a kill cut short (the last line, the last input's modes) is
    dropped. In text output an input's last mode may span several lines (--num-captions), so an
    input counts as done once the next one begins, and the last one is always redone."""
    wanted = set(modes)
    done: set[str] = set()
    failed = kept = offset = 0
    current, seen = None, set()

    def finish(end: int) -> None:
        nonlocal failed, kept
        if current is not None and current not in done and ("error" in seen or wanted <= seen):
            done.add(current)
            failed += "error" in seen
            kept = end

    for number, line in _records(data, fmt):
        start, offset = offset, offset + len(line)
        try:
            parsed = _parse_result_line(line.decode("utf-8"), fmt, key, number)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise RagcapError(
                f"{source}:{number}: not a {fmt} caption result ({e}); --resume continues the output of "
                f"`ragcap caption --format {fmt}`"
            ) from None
        if parsed is None:  # the CSV header, or a neighbour line
            kept = offset if current is None else kept
            continue
        name, mode = parsed
        if mode == "source":
            finish(start)
            current, seen = name, set()
            continue
        if fmt != "text" and name != current:
            current, seen = name, set()
        if mode != "error" and mode not in wanted:
            raise RagcapError(f"{source}:{number}: holds results of mode {mode!r}; resume with the same --mode")
        seen.add(mode)
        if fmt != "text" or mode == "error":
            finish(offset)
    return kept, done, failed


def _records(data: bytes, fmt: str) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) of each whole record of an output: a line, or in CSV the
    lines of a row whose quoted fields hold line breaks (a file name may). A record without its
    line end, cut short by a kill, is left out."""
    pending, first = b"", 0
    for number, line in enumerate(io.BytesIO(data), 1):
        if not line.endswith(b"\n"):
            return
        pending, first = pending + line, first or number
        if fmt == "csv" and pending.count(b'"') % 2:
            continue  # inside a quoted field: its row goes on
        yield first, pending
        pending, first = b"", 0


def _parse_result_line(text: str, fmt: str, key: str, number: int) -> tuple[str, str] | None:
    """(input, mode or "error"; or, in text output, the input's own line: (input, "source")),
    None for the CSV header and neighbour lines."""
    if fmt == "jsonl":
        record = json.loads(text)
        return str(record[key]), "error" if "error" in record else str(record["mode"])
    if fmt == "csv":
        row = next(csv.reader(io.StringIO(text)))
        if number == 1:
            if row != _csv_header(key):
                raise ValueError(f"the header is {row}, not {_csv_header(key)}")
            return None
        return row[0], "error" if row[4] else row[1]
    if text.startswith("    "):
        return None  # a neighbour
    if text.startswith("  "):
        mode = text[2:].split(" ", 1)[0]  # padded to 7 characters, and "smallcap" has 8
        if not mode:
            raise ValueError("no mode")
        return "", mode
    return text.rstrip("\n"), "source"
