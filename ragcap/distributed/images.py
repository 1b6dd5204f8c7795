"""`embed-images --engine ray`: batches of image files encoded by a pool of Ray actors, each
loading the image tower once (on a GPU when the cluster has one); ragcap.features writes what
comes back, in order, exactly as without Ray (parts, resume, the final file). Every node must
see the image files at the same paths (a shared filesystem)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from ragcap.distributed import RayOptions
from ragcap.distributed.cluster import connect, plan_actors, ragcap_error
from ragcap.distributed.embed import share_cpus


class ImageEncoder:
    def __init__(self, spec: str, device: str | None, threads: int):
        from ragcap.embed import load_embedder

        share_cpus(device, threads)
        self.embedder = load_embedder(spec, device, image_only=True)

    def encode(self, files: list[str], names: list[str], patches: bool):
        from ragcap.features import encode_files

        return encode_files(self.embedder, [Path(f) for f in files], names, patches)


@contextmanager
def encode_on_ray(spec: str, device: str | None, ray_options: RayOptions, patches: bool = False):
    """The `encode` of ragcap.features.embed_images, run by actors of a Ray cluster."""
    with connect(ray_options.address) as cluster:
        plan = plan_actors(ray_options, cluster, write_tasks=False)
        import ray
        from ray.util import ActorPool

        actor = ray.remote(ImageEncoder).options(num_cpus=plan.cpus, num_gpus=plan.gpus)
        pool = ActorPool([actor.remote(spec, device, plan.threads) for _ in range(plan.actors)])

        def encode(batches):
            try:  # absolute paths (a worker's directory is not this one), errors naming them as given
                yield from pool.map(lambda a, files: a.encode.remote([str(Path(f).absolute()) for f in files], list(map(str, files)), patches), batches)
            except Exception as e:
                raise ragcap_error(e) or e

        yield encode
