"""`--engine ray`: one local Ray cluster for the whole session (127.0.0.1 only, usage statistics
off, actors at fractional CPUs so that 2 CPUs never deadlock), shared by every test here, which
run in one xdist worker. The server write path is tested in-process against qdrant-client's
local mode (there is no Qdrant server in CI)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from pipelines import ReadOptions
from pipelines.filters import normalise_caption
from ragcap import api
from ragcap.distributed import RayOptions
from ragcap.distributed.caption import caption_on_ray
from ragcap.distributed.cluster import Cluster, plan_actors
from ragcap.distributed.write import ServerTarget, StoredIds, upsert_retrying, write_batch
from ragcap.errors import OptionError, SourceError, StoreError
from ragcap.ingest import IngestOptions
from ragcap.store import EmbedderInfo, open_store, point_id
from ragcap.store.edge import EdgeStore
from tests.conftest import shared_path

pytestmark = pytest.mark.xdist_group("ray")
# Half a CPU each: two actors, the read tasks and the write tasks all fit in 2 CPUs.
TWO_ACTORS = RayOptions(actors=2, cpus_per_actor=0.5)
# Float16 storage of vectors that differ in the last float32 bits (the actors batch captions
# differently, and each batch is cut to its own longest caption) can round one component to
# the neighbouring float16: 2^-11 relative, under 1e-3 for components of a unit vector.
VECTOR_ATOL = 1e-3


@pytest.fixture(scope="session")
def ray_cluster():
    if importlib.util.find_spec("ray") is None:  # not imported: connect() must come first
        pytest.skip("Ray is not installed: pip install 'ragcap[ray]'")
    from ragcap.distributed.cluster import connect

    with connect(None) as cluster:
        yield cluster


def coco_captions(n: int) -> list[str]:
    data = json.loads(shared_path("data", "coco", "captions_val2017.json").read_text())
    return [a["caption"] for a in data["annotations"][:n]]


def write_lines(path: Path, captions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"caption": c, "image": i % 97}) + "\n" for i, c in enumerate(captions)))
    return path


def points(store, name: str) -> dict[str, tuple[dict, np.ndarray]]:
    return {pid: (payload, vector) for ids, vectors, payloads in store.scroll(name) for pid, vector, payload in zip(ids, vectors, payloads)}


def ingest(store, paths, engine=None, **kwargs):
    options = IngestOptions(batch_size=64)
    read = ReadOptions(text_field="caption", id_field="image")
    return api.ingest_corpus(store, "jsonl", [str(p) for p in paths], "c", kwargs.pop("model", None), read, options, engine=engine, **kwargs)[1]


# ------------------------------------------------------------------------------- the cluster


def _listening(pids: set[int]) -> list[str]:
    """Local addresses of the TCP sockets that processes `pids` listen on (Linux /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def _descendants(root: int) -> set[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    family, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family |= more
        grew = bool(more)
    return family


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1, ::ffff:127.0.0.1


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from Linux's /proc")
def test_local_cluster_listens_on_loopback_only_with_usage_stats_off(ray_cluster):
    addresses = _listening(_descendants(os.getpid()))
    assert len(addresses) >= 3  # the GCS, the raylet, this driver's worker
    assert set(addresses) <= LOOPBACK, addresses
    assert ray_cluster.address.startswith("127.0.0.1:")
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"


def test_actors_that_would_take_every_cpu_are_refused():
    two_cpus = Cluster("127.0.0.1:1", 1, 2.0, 0.0)
    with pytest.raises(OptionError, match="wait forever: pass --cpus-per-actor 0.75"):
        plan_actors(RayOptions(actors=2, cpus_per_actor=1), two_cpus, write_tasks=True)
    assert plan_actors(TWO_ACTORS, two_cpus, write_tasks=True).actors == 2
    assert plan_actors(RayOptions(), two_cpus, write_tasks=False).actors == 1
    with pytest.raises(OptionError, match="no GPU"):
        plan_actors(RayOptions(gpus_per_actor=1), two_cpus, write_tasks=False)
    eight_gpus = plan_actors(RayOptions(), Cluster("h:1", 2, 64.0, 8.0), write_tasks=True)
    assert (eight_gpus.actors, eight_gpus.gpus, eight_gpus.cpus) == (8, 1.0, 1.0)


# ------------------------------------------------------------------------------- ingest


def test_ray_ingest_stores_what_the_single_process_ingest_stores(ray_cluster, tmp_path, tiny_clip_dir):
    # Distinct captions across the two files (a caption in both is stored once with either
    # file's payload, see ragcap.distributed.source); each file repeats some of its own.
    captions = list({normalise_caption(c): c for c in coco_captions(1300)}.values())[:1200]
    files = [write_lines(tmp_path / "a.jsonl", captions[:600] + captions[:40]),
             write_lines(tmp_path / "b.jsonl", captions[600:] + captions[650:660])]
    with open_store(path=tmp_path / "one") as one, open_store(path=tmp_path / "ray") as many:
        alone = ingest(one, files, model=str(tiny_clip_dir))
        spread = ingest(many, files, TWO_ACTORS, model=str(tiny_clip_dir))
        for name in ("read", "duplicates", "stored", "skipped_bad", "already_stored"):
            assert getattr(spread, name) == getattr(alone, name), name
        expected, got = points(one, "c"), points(many, "c")
        assert got.keys() == expected.keys() and len(got) == alone.stored > 1000
        assert all(got[pid][0] == expected[pid][0] for pid in expected)  # payloads: caption, corpus, image id
        worst = max(float(np.abs(got[pid][1] - expected[pid][1]).max()) for pid in expected)
        assert worst <= VECTOR_ATOL
        again = ingest(many, files, TWO_ACTORS)  # the collection's own model
        assert (again.stored, again.already_stored) == (0, alone.stored) and many.count("c") == alone.stored


def test_parquet_out_then_ingest_parquet_gives_the_same_memory(ray_cluster, tmp_path, tiny_clip_dir):
    files = [write_lines(tmp_path / "a.jsonl", coco_captions(300))]
    out = tmp_path / "parts"
    with open_store(path=tmp_path / "direct") as direct, open_store(path=tmp_path / "via") as via:
        made = ingest(direct, files, model=str(tiny_clip_dir))
        written = ingest(via, files, TWO_ACTORS, model=str(tiny_clip_dir), parquet_out=out)
        assert written.stored == made.stored and not via.exists("c")
        assert ingest(via, files, TWO_ACTORS, model=str(tiny_clip_dir), parquet_out=out).stored == 0  # resumes: all there
        parts = sorted(str(p) for p in out.glob("part-*.parquet"))
        loaded = api.ingest_corpus(via, "parquet", parts, "c", None, ReadOptions(text_field="caption", vector_field="vector"))[1]
        assert loaded.stored == made.stored
        expected, got = points(direct, "c"), points(via, "c")
        assert got.keys() == expected.keys()
        assert all(got[pid][0] == expected[pid][0] for pid in expected)


def test_kill_mid_run_then_rerun_gives_the_exact_count(ray_cluster, tmp_path, tiny_clip_dir, ragcap_home):
    captions = coco_captions(4000)
    corpus = write_lines(tmp_path / "big.jsonl", captions)
    unique = len({normalise_caption(c) for c in captions})
    command = [sys.executable, "-m", "ragcap.cli", "ingest", "jsonl", str(corpus), "--text-field", "caption", "-c", "c",
               "-m", str(tiny_clip_dir), "--batch-size", "64", "--engine", "ray", "--ray-address", ray_cluster.address,
               "--actors", "1", "--cpus-per-actor", "0.5", "--json"]
    env = {**os.environ, "RAGCAP_HOME": str(ragcap_home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    stored = 0
    while stored < 128 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        listed = EdgeStore(ragcap_home).collections()
        stored = listed[0].points if listed and listed[0].points else 0
    assert victim.poll() is None, victim.stderr.read().decode()[-2000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 0 < EdgeStore(ragcap_home).collections()[0].points < unique  # killed mid-run
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout)
    assert result["points"] == unique and result["stored"] + result["already_stored"] == unique


def test_an_unreadable_line_stops_the_run_with_its_location_and_nothing_is_created(ray_cluster, tmp_path, tiny_clip_dir, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a dog", "image": 1}\nnot json\n')
    with open_store(path=tmp_path / "s") as store:
        with pytest.raises(SourceError, match=r"bad.jsonl:2: invalid JSON") as e:
            ingest(store, [bad], TWO_ACTORS, model=str(tiny_clip_dir))
        assert not store.exists("c")
    # One line, as without Ray: neither Ray Data's retry advice in the message nor its log of the traceback.
    assert "\n" not in str(e.value) and "Traceback" not in capfd.readouterr().err


def test_caption_on_ray_gives_the_captions_of_one_process(ray_cluster, tmp_path, ragcap_home, tiny_clip_dir, monkeypatch):
    from typer.testing import CliRunner

    from ragcap.caption import CaptionSettings
    from ragcap.cli import app
    from ragcap.embed import load_embedder
    from tests.serving import fill, png, tiny_decoder

    embedder = load_embedder(str(tiny_clip_dir))
    decoder = tiny_decoder(tmp_path / "decoder", embedder)
    images = []
    for i in range(9):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(png(i))
    images.insert(4, tmp_path / "broken.png")
    images[4].write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)  # relative paths, which the actors must resolve as the driver does
    images = [image.name for image in images]
    with open_store() as store:
        fill(store, embedder)
        settings = CaptionSettings(modes=("pd", "clipre"), neighbours=2, batch_size=3)
        captioner = api.load_captioner(store, "mem", settings, decoder)
        alone, runtime = list(captioner.caption_images(images)), captioner.runtime()
    out = tmp_path / "captions.jsonl"
    done = CliRunner().invoke(app, ["caption", *images, "-c", "mem", "--mode", "pd,clipre", "--neighbours", "2",
                                    "--batch-size", "3", "--decoder", str(decoder), "-o", str(out), "--format", "jsonl",
                                    "--engine", "ray", "--actors", "2", "--cpus-per-actor", "0.5"])
    assert done.exit_code == 1, done.output  # the broken image, reported in its place
    spread = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["file"], r.get("mode"), r.get("caption"), r.get("error")) for r in spread] == [
        (r.source, r.mode, r.caption, r.error) for r in alone]
    assert "broken.png" in spread[8]["file"] and "not an image" in spread[8]["error"]
    # Every record says where its models ran, as without Ray (README: a silent CPU fallback shows).
    assert all((r["device"], r["precision"]) == (runtime["device"], runtime["precision"]) for r in spread)
    assert f"running on {runtime['device']}, {runtime['precision']} (2 Ray actors)" in done.output
    for got, expected in zip(spread, alone):
        if expected.neighbours:
            assert [n["caption"] for n in got["neighbours"]] == [c for c, _ in expected.neighbours]
            assert [n["score"] for n in got["neighbours"]] == pytest.approx([s for _, s in expected.neighbours], abs=1e-4)
    with open_store() as store, pytest.raises(StoreError, match="'nothing'"):  # an actor's error, out of Ray's wrappers
        list(caption_on_ray(store, "nothing", settings, images[:1], TWO_ACTORS, decoder))


def test_embed_images_on_ray_writes_the_features_of_one_process(ray_cluster, tmp_path, tiny_clip_dir, monkeypatch):
    from typer.testing import CliRunner

    from ragcap.cli import app
    from ragcap.features import read_features
    from tests.serving import png

    (tmp_path / "images").mkdir()
    rows = [{"file": f"{i}.png", "image_id": i, "references": [f"picture {i}"]} for i in range(7)]
    for row in rows:
        (tmp_path / "images" / row["file"]).write_bytes(png(row["image_id"]))
    (tmp_path / "images" / "3.png").write_bytes(b"not an image")
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # relative paths, which the actors must resolve as the driver does
    common = ["embed-images", "refs.jsonl", "--images", "images", "-m", str(tiny_clip_dir), "--batch-size", "2", "--json"]
    alone = CliRunner().invoke(app, [*common, "-o", "alone.parquet"])
    spread = CliRunner().invoke(app, [*common, "-o", "ray.parquet", "--engine", "ray", "--actors", "2", "--cpus-per-actor", "0.5"])
    assert alone.exit_code == spread.exit_code == 1  # the unreadable image, reported by both
    assert json.loads(spread.stdout)["broken"] == json.loads(alone.stdout)["broken"] != {}
    expected, got = read_features(tmp_path / "alone.parquet"), read_features(tmp_path / "ray.parquet")
    assert (got.image_ids, got.files, got.references, got.embedder) == (expected.image_ids, expected.files, expected.references, expected.embedder)
    assert len(got.image_ids) == 6
    np.testing.assert_allclose(got.vectors, expected.vectors, atol=1e-5)


# ------------------------------------------------------------------------------- bad input


def test_embedded_store_on_a_multi_node_cluster_is_refused(tmp_path, tiny_clip_dir, monkeypatch):
    """A cluster of two nodes, as connect() describes one (a loopback-only local cluster takes no
    second node: Ray refuses it with the switch that keeps it on 127.0.0.1)."""
    from contextlib import contextmanager

    from ragcap.caption import CaptionSettings

    @contextmanager
    def two_nodes(address):
        yield Cluster("10.0.0.1:6379", 2, 4.0, 0.0)

    monkeypatch.setattr("ragcap.distributed.ingest.connect", two_nodes)
    monkeypatch.setattr("ragcap.distributed.caption.connect", two_nodes)
    with open_store(path=tmp_path / "s") as store:
        with pytest.raises(StoreError, match="has 2 nodes") as refused:
            ingest(store, [write_lines(tmp_path / "a.jsonl", ["a dog"])], TWO_ACTORS, model=str(tiny_clip_dir))
        assert "--qdrant-url" in str(refused.value) and "--parquet-out" in str(refused.value)
        assert not store.exists("c")
        with pytest.raises(StoreError, match="has 2 nodes.*--qdrant-url"):
            list(caption_on_ray(store, "c", CaptionSettings(modes=("clipre",)), ["a.png"], TWO_ACTORS))


def test_unreachable_ray_address_fails_fast_and_creates_nothing(tmp_path, ragcap_home, tiny_clip_dir):
    corpus = write_lines(tmp_path / "a.jsonl", ["a dog"])
    done = subprocess.run(
        [sys.executable, "-m", "ragcap.cli", "ingest", "jsonl", str(corpus), "--text-field", "caption", "-m", str(tiny_clip_dir),
         "--engine", "ray", "--ray-address", "127.0.0.1:9"],
        env={**os.environ, "RAGCAP_HOME": str(ragcap_home)}, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:9" in done.stderr and "ray start --head" in done.stderr
    assert not (ragcap_home / "collections" / "captions").exists()


def test_a_port_that_is_not_ray_is_refused_at_once_and_a_real_head_is_accepted(ray_cluster):
    """Issue row: --ray-address at a web port (the dashboard's 8265, Qdrant's 6333) hung in Ray's retries for minutes."""
    import http.server
    import socket
    import threading

    from ragcap.distributed.cluster import _probe
    from ragcap.errors import RagcapError

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    try:
        for port in (web.server_address[1], silent.getsockname()[1]):
            with pytest.raises(RagcapError, match=f"127.0.0.1:{port} answers, but not as a Ray cluster does"):
                _probe(f"127.0.0.1:{port}")
    finally:
        web.shutdown()
        web.server_close()
        silent.close()
    _probe(ray_cluster.address)  # the session's own head: gRPC


def test_in_memory_store_and_misplaced_ray_options_are_refused(tmp_path, tiny_clip_dir):
    corpus = write_lines(tmp_path / "a.jsonl", ["a dog"])
    with open_store(memory=True) as store, pytest.raises(StoreError, match="--qdrant-url"):
        ingest(store, [corpus], TWO_ACTORS, model=str(tiny_clip_dir))
    from ragcap.cli.common import ray_options

    with pytest.raises(OptionError, match="--actors need --engine ray"):
        ray_options(None, None, 2, None, None)
    with pytest.raises(OptionError, match="unknown --engine 'spark'"):
        ray_options("spark", None, None, None, None)


def test_without_engine_ray_is_never_imported(tmp_path, tiny_clip_dir):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red car\na blue cup\n")
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ragcap.cli import app\n"
        f"result = CliRunner().invoke(app, ['ingest', 'text', {str(corpus)!r}, '-m', {str(tiny_clip_dir)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "RAGCAP_HOME": str(tmp_path / "home")},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


# ------------------------------------------------------------------------------- the server write path


class Flaky:
    """A :memory: store whose first `failures` upserts fail as a dropped connection would."""

    def __init__(self, failures: int, error: Exception | None = None):
        self.store = open_store(memory=True)
        self.store.create("c", EmbedderInfo("random-8", 8))
        self.failures, self.error, self.calls = failures, error, 0
        upsert = self.store.client.upsert

        def flaky_upsert(*args, **kwargs):
            self.calls += 1
            if self.calls <= self.failures:
                raise self.error or ResponseHandlingException(ConnectionError("connection reset by peer"))
            return upsert(*args, **kwargs)

        self.store.client.upsert = flaky_upsert


def batch(captions: list[str], seed: int = 0) -> dict:
    vectors = np.random.default_rng(seed).standard_normal((len(captions), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return {"id": np.array([point_id("c", c) for c in captions], dtype=object), "caption": np.array(captions, dtype=object),
            "payload": np.array([json.dumps({"caption": c, "corpus": "t"}) for c in captions], dtype=object),
            "vector": vectors, "tokens": np.array([90] + [5] * (len(captions) - 1)), "truncated": np.zeros(len(captions), bool)}


def test_write_task_retries_transient_failures_and_rewrites_idempotently(monkeypatch):
    flaky = Flaky(failures=2)
    monkeypatch.setattr("ragcap.distributed.write.RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    rows = batch([f"caption {i}" for i in range(1500)])  # 3 requests of UPSERT_BATCH
    out = write_batch(rows, lambda: flaky.store, "c")
    assert (int(out["stored"][0]), int(out["retries"][0]), int(out["over_77_tokens"][0])) == (1500, 2, 1)
    assert flaky.store.count("c") == 1500
    write_batch(rows, lambda: flaky.store, "c")  # Ray runs a task again: the same points, no more
    assert flaky.store.count("c") == 1500
    stored = {pid: payload for ids, _, payloads in flaky.store.scroll("c") for pid, payload in zip(ids, payloads)}
    assert stored[point_id("c", "caption 7")] == {"caption": "caption 7", "corpus": "t"}


def test_write_task_gives_up_after_its_retries_and_never_retries_a_refusal():
    rows = batch(["a", "b"])
    waits = []
    dead = Flaky(failures=100)
    with pytest.raises(StoreError, match="failed 4 times.*rerun the same command to resume"):
        upsert_retrying(dead.store, "c", rows["id"].tolist(), rows["vector"], [{"caption": "a"}, {"caption": "b"}],
                        delays=(0.1, 0.2, 0.4), sleep=waits.append)
    assert waits == [0.1, 0.2, 0.4]
    refused = Flaky(failures=1, error=UnexpectedResponse(400, "Bad Request", b"wrong vector size", None))
    with pytest.raises(UnexpectedResponse):
        upsert_retrying(refused.store, "c", rows["id"].tolist(), rows["vector"], [{"caption": "a"}, {"caption": "b"}],
                        sleep=waits.append)
    assert refused.calls == 1 and waits == [0.1, 0.2, 0.4]


def test_stored_id_snapshot_and_server_lookup_agree(monkeypatch):
    flaky = Flaky(failures=0)
    held = [f"caption {i}" for i in range(0, 300, 3)]
    write_batch(batch(held), lambda: flaky.store, "c")
    asked = [point_id("c", f"caption {i}") for i in range(300)]
    expected = {point_id("c", c) for c in held}
    snapshot = StoredIds.from_ids(flaky.store.ids("c"))
    assert len(snapshot) == 100 and snapshot.existing(asked) == expected
    assert StoredIds.from_ids([]).existing(asked) == set()
    from ragcap.distributed import write

    monkeypatch.setitem(write._CONNECTIONS, ("http://memory", None), flaky.store)  # a worker's connection, already open
    assert write.ServerIds(ServerTarget("http://memory", None), "c").existing(asked) == expected
