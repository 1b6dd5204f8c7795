"""Errors a user can act on.

Every error raised for bad input, a bad model or a bad collection is a RagcapError whose
message says what is wrong, where (file:line when there is one) and what to do. The CLI
prints the message alone (no traceback) and exits non-zero.
"""


class RagcapError(Exception):
    """An error caused by the user's input or environment, with an actionable message."""


class SourceError(RagcapError):
    """A corpus file is missing, unreadable or malformed (message carries file:line)."""


class ModelError(RagcapError):
    """A model spec cannot be resolved or loaded, or does not fit the command."""


class StoreError(RagcapError):
    """The vector store is unreachable, or a collection is missing or incompatible."""


class EmbedderMismatch(StoreError):
    """A collection was filled by one embedder and is being used with another."""


class ImageError(RagcapError):
    """An image file is missing, corrupt, not an image, or too large to decode safely."""


class OptionError(RagcapError, ValueError):
    """An option or argument is out of range or contradicts another one."""
