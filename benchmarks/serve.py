"""`ragcap serve` under load: concurrent clients on 127.0.0.1 vs the CLI's batched captioning.

The setup is benchmarks/caption.py's: real COCO photographs, ViT-B-32 (random weights: the real
architecture, so the real speed), a DeCap-size decoder, a 200,000-caption memory, `pd` mode.
The baseline is what `ragcap caption` runs, Captioner.caption_images over the photos in
batches of 32, in this process; it is timed before and after the server runs (the machine is
shared, so the mean of the two is the reference). The server runs as `ragcap serve` in a child
process, once with dynamic batching (--max-batch 32) and once without (--max-batch 1); for each,
C clients (C = 1, 8, 32) each send one photo per request, back to back, until the level's
request count is done, and every answer must be 200.

    python benchmarks/serve.py --json                       # full
    python benchmarks/serve.py --memory 5000 --levels 1,4 --rounds 1 --cli-images 32   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from caption import fill_memory, real_images  # benchmarks/caption.py: the same memory and photos
from ragcap.caption import CaptionSettings, Captioner
from ragcap.decoders import DeCapConfig, DeCapDecoder
from ragcap.embed import load_embedder, save_random
from ragcap.store import open_store


def cli_rate(home: Path, vit: str, decoder: str, paths: list[str]) -> float:
    """Images/s of the CLI's pipeline over `paths` in its steady state, as a long run reaches it
    (run in a child process). The first pass after loading is the warm-up: measured, the first
    batches of a fresh process run up to 2x slower than later ones."""
    from ragcap.decoders import load_decoder

    with open_store(path=home) as store:
        settings = CaptionSettings(modes=("pd",), batch_size=32)
        captioner = Captioner(store, "bench", load_embedder(vit, image_only=True), settings, decoder=load_decoder(decoder))
        list(captioner.caption_images(paths))
        started = time.perf_counter()
        results = list(captioner.caption_images(paths))
        seconds = time.perf_counter() - started
    assert all(r.error is None for r in results)
    return len(paths) / seconds


def cli_child(home: Path, vit: str, decoder: str, paths: list[str]) -> float:
    args = [sys.executable, __file__, "--cli-child", json.dumps([str(home), vit, decoder, paths])]
    return float(subprocess.run(args, check=True, capture_output=True, text=True).stdout)


class Server:
    """`ragcap serve` in a child process on a free loopback port."""

    def __init__(self, home: Path, vit: str, decoder: str, max_batch: int, log: Path):
        cmd = [sys.executable, "-m", "ragcap.cli", "serve", "-c", "bench", "--mode", "pd", "--decoder", decoder, "--model", vit,
               "--port", "0", "--max-batch", str(max_batch), "--max-queue", "1024", "--timeout", "600"]
        self.log = open(log, "w")
        self.child = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=self.log, text=True, env={**os.environ, "RAGCAP_HOME": str(home)})
        for line in self.child.stderr:
            self.log.write(line)
            if "serving collection" in line:
                self.url = line.split(" on ", 1)[1].split("/ ", 1)[0]
                break
        else:
            raise SystemExit(f"ragcap serve did not start; see {log}")
        threading.Thread(target=lambda: [self.log.write(l) for l in self.child.stderr], daemon=True).start()
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/v1/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"ragcap serve was not ready in 5 minutes; see {log}")

    def stop(self) -> None:
        self.child.terminate()
        self.child.wait(120)
        self.log.close()


async def load(url: str, photos: list[tuple[str, bytes]], clients: int, requests: int) -> dict:
    """`clients` concurrent clients, one photo per request, `requests` in all."""
    import httpx

    latencies, failures, batch_sizes = [], [], []
    todo = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:
            name, data = photos[i % len(photos)]
            started = time.perf_counter()
            response = await http.post("/v1/caption", files={"images": (name, data, "image/jpeg")})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
            else:
                batch_sizes.append(response.json()["timing"]["batch_items"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "clients": clients, "requests": requests, "errors": len(failures), "first_error": failures[0] if failures else None,
        "images_per_s": round(requests / seconds, 2),
        "p50_ms": round(float(np.percentile(ms, 50))), "p95_ms": round(float(np.percentile(ms, 95))),
        "p99_ms": round(float(np.percentile(ms, 99))), "mean_batch": round(float(np.mean(batch_sizes)), 1) if batch_sizes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=int, default=200_000, help="captions in the collection")
    parser.add_argument("--levels", default="1,8,32", help="client counts")
    parser.add_argument("--min-requests", type=int, default=24, help="requests per level: this, or 3 per client if more")
    parser.add_argument("--cli-images", type=int, default=96, help="photos per CLI baseline pass")
    parser.add_argument("--rounds", type=int, default=3, help="CLI / serve turns at the most clients")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--cli-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cli_child:
        home, vit, decoder, paths = json.loads(args.cli_child)
        print(cli_rate(Path(home), vit, decoder, paths))
        return
    levels = [int(c) for c in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="ragcap-bench-serve-"))
    vit = str(save_random("ViT-B-32", tmp / "vit-b-32"))
    info = load_embedder(vit, image_only=True).info
    homes = {"serve": tmp / "serve-home", "cli": tmp / "cli-home"}
    for home in homes.values():  # the same captions and (seeded) vectors in both
        with open_store(path=home) as store:
            captions = fill_memory(store, "bench", info, args.memory)
    decoder = str(DeCapDecoder(DeCapConfig(embed_dim=info.dim).pruned_to(captions), info).save(tmp / "decoder"))
    paths = real_images(max(args.cli_images, 32))
    photos = [(Path(p).name, Path(p).read_bytes()) for p in paths]
    top = max(levels)

    runs, rounds = {}, []
    for label, max_batch in (("batching", 32), ("no_batching", 1)):
        server = Server(homes["serve"], vit, decoder, max_batch, tmp / f"serve-{label}.log")
        try:
            asyncio.run(load(server.url, photos, 32, 32))  # warm-up: one full batch
            runs[label] = [asyncio.run(load(server.url, photos, c, max(args.min_requests, 3 * c))) for c in levels]
            for _ in range(args.rounds if max_batch > 1 else 0):
                baseline = cli_child(homes["cli"], vit, decoder, paths[: args.cli_images])
                served = asyncio.run(load(server.url, photos, top, max(args.min_requests, 3 * top)))
                rounds.append({"cli_images_per_s": round(baseline, 2), "serve_images_per_s": served["images_per_s"],
                               "ratio": round(served["images_per_s"] / baseline, 3), "errors": served["errors"]})
        finally:
            server.stop()

    report = {
        "memory_captions": args.memory,
        "runs": runs,
        f"rounds_cli_vs_serve_at_{top}_clients": rounds,
        f"median_ratio_at_{top}_clients": float(np.median([r["ratio"] for r in rounds])) if rounds else None,
        "errors": sum(r["errors"] for rs in runs.values() for r in rs) + sum(r["errors"] for r in rounds),
        "cpu_threads": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for label, rows in runs.items():
            for r in rows:
                print(f"{label:12s} clients {r['clients']:3d}: {r['images_per_s']:6.2f} images/s  p50 {r['p50_ms']} ms  "
                      f"p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms  mean batch {r['mean_batch']}  errors {r['errors']}")
        for r in rounds:
            print(f"round: CLI {r['cli_images_per_s']} images/s, serve {r['serve_images_per_s']} images/s at {top} clients: {r['ratio']}")
        print(f"median serve / CLI at {top} clients: {report[f'median_ratio_at_{top}_clients']}; errors {report['errors']}")

if __name__ == "__main__":
    main()
