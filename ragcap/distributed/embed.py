"""The embed stage's actor, and the tally the read tasks report to. Plain classes: Ray Data
makes the actors, the driver makes the tally a Ray actor."""

from __future__ import annotations

from ragcap.ingest import IngestSummary


def share_cpus(device: str | None, threads: int) -> None:
    """An actor on the CPU runs its share of the node's cores, not every core once per actor."""
    import torch

    from ragcap.util import default_device

    if default_device(device).type == "cpu":
        torch.set_num_threads(threads)


class CaptionEmbedder:
    """One embedding actor: the model is loaded once, then embeds batch after batch."""

    def __init__(self, spec: str, device: str | None, threads: int, precision: str | None = None):
        from ragcap.embed import load_embedder

        share_cpus(device, threads)
        self.embedder = load_embedder(spec, device, precision=precision)

    def __call__(self, batch: dict) -> dict:
        encoded = self.embedder.encode_text(batch["caption"].tolist())
        return {**batch, "vector": encoded.vectors, "tokens": encoded.lengths, "truncated": encoded.truncated}


class Tally:
    """What the read tasks report: source records consumed as they go (the progress bar), and
    each task's mapper counts when it ends."""

    def __init__(self):
        self.consumed_so_far = 0
        self.finished_summaries: list[IngestSummary] = []

    def consumed(self, n: int) -> None:
        self.consumed_so_far += n

    def finished(self, summary: IngestSummary) -> None:
        self.finished_summaries.append(summary)

    def progress(self) -> int:
        return self.consumed_so_far

    def summaries(self) -> list[IngestSummary]:
        return self.finished_summaries
