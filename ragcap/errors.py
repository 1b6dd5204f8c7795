"""Errors a user can act on.

Every error raised for bad input, a bad model or a bad collection is a RagcapError whose
message says what is wrong, where (file:line when there is one) and what to do. The CLI
prints the message alone (no traceback) and exits non-zero.
"""


class RagcapError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""

    exit_code = 1


class SourceError(RagcapError):
    """A corpus file is missing, unreadable or malformed (message carries file:line)."""


class ModelError(RagcapError):
    """A model spec cannot be resolved or loaded, or does not fit the command."""


class StoreError(RagcapError):
    """The vector store is unreachable, or a collection is missing or incompatible."""


class CollectionBusy(StoreError):
    """Another process is using a collection of the embedded store, for longer than --wait."""


class DamagedCollection(StoreError):
    """A collection's files are damaged or incomplete; `ragcap check NAME` says what is wrong."""


class EmbedderMismatch(StoreError):
    """A collection was filled by one embedder and is being used with another."""


class ImageError(RagcapError):
    """An image file is missing, corrupt, not an image, or too large to decode safely."""


class DiskFullError(RagcapError):
    """Not enough free space for a write; it was stopped before anything was half-written."""


class Interrupted(RagcapError):
    """Ctrl-C, with what was kept and how to continue."""

    exit_code = 130


class ConfigError(RagcapError):
    """The config file is malformed or holds an unknown key (message carries file:line)."""


class OptionError(RagcapError, ValueError):
    """An option or argument is out of range or contradicts another one."""


class RagcapWarning(UserWarning):
    """Something to know that does not stop the work; the CLI prints it as one line."""


def brief(err: BaseException, limit: int = 300) -> str:
    """Another library's error message on one line, cut to `limit` characters: torch's
    load_state_dict, for one, lists every mismatched key over many lines."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
