"""Run ragcap, stopping for good at a chosen call, so that a test can kill it exactly there.

    python -m tests.faults.stopper MARKER MODULE:FUNCTION[:TEXT] ragcap-arguments...

The first call of MODULE.FUNCTION whose arguments mention TEXT creates the file MARKER, then
sleeps until the process is killed (kill -9), or interrupted (Ctrl-C raises there).
"""

from __future__ import annotations

import functools
import importlib
import signal
import sys
import time
from pathlib import Path


def stop_at(marker: str | Path, target: str) -> None:
    module_name, function, *text = target.split(":", 2)
    owner = importlib.import_module(module_name)
    original = getattr(owner, function)

    @functools.wraps(original)
    def stopper(*args, **kwargs):
        if not text or any(text[0] in str(a) for a in args):
            Path(marker).touch()
            while True:
                time.sleep(0.05)
        return original(*args, **kwargs)

    setattr(owner, function, stopper)


if __name__ == "__main__":
    # Ctrl-C as a terminal delivers it, even when the test run itself was started in the
    # background, where the shell leaves SIGINT ignored and every child inherits that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    marker, target, *arguments = sys.argv[1:]
    stop_at(marker, target)
    sys.argv = ["ragcap", *arguments]
    from ragcap.cli import main

    main()
