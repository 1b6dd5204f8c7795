"""Ingest: ragcap.ingest (each batch written by a background thread while the next is embedded)
against the same work done one step after the other in one thread (embed every batch, then
write it), in one process on the same real COCO captions.

ViT-B-32's text tower with random weights (the real speed), the embedded store, ragcap's
default 4,096-caption batches (--batch-size). Reports captions/s of both, the time the writes took on their
own (with the index build both do at the end), and ingest's rate against embedding alone (1.0: the writes cost nothing).

    python benchmarks/ingest.py --captions 12288      # add --json for a script
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from text_embed import coco_captions  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from pipelines.base import CaptionRecord
from output import print_report
from ragcap.embed import load_embedder, save_random
from ragcap.ingest import IngestOptions, ingest
from ragcap.store import open_store, point_id
from ragcap.util import chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, default=12288)
    parser.add_argument("--batch-size", type=int, default=IngestOptions().batch_size)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ragcap-ingest-"))
    os.environ["RAGCAP_HOME"] = str(tmp)
    embedder = load_embedder(str(save_random("ViT-B-32", tmp / "vit-b-32")))
    captions = list(dict.fromkeys(coco_captions(args.captions * 2)))[: args.captions]
    batch = args.batch_size
    embedder.encode_text(captions[:256])  # warm-up
    with open_store() as store:
        store.create("steps", embedder.info)
        embed_s = write_s = 0.0
        for chunk in chunks(captions, batch):  # the baseline: embed, then write, in one thread
            t0 = time.perf_counter()
            vectors = embedder.encode_text(chunk).vectors
            t1 = time.perf_counter()
            store.upsert("steps", [point_id("steps", c) for c in chunk], vectors, [{"caption": c} for c in chunk])
            embed_s, write_s = embed_s + t1 - t0, write_s + time.perf_counter() - t1
        t0 = time.perf_counter()
        store.optimize("steps")  # as ingest does at its end
        write_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        records = (CaptionRecord(caption=c, corpus="coco") for c in captions)
        summary = ingest(records, store, "overlapped", embedder.info, lambda: embedder, IngestOptions(batch_size=batch))
        ingest_s = time.perf_counter() - t0
    n = len(captions)
    report = {
        "captions": n,
        "stored": summary.stored,
        "one_thread_captions_per_s": round(n / (embed_s + write_s), 1),
        "ragcap_ingest_captions_per_s": round(n / ingest_s, 1),
        "speedup": round((embed_s + write_s) / ingest_s, 2),
        "embed_alone_captions_per_s": round(n / embed_s, 1),
        "writes_s": round(write_s, 2),
        "ingest_vs_embed_alone": round(embed_s / ingest_s, 2),
    }
    print_report(report, args.json)


if __name__ == "__main__":
    main()
