"""`ragcap doctor`: what this machine offers ragcap, gathered without loading any model.

Each check answers a question a first run otherwise answers the slow way: which torch and
devices, is Java there for the COCO metrics, which models are already cached (offline, only
those load), where the store lives, how much room it has and which collections are busy, and
whether the hub can be reached.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "open_clip_torch", "transformers", "huggingface_hub", "qdrant-edge-py",
            "qdrant-client", "sentence-transformers", "pycocoevalcap")
# Below this much free space an ingest of a large corpus or a decoder's checkpoints will not fit.
LOW_DISK_BYTES = 2 << 30


def diagnose(store_url: str | None = None) -> dict:
    """Every check as plain data (the --json output); `warnings` lists what will get in the way."""
    report = {
        "ragcap": _version("ragcap"),
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "config": _config(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch": _torch(),
        "java": _java(),
        "hub": _hub(),
        "models": _cached_models(),
        "default_model": _default_model(),
        "store": _store(store_url),
    }
    report["warnings"] = _warnings(report)
    return report


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _config() -> dict:
    """The config file in effect and what it sets (a malformed one fails here, as in every command)."""
    from ragcap.config import config_path, file_settings

    values = file_settings()
    if "qdrant_api_key" in values:
        values["qdrant_api_key"] = "(set)"  # a report may be pasted into an issue
    path = config_path()
    return {"file": str(path), "exists": path.is_file(), "values": values}


def _torch() -> dict:
    import torch

    from ragcap.errors import OptionError
    from ragcap.precision import resolve_precision
    from ragcap.util import default_device

    devices = [
        {"index": i, "name": torch.cuda.get_device_name(i), "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
        for i in range(torch.cuda.device_count())
    ]
    try:
        precision = resolve_precision()
    except OptionError as e:  # a bad RAGCAP_PRECISION or config value: reported, the rest still checked
        precision = f"unusable ({e})"
    try:
        device = str(default_device())
    except OptionError as e:  # a bad or absent RAGCAP_DEVICE: the same
        device = f"unusable ({e})"
    return {"cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "devices": devices,
            "default_device": device, "default_precision": precision, "cpu_threads": torch.get_num_threads()}


def _java() -> dict:
    java = shutil.which("java")
    if java is None:
        return {"path": None, "version": None}
    try:  # `java -version` writes to stderr
        run = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
        version = (run.stderr or run.stdout).strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError) as e:
        version = f"unusable: {e}"
    return {"path": java, "version": version}


def _hub() -> dict:
    from ragcap.hub import hub_host, hub_reachable, offline_reason

    reachable = hub_reachable()
    return {"host": hub_host(), "reachable": reachable, "why_not": None if reachable else offline_reason()}


def _cached_models() -> list[dict]:
    """Models in the Hugging Face cache (where open_clip and transformers download to)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    return sorted(({"repo": repo.repo_id, "kind": repo.repo_type, "size_mb": round(repo.size_on_disk / 2**20, 1)}
                   for repo in cache.repos), key=lambda r: r["repo"])


def _default_model() -> dict:
    from ragcap.api import default_model
    from ragcap.config import setting

    from ragcap.embed import check_available
    from ragcap.errors import RagcapError

    spec = default_model()
    try:  # loads nothing: a directory's files, or (offline) the cache
        check_available(spec)
        problem = None
    except RagcapError as e:  # RAGCAP_MODEL with a typo surfaced only at the first ingest
        problem = str(e)
    return {"spec": spec, "from": setting("model")[1], "problem": problem}


def _store(url: str | None) -> dict:
    from ragcap.store import default_home, open_store

    from ragcap.config import setting

    url = url or setting("qdrant_url")[0]
    where = {"kind": "server", "url": url} if url else {"kind": "embedded", "path": str(default_home())}
    try:
        with open_store(url=url, wait=0) as store:  # listing opens no collection, so it never waits
            where["collections"] = [{"name": c.name, "points": c.points, "status": c.status} for c in store.collections()]
        where["reachable"] = True
    except Exception as e:  # noqa: BLE001 - a doctor reports every failure and goes on
        from ragcap.store.client import server_error

        where.update(reachable=False, error=f"{type(e).__name__}: {server_error(e)}")
    if not url:
        existing = next(p for p in [Path(where["path"]), *Path(where["path"]).parents] if p.exists())
        where["free_gb"] = round(shutil.disk_usage(existing).free / 2**30, 1)
    return where


def _warnings(report: dict) -> list[str]:
    from ragcap.embed import parse_spec

    warnings = []
    if report["java"]["path"] is None:
        warnings.append("no Java: `ragcap eval` needs it for the COCO metrics (apt-get install default-jre-headless)")
    if not report["torch"]["cuda_available"]:
        warnings.append("no CUDA device: everything runs on the CPU; train decoders with `train-decoder --preset small`")
    model = report["default_model"]
    if model["problem"]:  # its message already says what to do offline
        warnings.append(f"the default model (from {model['from']}) cannot be used: {model['problem']}")
    # A usable local folder as the default needs neither the hub nor the cache.
    elif not report["hub"]["reachable"] and not report["models"] and parse_spec(model["spec"]).kind != "local":
        warnings.append("the hub is offline and no model is cached: use local model directories "
                        "(`ragcap models save-random ARCH DIR` makes one with random weights)")
    store = report["store"]
    if not store.get("reachable"):
        warnings.append(f"the store cannot be opened: {store.get('error')}")
    if store.get("free_gb") is not None and store["free_gb"] * 2**30 < LOW_DISK_BYTES:
        warnings.append(f"only {store['free_gb']} GB free under {store['path']}; set RAGCAP_HOME to a larger disk")
    return warnings


def format_report(report: dict) -> str:
    """The report as lines for people."""
    torch_, config = report["torch"], report["config"]
    settings = ", ".join(f"{k} = {v}" for k, v in config["values"].items()) or "no settings"
    devices = ", ".join(f"cuda:{d['index']} {d['name']} ({d['memory_gb']} GB)" for d in torch_["devices"]) or "none"
    store = report["store"]
    where = store.get("url") or store.get("path")
    collections = store.get("collections") or []
    busy = [c["name"] for c in collections if c["status"] != "ok"]
    lines = [
        f"ragcap        {report['ragcap']}",
        f"python        {report['python']['version']} ({report['python']['executable']})",
        "packages      " + ", ".join(f"{k} {v}" for k, v in report["packages"].items() if v),
        f"torch         CUDA {torch_['cuda'] or 'none'}; devices: {devices}; default device {torch_['default_device']}, "
        f"precision {torch_['default_precision']}, {torch_['cpu_threads']} CPU threads",
        f"config        {config['file']}" + (f": {settings}" if config["exists"] else " (none: built-in defaults)"),
        f"java          {report['java']['version'] or 'not found'}",
        f"hub           {report['hub']['host']}: " + ("reachable" if report["hub"]["reachable"] else f"offline ({report['hub']['why_not']})"),
        f"default model {report['default_model']['spec']} (from {report['default_model']['from']})",
        f"models cached {len(report['models'])}" + "".join(f"\n  {m['repo']} ({m['kind']}, {m['size_mb']} MB)" for m in report["models"]),
        f"store         {store['kind']} at {where}: "
        + (f"{len(collections)} collections" + (f", not ok: {', '.join(busy)}" if busy else "") if store.get("reachable") else f"unusable ({store.get('error')})")
        + (f"; {store['free_gb']} GB free" if store.get("free_gb") is not None else ""),
    ]
    lines += [f"warning       {w}" for w in report["warnings"]] or ["no warnings"]
    return "\n".join(lines)
