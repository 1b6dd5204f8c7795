"""`ragcap doctor`: what this machine offers ragcap (versions, devices, Java, models, store, hub)."""

from __future__ import annotations

import typer

from ragcap.cli.common import Json, QdrantUrl, app, command


@command(app)
def doctor(qdrant_url: QdrantUrl = None, json_out: Json = False):
    """Check the installation: Python, torch and CUDA devices, Java for the metrics, cached
    models and their sizes, the store (location, free space, busy collections), hub access.

    Loads no model; the warnings say what will get in the way and what to do. Exit status 0."""
    from ragcap.doctor import diagnose, format_report
    from ragcap.report import emit_json

    report = diagnose(qdrant_url)
    if json_out:
        emit_json(report)
    else:
        typer.echo(format_report(report))
