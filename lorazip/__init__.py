"""lorazip: jointly compress collections of LoRA adapters into shared bases and small cores.

Typical use::

    import lorazip
    coll = lorazip.load_collection("examples/fortunes/adapters")
    art = lorazip.compress(coll, rank=16)
    art.save("demo.lorazip.safetensors")
    art = lorazip.load_artifact("demo.lorazip.safetensors")
    report = lorazip.evaluate(art)
    lorazip.export(art, "out/", names=[art.names[0]])

``import lorazip`` is cheap: ``__version__`` and the error classes are defined here, every
other name (and every submodule, ``lorazip.serve``, ``lorazip.io``, ...) is imported on first
use (PEP 562), so a command that never touches torch never loads it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AdapterFormatError,
    ArtifactError,
    ClusterError,
    LorazipError,
    OptionError,
    OutputError,
    SourceError,
    ValidationError,
)

# Public name -> the submodule that defines it (imported on first access).
_LAZY = {
    "Artifact": "artifact",
    "load_artifact": "artifact",
    "compress": "compress",
    "CompressOptions": "compress.options",  # every setting of a run, checked once
    "evaluate": "evaluate",
    "export": "export",
    "to_peft": "export",
    "verify": "verify",
    "Collection": "io.collection",
    "load_collection": "io.collection",
    "apply": "serve",  # lorazip.serve: use_adapters, detach, ...
    "add_adapters": "update",
    "remove_adapters": "update",
    "analyze": "analyze",
    "calibrate": "calibrate",  # lorazip.calibrate: input statistics for compress(..., calibration=)
    "load_calibration": "calibrate",
    "RayExecutor": "compress.executor",
}

__all__ = [
    "__version__", "Artifact", "Collection", "load_artifact", "load_collection", "compress", "CompressOptions",
    "evaluate",
    "export", "to_peft", "apply", "verify", "add_adapters", "remove_adapters", "analyze", "LorazipError", "AdapterFormatError", "ArtifactError", "OptionError", "OutputError",
    "SourceError", "ValidationError", "ClusterError", "RayExecutor", "calibrate", "load_calibration",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: lorazip.serve, lorazip.io, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``lorazip.compress`` (and evaluate, export, verify, analyze, calibrate) the function.

    Importing a submodule binds it on its package under its own name. Six functions share
    their module's name; the eager ``__init__`` rebound them right after, and this does the
    same whenever such a submodule is first imported (``from lorazip.verify import ...``).
    """

    def __setattr__(self, name: str, value) -> None:
        if (
            isinstance(value, types.ModuleType)
            and _LAZY.get(name) == name
            and value.__name__ == f"{__name__}.{name}"
        ):
            value = getattr(value, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
