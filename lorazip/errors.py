"""The exception hierarchy of lorazip.

Every error a user can cause (bad input files, bad options, bad artifacts) is a
``LorazipError``; the CLI prints its message on one line and exits non-zero.
Anything else that escapes is a bug and keeps its traceback. :func:`first_line` is how a
message quotes a third-party exception it replaces.
"""

from __future__ import annotations


class LorazipError(Exception):
    """Base class of every error lorazip raises on purpose."""


class SourceError(LorazipError):
    """A source (folder, file list, Hub repo) cannot be resolved to adapters."""


class AdapterFormatError(LorazipError):
    """An adapter folder or its files are not a valid plain-LoRA PEFT adapter."""


class ValidationError(LorazipError):
    """Adapters are individually valid but do not form one collection (base model, shapes)."""


class ArtifactError(LorazipError):
    """A lorazip artifact is missing, truncated, corrupt, or of an unsupported version."""


class OptionError(LorazipError):
    """An option has a value that cannot be honoured (rank <= 0, K > n, ...)."""


class OutputError(LorazipError):
    """The output cannot be written (exists without overwrite, unwritable, disk full)."""


class ClusterError(LorazipError):
    """A Ray cluster cannot be started or joined, or cannot run a task (its worker died too often)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
