"""What every command shares: the Typer apps, the error handling, and the common options."""

from __future__ import annotations

import functools
from typing import Annotated, Callable, Optional

import typer

from ragcap.errors import RagcapError

app = typer.Typer(
    help="Retrieval-augmented image captioning with a Qdrant caption memory.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = typer.Typer(help="Make models for offline use and benchmarks.", no_args_is_help=True)
app.add_typer(models_app, name="models")

QdrantUrl = Annotated[
    Optional[str],
    typer.Option("--qdrant-url", envvar="RAGCAP_QDRANT_URL", help="Qdrant server URL (default: the embedded store under $RAGCAP_HOME)."),
]
QdrantKey = Annotated[Optional[str], typer.Option("--qdrant-api-key", envvar="RAGCAP_QDRANT_API_KEY", help="API key for --qdrant-url.")]
Collection = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Device = Annotated[Optional[str], typer.Option("--device", help="torch device (default: cuda if available, else cpu).")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder (default: the collection's).")]


def command(app_: typer.Typer, name: str | None = None) -> Callable:
    """Register a command whose RagcapErrors become one-line messages and exit status 1."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except RagcapError as err:
                typer.echo(f"ragcap: error: {err}", err=True)
                raise typer.Exit(1) from None
            except _server_errors() as err:
                typer.echo(f"ragcap: error: the Qdrant server failed: {err}", err=True)
                raise typer.Exit(1) from None
            except KeyboardInterrupt:
                typer.echo("ragcap: interrupted; rerun the same command to resume", err=True)
                raise typer.Exit(130) from None

        return app_.command(name)(run)

    return register


def _server_errors() -> tuple[type[Exception], ...]:
    """qdrant-client's errors for a server that answers badly (the store reports unreachable ones)."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    return (UnexpectedResponse, ResponseHandlingException)


def store(url: str | None, api_key: str | None):
    """The store the flags name (a server URL, else the embedded store); use it in a `with`."""
    from ragcap.store import open_store

    return open_store(url=url, api_key=api_key)


# Decoding options shared by every command that writes captions, for every decoder kind.
Beam = Annotated[Optional[int], typer.Option(help="Beam size; 1 = greedy [default: the decoder kind's: DeCap and ClipCap 1, prompt 3].")]
NumCaptions = Annotated[int, typer.Option("--num-captions", help="Captions per input: the n best beams, or n samples.")]
MaxTokens = Annotated[Optional[int], typer.Option(help="Length cap in tokens [default: the decoder's trained length; prompt 25].")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest token set holding this probability (nucleus).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k likeliest tokens.")]
Temperature = Annotated[Optional[float], typer.Option(help="Sample at this temperature (< 1 sharper, > 1 more varied).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for sampling: the same seed and inputs give the same captions.")]


def search_options(beam, num_captions, max_tokens, top_p, top_k, temperature, seed):
    """SearchOptions from the decoding flags; any of --top-p, --top-k or --temperature means sampling."""
    from ragcap.generation import SearchOptions

    sample = top_p is not None or top_k is not None or temperature is not None
    return SearchOptions(
        beam=beam, num_return=num_captions, max_tokens=max_tokens, sample=sample, seed=seed,
        top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, temperature=1.0 if temperature is None else temperature,
    )
