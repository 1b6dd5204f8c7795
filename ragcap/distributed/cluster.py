"""The Ray cluster a run uses: one started on this machine for the run, or one it joins; and
how many embedding actors fit in it."""

from __future__ import annotations

import logging
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ragcap.distributed import RayOptions
from ragcap.errors import OptionError, RagcapError

# A cluster started for one run is this machine's alone. Ray's own switch for that makes every
# server it starts listen on 127.0.0.1 (a default ray.init() listens on the machine's network
# address, where anyone who reaches the port can run code in it); it must be set before Ray is
# imported. Usage statistics stay off.
LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray CPUs that the read/prepare tasks and the write tasks ask for. They must fit beside the
# actors: two actors that reserve a whole CPU each leave a 2-CPU cluster nothing to read with,
# and Ray then waits forever without a word, so plan_actors refuses such a plan.
READ_CPUS = 0.25
WRITE_CPUS = 0.25
PROBE_TIMEOUT_S = 5.0  # for the TCP probe of --ray-address, so a wrong address fails fast


@dataclass(frozen=True)
class Cluster:
    address: str  # what `--ray-address` reaches it by
    nodes: int  # alive nodes
    cpus: float
    gpus: float


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor

    @property
    def threads(self) -> int:
        """torch threads of a CPU actor."""
        return max(1, round(self.cpus))


def import_ray():
    try:
        import ray
    except ImportError:
        raise RagcapError("--engine ray needs Ray: pip install 'ragcap[ray]'") from None
    return ray


@contextmanager
def connect(address: str | None) -> Iterator[Cluster]:
    """The cluster at `address`, or (None) a new one on this machine, shut down afterwards. A
    process that already called ray.init() keeps its own connection."""
    if address is None and "ray" not in sys.modules:
        os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ})
    if address not in (None, "auto"):
        _probe(address)  # seconds before importing Ray, which takes longer than a refusal
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        _init(ray, address)
    try:
        yield _describe(ray)
    finally:
        if started:
            ray.shutdown()


def _init(ray, address: str | None) -> None:
    # Errors reach the driver as exceptions; Ray's own notices would interleave with the progress bar.
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address is None:
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
            raise RagcapError(
                "Ray was imported before ragcap could keep its local cluster on 127.0.0.1; set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray, or start a cluster with "
                "`ray start --head` and pass --ray-address"
            )
        ray.init(**quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RagcapError(f"cannot join the Ray cluster at {address} ({_first_line(e)}); {_ADDRESS_HINT}") from None


_ADDRESS_HINT = "start one with `ray start --head` and pass its address (HOST:6379, ray://HOST:10001 or auto), or leave --ray-address out to start one here"


def _probe(address: str) -> None:
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise OptionError(f"--ray-address {address!r}: expected HOST:PORT, ray://HOST:PORT or auto")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S) as conn:
            grpc = _speaks_grpc(conn)
    except OSError as e:
        raise RagcapError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}); {_ADDRESS_HINT}") from None
    if not grpc:
        # Ray would retry such a port for minutes without a word (the dashboard's 8265, Qdrant's 6333, ...).
        raise RagcapError(
            f"{address} answers, but not as a Ray cluster does (its head's port, 6379, and ray://HOST:10001 speak "
            f"gRPC; this one does not); {_ADDRESS_HINT}"
        )


# HTTP/2's connection preface and an empty SETTINGS frame: a gRPC server answers with its own SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _speaks_grpc(conn: socket.socket) -> bool:
    """Whether the server on `conn` talks HTTP/2, as Ray's GCS and client servers (gRPC) do.
    A cluster with TLS (RAY_USE_TLS) expects a TLS handshake first: not checked then."""
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        return True
    try:
        conn.sendall(_H2_PREFACE)
        frame = b""
        while len(frame) < 9 and (chunk := conn.recv(9 - len(frame))):
            frame += chunk
    except OSError:  # silence (a timeout) or a reset: not a gRPC server
        return False
    return len(frame) == 9 and frame[3] == 4  # byte 3 of a frame header is its type; 4 is SETTINGS


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe(ray) -> Cluster:
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return Cluster(ray.get_runtime_context().gcs_address, nodes, resources.get("CPU", 0.0), resources.get("GPU", 0.0))


def plan_actors(options: RayOptions, cluster: Cluster, write_tasks: bool) -> ActorPlan:
    """Actors and their resources: the options, else one actor per GPU, else per spare CPU."""
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if cluster.gpus else 0.0)
    cpus = options.cpus_per_actor if options.cpus_per_actor is not None else 1.0
    if gpus < 0 or cpus <= 0:
        raise OptionError("--gpus-per-actor must be 0 or more and --cpus-per-actor more than 0")
    if gpus and not cluster.gpus:
        raise OptionError(f"--gpus-per-actor {gpus:g}: the Ray cluster has no GPU; pass --gpus-per-actor 0")
    reserved = READ_CPUS + (WRITE_CPUS if write_tasks else 0.0)
    if options.actors is not None:
        actors = options.actors
    elif gpus:
        actors = max(1, int(cluster.gpus // gpus))
    else:
        actors = max(1, int((cluster.cpus - reserved) // cpus))
    if actors < 1:
        raise OptionError(f"--actors {actors}: must be at least 1")
    if actors * gpus > cluster.gpus:
        raise OptionError(f"{actors} actors x {gpus:g} GPUs need {actors * gpus:g}; the cluster has {cluster.gpus:g}: pass fewer --actors")
    if actors * cpus + reserved > cluster.cpus:
        spare = (cluster.cpus - reserved) / actors
        hint = f"--cpus-per-actor {spare:.2g} or fewer --actors" if spare > 0 else "a larger cluster"
        raise OptionError(
            f"{actors} actors x {cpus:g} CPUs, plus {reserved:g} for reading and writing, need "
            f"{actors * cpus + reserved:g} CPUs; the cluster has {cluster.cpus:g}, and the run would wait forever: pass {hint}"
        )
    return ActorPlan(actors, cpus, gpus)


def ragcap_error(error: BaseException) -> RagcapError | None:
    """The RagcapError a task raised (bad input, an unreachable server), out of Ray's wrappers."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RagcapError) and type(error).__module__.startswith("ragcap"):
            if hasattr(error, "__notes__"):
                del error.__notes__  # Ray Data's notes on its retry settings: nothing a user can act on
            message = str(error)
            if "\n" in message:  # Ray Data appends the same advice to the message itself
                error.args = (message.splitlines()[0],)
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None
