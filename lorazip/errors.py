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
    """The first line of an exception's message (its type name when the message is empty); where that
    line only introduces what follows (it ends with a colon, as torch's state-dict errors do), the
    next line too, shortened to 200 characters."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        more = lines[1] if len(lines[1]) <= 200 else lines[1][:197] + "..."
        return f"{lines[0]} {more}"
    return lines[0]
