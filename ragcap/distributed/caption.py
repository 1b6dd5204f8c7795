"""`caption --engine ray`: images captioned by a pool of Ray actors, each holding a Captioner
(models loaded once, on a GPU when the cluster has one) and its own connection to the store,
which it searches itself: a Qdrant server every node reaches, or, on one machine, the embedded
store, whose collection the actors take turns to use. Results come back in input order, so
the output file and --resume work as without Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

from ragcap.caption import CaptionResult, CaptionSettings
from ragcap.distributed import RayOptions
from ragcap.distributed.cluster import connect, plan_actors, ragcap_error
from ragcap.distributed.embed import share_cpus
from ragcap.distributed.write import worker_store
from ragcap.errors import RagcapError, StoreError
from ragcap.store import Store
from ragcap.util import chunks


class CaptionActor:
    def __init__(self, open_store: Callable[[], Store], collection: str, settings: CaptionSettings, decoder, lm: str,
                 model: str | None, device: str | None, threads: int, precision: str | None = None):
        from ragcap import api

        share_cpus(device, threads)
        self.captioner, self.error = None, None
        try:
            self.captioner = api.load_captioner(open_store(), collection, settings, decoder, lm, model, device, precision=precision)
        except RagcapError as e:
            # Raised here it would reach the driver as a dead actor, without the message; the
            # first call raises it instead (an empty collection, a decoder of another embedder).
            self.error = e

    def runtime(self) -> dict[str, str] | None:
        return None if self.captioner is None else self.captioner.runtime()

    def caption(self, paths: list[str], names: list[str]) -> list[list[CaptionResult]]:
        if self.error is not None:
            raise self.error
        return list(self.captioner.caption_each(paths, names))


def caption_on_ray(
    store: Store,
    collection: str,
    settings: CaptionSettings,
    paths: Sequence[str],
    ray_options: RayOptions,
    decoder: str | Path | None = None,
    lm: str = "gpt2",
    model: str | None = None,
    device: str | None = None,
    precision: str | None = None,
    on_runtime: Callable[[dict[str, str], int], None] | None = None,
) -> Iterator[CaptionResult]:
    """Caption the images at `paths` as Captioner.caption_images does, on a Ray cluster.
    on_runtime(runtime, actors) is told where the actors' models run before the first result."""
    from ragcap.store.client import ClientStore

    open_store = worker_store(store)
    with connect(ray_options.address) as cluster:
        if not isinstance(store, ClientStore) and cluster.nodes > 1:
            raise StoreError(
                f"the embedded store's files are on this machine, but the Ray cluster has {cluster.nodes} nodes: "
                "caption against a Qdrant server every node reaches (--qdrant-url URL; fill it with `ragcap ingest`)"
            )
        plan = plan_actors(ray_options, cluster, write_tasks=False)
        import ray
        from ray.util import ActorPool

        actor = ray.remote(CaptionActor).options(num_cpus=plan.cpus, num_gpus=plan.gpus)
        args = (open_store, collection, settings, decoder, lm, model, device, plan.threads, precision)
        actors = [actor.remote(*args) for _ in range(plan.actors)]
        pool = ActorPool(actors)
        try:
            if on_runtime is not None:
                on_runtime(_merged([r for r in ray.get([a.runtime.remote() for a in actors]) if r]), len(actors))
            # Absolute paths (a worker's directory is not this one), results named as given.
            calls = pool.map(lambda a, batch: a.caption.remote([str(Path(p).absolute()) for p in batch], batch),
                             chunks(paths, settings.batch_size))
            for groups in calls:
                for results in groups:
                    yield from results
        except Exception as e:
            raise ragcap_error(e) or e



def _merged(runtimes: list[dict[str, str]]) -> dict[str, str]:
    """Where every actor runs, as Captioner.runtime lists several models: comma-separated, each once."""
    return {key: ",".join(sorted({part for r in runtimes for part in r[key].split(",")})) for key in ("device", "precision")}
