"""The read and prepare stages: Ray read tasks that run a pipelines/ reader through ragcap.ingest's
mapper and drop the ids already stored.

One task per input file, so a corpus split into many files (LAION's parquet parts,
clip-retrieval's output) is read in parallel. Within a file everything is as in the
single-process ingest: the same normalisation, filters and ids, and the first copy of a
caption wins. A caption found in several files is embedded once per file and stored once (its
id is the same); which file's payload it keeps is then not defined, and it is not counted as a
duplicate. With --limit, which counts records from the start of the corpus, one task reads
every file in order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, Protocol

import numpy as np

from pipelines.base import ReadOptions
from ragcap.embedder_info import EmbedderInfo
from ragcap.ingest import IngestOptions, IngestSummary, _Mapper, _vectors_for
from ragcap.util import chunks


class StoredLookup(Protocol):
    def existing(self, ids: list[str]) -> set[str]: ...


@dataclass
class ReadJob:
    source: str
    collection: str
    info: EmbedderInfo
    read_options: ReadOptions = field(default_factory=ReadOptions)
    options: IngestOptions = field(default_factory=IngestOptions)
    given_vectors: bool = False  # records carry their vectors (Parquet exports, clip-retrieval)


def file_groups(paths: list[str], options: IngestOptions) -> list[list[str]]:
    """The files each read task reads: one each, unless order matters (--limit) or the paths
    are not plain files (a directory of clip-retrieval output, a Hugging Face data set)."""
    if options.limit is None and len(paths) > 1 and all(os.path.isfile(p) for p in paths):
        return [[p] for p in paths]
    return [list(paths)]


def read_prepared(job: ReadJob, paths: list[str], stored: StoredLookup, tally) -> Iterator:
    """Blocks (Arrow tables) of the records of `paths` to embed and store; the mapper's counts
    go to `tally` as the task goes (records consumed) and when it ends (the summary)."""
    import ray

    from pipelines import get_reader

    if isinstance(stored, ray.ObjectRef):  # a snapshot the driver put in the object store once
        stored = ray.get(stored)
    summary = IngestSummary()
    mapper = _Mapper(job.collection, job.options, summary)
    reported = 0
    for batch in chunks(mapper(get_reader(job.source)(paths, job.read_options)), job.options.batch_size):
        held = stored.existing([pid for pid, _ in batch])
        summary.already_stored += len(held)
        todo = [(pid, rec) for pid, rec in batch if pid not in held]
        consumed = summary.read + summary.skipped_bad
        tally.consumed.remote(consumed - reported)
        reported = consumed
        if todo:
            yield _table(todo, job, summary)
    tally.consumed.remote(summary.read + summary.skipped_bad - reported)
    ray.get(tally.finished.remote(summary))


def _table(todo, job: ReadJob, summary: IngestSummary):
    from ray.data.block import BlockAccessor

    columns = {
        "id": np.array([pid for pid, _ in todo], dtype=object),
        "caption": np.array([rec.caption for _, rec in todo], dtype=object),
        "payload": np.array([json.dumps(rec.payload(), ensure_ascii=False) for _, rec in todo], dtype=object),
    }
    if job.given_vectors:  # checked against the embedder's dimension as the single-process ingest does
        columns["vector"], _ = _vectors_for(todo, None, job.info, summary, lambda n: None)
    return BlockAccessor.batch_to_block(columns)


def prepared_captions(job: ReadJob, groups: list[list[str]], stored, tally):
    """The read and prepare stages as a Ray Data source: one read task per group of files.
    (Made here, not at import: Ray must not be imported before cluster.connect has run.)"""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PreparedCaptions(Datasource):
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    partial(read_prepared, job, group, stored, tally),
                    BlockMetadata(num_rows=None, size_bytes=None, input_files=group, exec_stats=None),
                )
                for group in groups
            ]

    return PreparedCaptions()
