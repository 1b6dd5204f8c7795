"""What every command shares: the Typer apps, the error handling, and the common options."""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional, get_args

import click
import typer

from ragcap.errors import Interrupted, RagcapError, RagcapWarning
from ragcap.precision import PRECISIONS
from ragcap.store import DEFAULT_WAIT_S

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: Rich's tables label every flag `<bool>` and wrap each line at 80 columns.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Make models for offline use and benchmarks.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(models_app, name="models")


def _print_version(value: bool) -> None:
    if value:
        from ragcap import __version__

        typer.echo(f"ragcap {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Retrieval-augmented image captioning with a Qdrant caption memory.

    Exit status: 0 done; 1 an error, or a batch command with failed items (each reported on
    stderr); 2 a usage error; 130 interrupted (Ctrl-C). RAGCAP_DEBUG=1 prints tracebacks."""

def one_of(*choices: str) -> str:
    """The metavar of an option with fixed choices, `[decap|small]`; the command checks the value
    (a one-line error naming the choices), so the lists here are only what help shows."""
    return f"[{'|'.join(choices)}]"


QdrantUrl = Annotated[
    Optional[str],
    typer.Option("--qdrant-url", envvar="RAGCAP_QDRANT_URL", help="Qdrant server URL [default: the config file's qdrant_url, else the embedded store under $RAGCAP_HOME]."),
]
QdrantKey = Annotated[Optional[str], typer.Option("--qdrant-api-key", envvar="RAGCAP_QDRANT_API_KEY", help="API key for --qdrant-url [default: the config file's qdrant_api_key].")]
Collection = Annotated[str, typer.Option("--collection", "-c", help="Collection name.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
Device = Annotated[Optional[str], typer.Option("--device", help="torch device [default: $RAGCAP_DEVICE, the config file's device, else cuda if available, else cpu].")]
Precision = Annotated[Optional[str], typer.Option(
    "--precision", metavar=one_of(*PRECISIONS),
    help="The models' arithmetic: fp32, bf16 / fp16 autocast (several times faster on a GPU, slower on most CPUs), or int8 "
         "(quantized Linear layers, CPU only); README: Precision [default: $RAGCAP_PRECISION, the config file's precision, else fp32].")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help="Embedder (default: the collection's).")]
# Running on a Ray cluster (see ragcap.distributed), shared by the commands that can.
Engine = Annotated[Optional[str], typer.Option("--engine", metavar=one_of("ray"), help="ray: run on a Ray cluster (pip install 'ragcap[ray]'); default: this process.")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", envvar="RAGCAP_RAY_ADDRESS", help="Ray cluster to join: HOST:6379, ray://HOST:10001 or auto [default: start one here, on 127.0.0.1 only].")]
Actors = Annotated[Optional[int], typer.Option("--actors", help="Model actors [default: one per GPU, else one per spare CPU].")]
GpusPerActor = Annotated[Optional[float], typer.Option("--gpus-per-actor", help="GPUs each actor reserves [default: 1 if the cluster has GPUs, else 0].")]
CpusPerActor = Annotated[Optional[float], typer.Option("--cpus-per-actor", help="CPUs each actor reserves; fractions allowed [default: 1].")]


def ray_options(engine, address, actors, gpus_per_actor, cpus_per_actor):
    """RayOptions from the Ray flags, or None without --engine ray (then the others are refused)."""
    from ragcap.distributed import RayOptions
    from ragcap.errors import OptionError

    if engine not in (None, "ray"):
        raise OptionError(f"unknown --engine {engine!r}; the one engine is ray (leave it out to run in this process)")
    given = {"--ray-address": address, "--actors": actors, "--gpus-per-actor": gpus_per_actor, "--cpus-per-actor": cpus_per_actor}
    if engine is None:
        named = [flag for flag, value in given.items() if value is not None and flag != "--ray-address"]
        if named:
            raise OptionError(f"{', '.join(named)} need --engine ray")
        return None
    return RayOptions(address, actors, gpus_per_actor, cpus_per_actor)


Wait = Annotated[
    float,
    typer.Option("--wait", metavar="SECONDS", help="How long to wait for a collection another ragcap process is using (embedded store; negative: as long as it takes)."),
]


def command(app_: typer.Typer, name: str | None = None, interrupted: str = "interrupted") -> Callable:
    """Register a command whose errors become one line on stderr and a non-zero exit status:
    ragcap's own errors with their message, anything else (the store engine, the OS, a bug)
    described in a line too. RAGCAP_DEBUG=1 prints the traceback first. `interrupted` is what
    Ctrl-C prints (e.g. how to resume)."""

    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                with _one_line_warnings():
                    return fn(*args, **kwargs)
            except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
                raise  # the command's own exit status, and usage errors
            except KeyboardInterrupt as err:
                _fail(err, f"ragcap: {interrupted}", 130)
            except Interrupted as err:  # Ctrl-C, with what was kept and how to go on
                _fail(err, f"ragcap: {err}", err.exit_code)
            except BaseException as err:
                if isinstance(err, (SystemExit, GeneratorExit)):
                    raise
                _fail(err, f"ragcap: error: {describe_error(err)}", getattr(err, "exit_code", 1))

        return app_.command(name, cls=_Command)(run)

    return register


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """ragcap's own warnings as `ragcap: warning: ...`; other libraries' as Python shows them."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs):
        if issubclass(category, RagcapWarning):
            typer.echo(f"ragcap: warning: {message}", err=True)
        else:
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


class _Command(typer.core.TyperCommand):
    """A command whose help names values as argparse does (`--layers LAYERS`, `--out DIR`, `SOURCE`)
    instead of Typer's `<int>`, `<path>`, `<list[str]>`; explicit metavars (`--wait SECONDS`, the
    `[decap|small]` of fixed choices) stay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None and not getattr(param, "is_flag", False):
                param.metavar = _metavar(param)

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # Typer writes the type after even a metavar
                record = (param.metavar + ("..." if param.nargs != 1 else ""), record[1])
            sections["Arguments" if param.param_type_name == "argument" else "Options"].append(record)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


def _metavar(param) -> str:
    """A path option says whether it wants a file or a directory when its help does (`--out DIR`);
    everything else is named after its long option or argument (`--qdrant-url QDRANT_URL`)."""
    annotation = param.type_descriptor.annotation
    if param.param_type_name == "option" and Path in (annotation, *get_args(annotation)):
        help_text = (param.help or "").lower()
        if re.search(r"\b(directory|folder)\b", help_text):
            return "DIR"
        return "FILE" if re.search(r"\bfile\b", help_text) else "PATH"
    long_names = [opt for opt in param.opts if opt.startswith("--")] or param.opts
    return long_names[0].lstrip("-").replace("-", "_").upper()


def _fail(err: BaseException, line: str, code: int) -> None:
    if os.environ.get("RAGCAP_DEBUG", "") not in ("", "0"):
        traceback.print_exception(err)
    notes = getattr(err, "__notes__", ())
    # One line whatever the message holds: a wrapped library error may span several.
    text = "; ".join([line, *notes])
    typer.echo(" ".join(part.strip() for part in text.splitlines() if part.strip()), err=True)
    raise typer.Exit(code) from None


def describe_error(err: BaseException) -> str:
    """One line for any error: ragcap's own say what to do; the others say what happened."""
    from ragcap.util import disk_full_error

    if isinstance(err, RagcapError):
        return str(err)
    if isinstance(err, _server_errors()):
        from ragcap.store.client import server_error

        return f"the Qdrant server failed: {server_error(err)}"
    if isinstance(err, RecursionError):
        return "the input is nested too deeply to parse (Python's recursion limit); flatten it or skip it (--skip-bad)"
    if isinstance(err, MemoryError):
        return "out of memory; use smaller batches (--batch-size) or a machine with more memory"
    if isinstance(err, pickle.UnpicklingError):
        return f"refused to load a file that is not plain tensors ({err}); ragcap never runs code from a checkpoint"
    if isinstance(err, OSError):
        full = disk_full_error(err, err.filename or ".")
        if full is not None:
            return str(full)
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    if type(err).__name__ == "PanicException" or type(err) is Exception:
        # The store engine's bindings raise plain Exception, and Rust panics as PanicException.
        return f"the store engine failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
    return f"unexpected {type(err).__name__}: {err} (a bug in ragcap: rerun with RAGCAP_DEBUG=1 and report the traceback)"


def _server_errors() -> tuple[type[Exception], ...]:
    """qdrant-client's errors for a server that answers badly (the store reports unreachable ones)."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    return (UnexpectedResponse, ResponseHandlingException)


def store(url: str | None, api_key: str | None, wait: float = DEFAULT_WAIT_S):
    """The store the flags name (a server URL, else the embedded store); use it in a `with`.
    Waiting for a collection that another process uses is announced on stderr."""
    from ragcap.store import open_store

    def announce(message: str) -> None:
        typer.echo(f"ragcap: {message}", err=True)

    return open_store(url=url, api_key=api_key, wait=None if wait < 0 else wait, on_wait=announce)


# Decoding options shared by every command that writes captions, for every decoder kind.
Beam = Annotated[Optional[int], typer.Option(help="Beam size; 1 = greedy [default: the decoder kind's: DeCap and ClipCap 1, prompt 3].")]
NumCaptions = Annotated[int, typer.Option("--num-captions", help="Captions per input: the n best beams, or n samples.")]
MaxTokens = Annotated[Optional[int], typer.Option(help="Length cap in tokens [default: the decoder's trained length; prompt 25].")]
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Sample from the smallest token set holding this probability (nucleus).")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k likeliest tokens.")]
Temperature = Annotated[Optional[float], typer.Option(help="Sample at this temperature (< 1 sharper, > 1 more varied).")]
Seed = Annotated[Optional[int], typer.Option(help="Seed for sampling: the same seed and the same batch of inputs give the same captions (batched otherwise, they draw others).")]
# The captioning options `caption`, `eval` and `serve` share.
Decoders = Annotated[Optional[list[Path]], typer.Option("--decoder", help="Trained decoder directory: pd, nnd, vd read an embedding decoder, smallcap a SmallCap model (repeat to give both).")]
CausalLM = Annotated[str, typer.Option("--lm", help="Causal LM for prompt mode: hub name or directory.")]
Tau = Annotated[float, typer.Option("--tau", help="Softmax temperature of the projection (DeCap: 0.01).")]
PromptK = Annotated[int, typer.Option("--prompt-k", help="Retrieved captions in the prompt (SmallCap: 4).")]
KeepCheckpoint = Annotated[bool, typer.Option("--keep-checkpoint", help="Keep checkpoint.pt (weights and optimiser state, only needed to resume) after a completed run.")]
MaxPixels = Annotated[Optional[int], typer.Option(
    "--max-pixels", help="Largest image in pixels; more than Pillow's decompression-bomb limit (89,478,485) admits large genuine photos [default: that limit].")]


def search_options(beam, num_captions, max_tokens, top_p, top_k, temperature, seed):
    """SearchOptions from the decoding flags; any of --top-p, --top-k or --temperature means sampling."""
    from ragcap.generation import SearchOptions

    sample = top_p is not None or top_k is not None or temperature is not None
    return SearchOptions(
        beam=beam, num_return=num_captions, max_tokens=max_tokens, sample=sample, seed=seed,
        top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, temperature=1.0 if temperature is None else temperature,
    )
