"""Run a command in a child process and sample its peak memory from /proc (Linux).

Sampled rather than getrusage(RUSAGE_CHILDREN): that counts the forked child before exec, when
it still maps all of the (large) benchmark process.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run_sampled(cmd: list[str], env: dict, interval: float = 0.05) -> dict:
    """Wall seconds, peak resident set (rss) and peak private memory (anon, i.e. without
    file-backed pages such as torch's CUDA libraries and memory-mapped data), in GB."""
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = {"VmHWM": 0, "RssAnon": 0}
    while child.poll() is None:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{child.pid}/status").read_text().splitlines())
            for key in peak:
                peak[key] = max(peak[key], int(status[key].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(interval)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit code {child.returncode}")
    return {"seconds": round(seconds, 2), "rss_gb": round(peak["VmHWM"] / 1024**2, 2), "anon_gb": round(peak["RssAnon"] / 1024**2, 2)}
