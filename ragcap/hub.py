"""Whether the Hugging Face hub can be reached, decided once per process and in seconds.

Without network, huggingface_hub retries every download before giving up: 72 s of repeated
warnings were seen for one open_clip name before the error. So before a hub name is loaded,
ragcap asks once: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, or no TCP connection to the hub
within HUB_TIMEOUT_S, means offline, and the hub libraries are then switched to their offline
mode: a cached model loads from the cache at once, and a missing one fails at once.
"""

from __future__ import annotations

import os
import socket
import threading
from functools import lru_cache
from urllib.parse import urlparse

# A TCP handshake to the hub takes well under a second on any working network; 3 s also covers
# a slow DNS answer. The probe runs in a thread so a resolver that hangs cannot hold us longer.
HUB_TIMEOUT_S = 3.0
TRUE = ("1", "true", "yes", "on")


def offline_requested() -> bool:
    return any(os.environ.get(name, "").strip().lower() in TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when offline is asked for, or the hub does not answer within HUB_TIMEOUT_S."""
    if offline_requested():
        return False
    answered = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((hub_host(), 443), timeout=HUB_TIMEOUT_S).close()
            answered.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_TIMEOUT_S)
    return answered.is_set()


def use_cache_only_if_offline() -> bool:
    """Put huggingface_hub (and transformers, which asks it) in offline mode when the hub cannot
    be reached; returns whether it is offline."""
    if hub_reachable():
        return False
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True  # read at each call by huggingface_hub, and by transformers through it
    return True


def offline_reason() -> str:
    return "HF_HUB_OFFLINE is set" if offline_requested() else f"{hub_host()} cannot be reached"
