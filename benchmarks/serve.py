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
    python benchmarks/serve.py --memory 5000 --levels 1,4    # smoke run
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


def cli_rate(vit: str, decoder: str, paths: list[str], batch_size: int) -> float:
    """Images/s of the CLI's pipeline (one warm-up batch first, as a long CLI run amortises it)."""
    from ragcap.decoders import load_decoder

    with open_store() as store:
        embedder = load_embedder(vit, image_only=True)
        captioner = Captioner(store, "bench", embedder, CaptionSettings(modes=("pd",), batch_size=batch_size),
                              decoder=load_decoder(decoder))
        list(captioner.caption_images(paths[:batch_size]))
        started = time.perf_counter()
        results = list(captioner.caption_images(paths))
        seconds = time.perf_counter() - started
    assert all(r.error is None for r in results)
    return len(paths) / seconds


class Server:
    """`ragcap serve` in a child process on a free loopback port."""

    def __init__(self, vit: str, decoder: str, max_batch: int, log: Path):
        cmd = [sys.executable, "-m", "ragcap.cli", "serve", "-c", "bench", "--mode", "pd", "--decoder", decoder, "--model", vit,
               "--port", "0", "--max-batch", str(max_batch), "--max-queue", "1024", "--timeout", "600"]
        self.log = open(log, "w")
        self.child = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=self.log, text=True)
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
    parser.add_argument("--cli-images", type=int, default=96, help="photos for the CLI baseline")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(c) for c in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="ragcap-bench-serve-"))
    os.environ["RAGCAP_HOME"] = str(tmp)
    vit = str(save_random("ViT-B-32", tmp / "vit-b-32"))
    embedder = load_embedder(vit, image_only=True)
    with open_store() as store:
        captions = fill_memory(store, "bench", embedder.info, args.memory)
    decoder = str(DeCapDecoder(DeCapConfig(embed_dim=embedder.info.dim).pruned_to(captions), embedder.info).save(tmp / "decoder"))
    del embedder
    paths = real_images(max(args.cli_images, 32))
    photos = [(Path(p).name, Path(p).read_bytes()) for p in paths]

    cli_before = cli_rate(vit, decoder, paths[: args.cli_images], 32)
    runs = {}
    for label, max_batch in (("batching", 32), ("no_batching", 1)):
        server = Server(vit, decoder, max_batch, tmp / f"serve-{label}.log")
        try:
            asyncio.run(load(server.url, photos, 32, 32))  # warm-up: one full batch
            runs[label] = [asyncio.run(load(server.url, photos, c, max(args.min_requests, 3 * c))) for c in levels]
        finally:
            server.stop()
    cli_after = cli_rate(vit, decoder, paths[: args.cli_images], 32)
    cli = (cli_before + cli_after) / 2

    top = max(levels)
    served = next(r for r in runs["batching"] if r["clients"] == top)
    report = {
        "memory_captions": args.memory,
        "cli_images_per_s": round(cli, 2),
        "cli_images_per_s_before_after": [round(cli_before, 2), round(cli_after, 2)],
        "runs": runs,
        f"ratio_at_{top}_clients": round(served["images_per_s"] / cli, 3),
        "errors": sum(r["errors"] for rs in runs.values() for r in rs),
        "cpu_threads": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"CLI batched: {report['cli_images_per_s']} images/s (before {cli_before:.2f}, after {cli_after:.2f})")
        for label, rows in runs.items():
            for r in rows:
                print(f"{label:12s} clients {r['clients']:3d}: {r['images_per_s']:6.2f} images/s  p50 {r['p50_ms']} ms  "
                      f"p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms  mean batch {r['mean_batch']}  errors {r['errors']}")
        print(f"serve / CLI at {top} clients: {report[f'ratio_at_{top}_clients']}")


if __name__ == "__main__":
    main()
