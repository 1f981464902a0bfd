"""lorazip: jointly compress collections of LoRA adapters into shared bases and small cores.

Typical use::

    import lorazip
    coll = lorazip.load_collection("examples/fortunes/adapters")
    art = lorazip.compress(coll, rank=16)
    art.save("demo.lorazip.safetensors")
    art = lorazip.load_artifact("demo.lorazip.safetensors")
    report = lorazip.evaluate(art)
    lorazip.export(art, "out/", names=[art.names[0]])
"""

from __future__ import annotations

__version__ = "0.1.0"

from .artifact import Artifact, load_artifact  # noqa: E402
from .compress import compress  # noqa: E402
from .errors import (  # noqa: E402
    AdapterFormatError,
    ArtifactError,
    LorazipError,
    OptionError,
    OutputError,
    SourceError,
    ValidationError,
)
from .evaluate import evaluate  # noqa: E402
from .export import export, to_peft  # noqa: E402
from .verify import verify  # noqa: E402
from .io.collection import Collection, load_collection  # noqa: E402
from .serve import apply  # noqa: E402  (lorazip.serve: use_adapters, detach, ...)
from .update import add_adapters, remove_adapters  # noqa: E402
from .analyze import analyze  # noqa: E402

__all__ = [
    "__version__", "Artifact", "Collection", "load_artifact", "load_collection", "compress", "evaluate",
    "export", "to_peft", "apply", "verify", "add_adapters", "remove_adapters", "analyze", "LorazipError", "AdapterFormatError", "ArtifactError", "OptionError", "OutputError",
    "SourceError", "ValidationError",
]
