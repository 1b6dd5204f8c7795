"""The `ragcap` command: option parsing and output only; the work is done by ragcap.api.

One module per group of commands registers on the shared Typer app:
    memory    ingest, collections, search, drop, export
    decode    train-decoder, train-clipcap, caption, eval
    features  embed-images
    models    models list / save-random / save-random-lm / stretch / import
    longclip  finetune-longclip
    serve     serve (HTTP API and web page)
    doctor    doctor (what this machine offers)
"""

from ragcap.cli import decode, doctor, features, longclip, memory, models, serve  # noqa: F401  (registration)
from ragcap.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
