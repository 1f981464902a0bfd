"""Reliability and security (issue 10): a catalogue of bad inputs, fuzzing, interrupted runs,
determinism and integrity checks.

Every bad input must end in a :class:`~lorazip.errors.LorazipError` subclass with a one-line
message (the CLI prints one ``error:`` line and exits 1), within a time bound and without a
large allocation; never another exception. ``python tests/test_reliability.py`` runs the
catalogue alone and prints the table of docs/reliability.md (case, error type, message).

The existing cases of tests/test_bad_input.py are not repeated here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import read_doc, write_adapter, write_doc, write_collection, write_raw_safetensors  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import lorazip  # noqa: E402
from lorazip.artifact import tensor_checksum  # noqa: E402
from lorazip.errors import (  # noqa: E402
    AdapterFormatError,
    ArtifactError,
    LorazipError,
    OutputError,
    SourceError,
)

MOD = {"model.layers.0.q_proj": (6, 5), "model.layers.0.v_proj": (6, 5)}
KEY_A = "base_model.model.model.layers.0.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.q_proj.lora_B.weight"
KEY_VA = "base_model.model.model.layers.0.v_proj.lora_A.weight"
KEY_VB = "base_model.model.model.layers.0.v_proj.lora_B.weight"
FIXTURES = TESTS_DIR.parents[1] / "shared" / "fixtures" / "real-adapters"
SMALL_FIXTURE = "gpt2/ShutterStack__Lightweight-Fine-Tuning-to-a-Foundation-Model"  # 600 KB, r 4, 12 modules
CASE_SECONDS = 30  # time bound of one catalogue case (they take well under a second)
FUZZ_SECONDS = 10  # time bound of one fuzz example
MAX_RSS_GROWTH = 1 << 30  # no case may grow the peak memory of the process by 1 GiB


# ----------------------------------------------------------------------------------------------
# Time and memory bounds
# ----------------------------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm; a BaseException so no ``except Exception`` in the library swallows it."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (raise Hang) when the body runs longer than ``seconds`` (SIGALRM; main thread only)."""

    def on_alarm(_sig, _frame):
        raise Hang(f"took longer than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# File editing helpers
# ----------------------------------------------------------------------------------------------


def edit_tensors(folder: Path, fn) -> None:
    path = folder / "adapter_model.safetensors"
    st = load_file(str(path))
    fn(st)
    save_file(st, str(path))


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def rewrite_header(path: Path, fn) -> Path:
    header, body = split_safetensors(path.read_bytes())
    fn(header)
    path.write_bytes(join_safetensors(header, body))
    return path


def read_artifact_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def resave_artifact(src: Path, dst: Path, meta_edit=None, tensor_edit=None, fix_checksum=True) -> Path:
    """Copy an artifact with its ``lorazip`` metadata document and/or tensors edited.

    With ``fix_checksum`` the recorded checksum is recomputed (a hostile but self-consistent file).
    """
    header, tensors = read_artifact_file(src)
    doc = read_doc(header)
    if tensor_edit:
        tensor_edit(tensors)
        if fix_checksum:
            doc["checksum"] = tensor_checksum(tensors)
    if meta_edit:
        doc = meta_edit(doc) or doc
    write_doc(header, doc)
    save_file(tensors, str(dst), metadata=header)
    return dst


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with file contents (None for folders and links)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


# ----------------------------------------------------------------------------------------------
# The pipeline every case runs through
# ----------------------------------------------------------------------------------------------


def _check_finite_report(rep: dict[str, Any]) -> None:
    for key in ("mean", "median", "min", "max"):
        assert math.isfinite(rep["errors"][key]), rep["errors"]
    for a in rep["adapters"]:
        assert math.isfinite(a["error"]) and math.isfinite(a["svd_same_rank_error"]), a


def _check_finite_exports(folders: list[Path]) -> None:
    for folder in folders:
        for key, t in st_load((folder / "adapter_model.safetensors").read_bytes()).items():
            assert not t.is_floating_point() or torch.isfinite(t.float()).all(), (folder, key)


def adapter_pipeline(src, work: Path, *, rank: int = 1, max_iters: int = 5) -> dict[str, Any]:
    """load -> compress -> save -> load_artifact -> evaluate (recorded and recomputed) -> export -> verify."""
    coll = lorazip.load_collection(src)
    art = lorazip.compress(coll, rank, device="cpu", max_iters=max_iters)
    path = art.save(work / "pipe.lorazip.safetensors", overwrite=True)
    loaded = lorazip.load_artifact(path, verify=True)
    rep = lorazip.evaluate(loaded)
    rec = lorazip.evaluate(loaded, src)
    _check_finite_report(rep)
    _check_finite_report(rec)
    folders = lorazip.export(loaded, work / "pipe-export", overwrite=True)
    _check_finite_exports(folders)
    ver = lorazip.verify(path, src)
    assert ver["ok"], ver["problems"]
    return {"report": rep, "recomputed": rec, "exported": folders, "artifact": loaded}


def artifact_pipeline(path: Path, work: Path, *, verify: bool | None = None) -> dict[str, Any]:
    """load_artifact -> evaluate -> info -> export (all adapters) -> verify (unless ``verify`` is False:
    then tensor changes reach evaluate and export, which must reject NaN/Inf and overflow)."""
    art = lorazip.load_artifact(path, verify=verify)
    rep = lorazip.evaluate(art)
    _check_finite_report(rep)
    from lorazip.cli.report import describe

    describe(art)
    folders = lorazip.export(art, work / "art-export", overwrite=True)
    _check_finite_exports(folders)
    if verify is not False:
        ver = lorazip.verify(path)
        if ver["problems"]:
            raise ArtifactError(ver["problems"][0])
    return {"report": rep, "exported": folders}


# ----------------------------------------------------------------------------------------------
# The catalogue
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    what: str  # one line for docs/reliability.md
    kind: str  # "adapter": build returns a source; "artifact": an artifact file; "call": a callable
    build: Callable[[Path], Any]
    error: type | None  # expected LorazipError subclass; None: the whole pipeline must succeed
    parts: tuple[str, ...] = ()  # substrings of the message
    check: Callable[[Any, Path], None] | None = None  # extra checks on success / after the error


CASES: list[Case] = []


def case(id: str, what: str, kind: str, error: type | None, *parts: str, check=None):
    def register(build):
        CASES.append(Case(id, what, kind, build, error, parts, check))
        return build

    return register


def one_adapter(tmp: Path, **kw) -> Path:
    folder = tmp / "src" / "a"
    write_adapter(folder, MOD, seed=0, **kw)
    return folder


def raw_adapter(tmp: Path, header: dict, data: bytes) -> Path:
    folder = one_adapter(tmp)
    write_raw_safetensors(folder / "adapter_model.safetensors", header, data)
    return folder


def entry(shape, start, end, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def two_modules_raw(**over) -> dict:
    """Header of a valid 2-module adapter (q: A 4x5, B 6x4; v: A 4x5, B 6x4), F32, 352 data bytes."""
    h = {KEY_A: entry([4, 5], 0, 80), KEY_B: entry([6, 4], 80, 176),
         KEY_VA: entry([4, 5], 176, 256), KEY_VB: entry([6, 4], 256, 352)}
    h.update(over)
    return h


# --- safetensors weights ------------------------------------------------------------------------

case("st-empty", "adapter_model.safetensors is an empty file", "adapter", AdapterFormatError,
     "adapter_model.safetensors", "truncated safetensors file (no header)")(
    lambda tmp: _write(one_adapter(tmp), b""))


def _write(folder: Path, data: bytes, name: str = "adapter_model.safetensors") -> Path:
    (folder / name).write_bytes(data)
    return folder


case("st-unknown-dtype-huge-shape", "a tensor claims shape 10^6 x 10^6 with an unknown dtype (no size check possible)",
     "adapter", AdapterFormatError, KEY_B, "unsupported dtype 'X9'")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_B: entry([10**6, 10**6], 80, 176, "X9")}), b"\0" * 352))

case("st-zero-size-huge-dim", "lora_B claims shape (10^12, 0): zero bytes, absurd dimension", "adapter",
     AdapterFormatError, "rank 0")(
    lambda tmp: raw_adapter(tmp, {KEY_A: entry([0, 5], 0, 0), KEY_B: entry([10**12, 0], 0, 0),
                                  KEY_VA: entry([4, 5], 0, 80), KEY_VB: entry([6, 4], 80, 176)}, b"\0" * 176))

case("st-gap", "tensor offsets leave a gap in the data section", "adapter", AdapterFormatError, "gap in the data")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_B: entry([6, 4], 84, 180), KEY_VA: entry([4, 5], 180, 260),
                                                    KEY_VB: entry([6, 4], 260, 356)}), b"\0" * 356))

case("st-float-offsets", "data_offsets are floats", "adapter", AdapterFormatError, "corrupt safetensors entry")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_A: entry([4, 5], 0.0, 80.0)}), b"\0" * 352))

case("st-end-before-start", "data_offsets end before they start", "adapter", AdapterFormatError,
     "corrupt safetensors entry")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_A: entry([4, 5], 80, 0)}), b"\0" * 352))

case("st-entry-not-object", "a header entry is a string, not an object", "adapter", AdapterFormatError,
     "corrupt safetensors entry")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_A: "x"}), b"\0" * 352))

case("st-float-shape", "a shape holds a float", "adapter", AdapterFormatError, "corrupt safetensors entry")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_A: entry([4.0, 5], 0, 80)}), b"\0" * 352))


def _duplicate_key(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    h = two_modules_raw()
    text = json.dumps(h)
    text = text[:-1] + ", " + json.dumps(KEY_A) + ": " + json.dumps(entry([4, 5], 0, 80)) + "}"
    raw = text.encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 352)
    return folder


case("st-duplicate-key", "the header JSON names one tensor twice", "adapter", AdapterFormatError,
     "not JSON", "duplicate key")(_duplicate_key)


def _deep_header(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    raw = b"[" * 200_000 + b"]" * 200_000
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return folder


case("st-deep-json", "the header JSON is nested 200,000 deep", "adapter", AdapterFormatError,
     "corrupt safetensors header", "nested too deeply")(_deep_header)


def _invalid_utf8_header(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    raw = b'{"\xff\xfe": 1}'
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return folder


case("st-header-not-utf8", "the header is not UTF-8", "adapter", AdapterFormatError, "not UTF-8")(
    _invalid_utf8_header)

case("st-metadata-not-strings", "__metadata__ maps to a list", "adapter", AdapterFormatError,
     "__metadata__ must map strings to strings")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(__metadata__={"format": ["pt"]}), b"\0" * 352))

case("st-int-factors", "LoRA factors stored as int32", "adapter", AdapterFormatError, KEY_A, "dtype I32")(
    lambda tmp: raw_adapter(tmp, two_modules_raw(**{KEY_A: entry([4, 5], 0, 80, "I32")}), b"\0" * 352))


def _mixed_dtypes(tmp: Path) -> Path:
    folder = one_adapter(tmp)

    def mix(st):
        st[KEY_A] = st[KEY_A].half()
        st[KEY_B] = st[KEY_B].bfloat16()
        st[KEY_VA] = st[KEY_VA].double()

    edit_tensors(folder, mix)
    write_adapter(tmp / "src" / "b", MOD, seed=1)
    return tmp / "src"


def _recorded_equals_recomputed(out, _tmp):
    for a, b in zip(out["report"]["adapters"], out["recomputed"]["adapters"]):
        assert a["error"] == pytest.approx(b["error"], rel=3e-5, abs=1e-12)  # float32 products where error >= 0.5


case("st-mixed-dtypes", "F16, BF16, F32 and F64 factors in one file (works)", "adapter", None,
     check=_recorded_equals_recomputed)(_mixed_dtypes)


def _huge_values(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    edit_tensors(folder, lambda st: st.__setitem__(KEY_B, torch.full((6, 4), 1e200, dtype=torch.float64)))
    return folder


case("st-huge-finite", "finite but absurd values (1e200, float64): squares overflow", "adapter", AdapterFormatError,
     "values too large")(_huge_values)

case("st-huge-alpha", "lora_alpha 1e308: the scale overflows the factors", "adapter", AdapterFormatError,
     "values too large")(lambda tmp: one_adapter(tmp, config_overrides={"lora_alpha": 1e308}))


def _nan_extra(tmp: Path) -> Path:
    return one_adapter(tmp, extra_tensors={"base_model.model.score.weight": torch.tensor([[1.0, float("nan")]])})


case("st-nan-head", "NaN in a modules_to_save head (non-LoRA tensor)", "adapter", AdapterFormatError,
     "score.weight", "NaN or Inf")(_nan_extra)


def _f8_head(tmp: Path) -> Path:
    return one_adapter(tmp, extra_tensors={"base_model.model.score.weight": torch.ones(2, 3).to(torch.float8_e4m3fn)})


case("st-float8-head", "a modules_to_save head stored as float8 (works; kept as-is)", "adapter", None)(_f8_head)


def _zero(folder: Path) -> None:
    edit_tensors(folder, lambda st: st.update({k: torch.zeros_like(v) for k, v in st.items()}))


def _all_zero(tmp: Path) -> Path:
    write_collection(tmp / "src", n=3, modules=MOD, seed=0)
    for i in range(3):
        _zero(tmp / "src" / f"a{i}")
    return tmp / "src"


def _errors_zero(out, _tmp):
    for rep in (out["report"], out["recomputed"]):
        assert rep["errors"] == {"mean": 0.0, "median": 0.0, "min": 0.0, "max": 0.0}
    for folder in out["exported"]:  # lora_B = U S = 0: every exported delta is exactly zero
        st = st_load((folder / "adapter_model.safetensors").read_bytes())
        assert all(not t.any() for k, t in st.items() if ".lora_B." in k)


case("zero-all", "every adapter is all zeros (relative weighting: no division by zero; error 0)", "adapter", None,
     check=_errors_zero)(_all_zero)


def _one_zero(tmp: Path) -> Path:
    write_collection(tmp / "src", n=3, modules=MOD, seed=0)
    _zero(tmp / "src" / "a1")
    return tmp / "src"


def _zero_adapter_exact(out, _tmp):
    a1 = [a for a in out["report"]["adapters"] if a["name"] == "a1"][0]
    assert a1["error"] == 0.0


case("zero-one", "one adapter of three is all zeros (works; its error is 0)", "adapter", None,
     check=_zero_adapter_exact)(_one_zero)

# --- adapter_config.json ------------------------------------------------------------------------

_BAD_FIELDS = [
    ("use_rslora", "yes", "'use_rslora' must be true or false"),
    ("use_dora", "false", "'use_dora' must be true or false"),
    ("lora_bias", 1, "'lora_bias' must be true or false"),
    ("fan_in_fan_out", "true", "'fan_in_fan_out' must be true or false"),
    ("base_model_name_or_path", 5, "'base_model_name_or_path' must be a string"),
    ("revision", ["main"], "'revision' must be a string"),
    ("task_type", {"x": 1}, "'task_type' must be a string"),
    ("target_modules", 5, "'target_modules' must be a string or a list of strings"),
    ("target_modules", ["q_proj", 1], "'target_modules' must be a string or a list of strings"),
    ("modules_to_save", "score", "'modules_to_save' must be a list of strings"),
    ("rank_pattern", {"(": 2}, "is not a valid regular expression"),
    ("alpha_pattern", {"q_proj": 1e400}, "'alpha_pattern' must map module patterns to positive numbers"),
    ("lora_alpha", [8], "'lora_alpha' must be a positive number"),
    ("lora_alpha", None, "'lora_alpha' must be a positive number"),
    ("lora_alpha", 1e400, "'lora_alpha' must be a positive number"),
    ("r", 1e400, "'r' must be a positive integer"),
    ("r", "x" * 100_000, "'r' must be a positive integer"),
    ("peft_type", None, "peft_type None is not supported"),
    ("peft_type", "FOO", "peft_type 'FOO' is not supported"),
    ("target_modules", "(", "is not a valid regular expression"),
]

for _field, _value, _part in _BAD_FIELDS:
    case(f"cfg-{_field}-{type(_value).__name__}", f"adapter_config.json: {_field} = {str(_value)[:30]!s}",
         "adapter", AdapterFormatError, "adapter_config.json", _part)(
        lambda tmp, f=_field, v=_value: one_adapter(tmp, config_overrides={f: v}))

case("cfg-targets-match-nothing", "target_modules name modules the file has no tensors for", "adapter",
     AdapterFormatError, "target_modules ['k_proj'] match none of the modules")(
    lambda tmp: one_adapter(tmp, config_overrides={"target_modules": ["k_proj"]}))

case("cfg-targets-leave-some-out", "layers_to_transform leaves out a layer the file has LoRA tensors for", "adapter",
     AdapterFormatError, "its config does not target")(
    lambda tmp: _two_layers(tmp, config_overrides={"layers_to_transform": [0]}))

case("cfg-layers-to-transform-str", "adapter_config.json: layers_to_transform = \"0\"", "adapter", AdapterFormatError,
     "'layers_to_transform' must be an integer or a list of integers")(
    lambda tmp: one_adapter(tmp, config_overrides={"layers_to_transform": "0"}))


def _two_layers(tmp: Path, **kw) -> Path:
    folder = tmp / "src" / "a"
    write_adapter(folder, {"model.layers.0.q_proj": MOD["model.layers.0.q_proj"],
                           "model.layers.1.q_proj": MOD["model.layers.0.q_proj"]}, seed=0, **kw)
    return folder


case("cfg-target-regex-matches-nothing", "target_modules regex that matches no adapted module", "adapter",
     AdapterFormatError, "match none of the modules")(
    lambda tmp: one_adapter(tmp, config_overrides={"target_modules": r".*\.k_proj"}))

for _text, _label in [("null", "null"), ('"LORA"', "string"), ("42", "number")]:
    case(f"cfg-json-{_label}", f"adapter_config.json is a JSON {_label}", "adapter", AdapterFormatError,
         "expected a JSON object")(lambda tmp, t=_text: _write(one_adapter(tmp), t.encode(), "adapter_config.json"))


def _big_config(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["padding"] = "x" * (50 * 2**20)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


case("cfg-50MB", "adapter_config.json of 50 MB", "adapter", AdapterFormatError, "larger than 16 MiB")(_big_config)

case("cfg-deep-json", "adapter_config.json nested 100,000 deep", "adapter", AdapterFormatError, "nested too deeply")(
    lambda tmp: _write(one_adapter(tmp), b"[" * 100_000 + b"]" * 100_000, "adapter_config.json"))


def _bom(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    path = folder / "adapter_config.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    return folder


case("cfg-utf8-bom", "adapter_config.json starts with a UTF-8 byte-order mark (works)", "adapter", None)(_bom)


def _config_is_dir(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    return tmp / "src"


case("cfg-is-folder", "adapter_config.json is a folder", "adapter", SourceError, "no adapter folders")(_config_is_dir)

# --- sources --------------------------------------------------------------------------------------


def _loop_dirs(tmp: Path) -> Path:
    one_adapter(tmp)
    os.symlink(tmp / "src", tmp / "src" / "loop")
    os.symlink(tmp / "src" / "loop2", tmp / "src" / "loop1")
    os.symlink(tmp / "src" / "loop1", tmp / "src" / "loop2")
    return tmp / "src"


def _one_adapter_compressed(out, _tmp):
    assert out["artifact"].names == ["a"]


case("src-symlink-loops", "source folder holds a symlink to itself and a 2-link loop (works, one adapter)",
     "adapter", None, check=_one_adapter_compressed)(_loop_dirs)


def _loop_weights(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(folder / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    return folder


case("src-weights-symlink-loop", "adapter_model.safetensors is a symlink to itself", "adapter", AdapterFormatError,
     "no adapter_model.safetensors")(_loop_weights)


def _special_weights(kind: str):
    def build(tmp: Path) -> Path:
        folder = one_adapter(tmp)
        weights = folder / "adapter_model.safetensors"
        weights.unlink()
        if kind == "fifo":
            os.mkfifo(weights)  # reading it would block forever
        else:
            os.symlink("/dev/zero", weights)  # reading it would never end
        return folder

    return build


case("src-weights-fifo", "adapter_model.safetensors is a named pipe (no hang)", "adapter", AdapterFormatError,
     "no adapter_model.safetensors")(_special_weights("fifo"))
case("src-weights-dev-zero", "adapter_model.safetensors is a symlink to /dev/zero (no hang)", "adapter",
     AdapterFormatError, "no adapter_model.safetensors")(_special_weights("zero"))


def _config_fifo(tmp: Path) -> Path:
    folder = one_adapter(tmp)
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    return tmp / "src"


case("cfg-fifo", "adapter_config.json is a named pipe (no hang)", "adapter", SourceError, "no adapter folders")(
    _config_fifo)


def _non_utf8(tmp: Path) -> Path:
    root = Path(os.fsdecode(bytes(tmp) + b"/src\xff"))
    write_adapter(Path(os.fsdecode(bytes(root) + b"/caf\xe9")), MOD, seed=0)
    write_adapter(Path(os.fsdecode(bytes(root) + b"/b\xfe\xff")), MOD, seed=1)
    return root


def _non_utf8_names(out, tmp):
    assert sorted(os.fsencode(n) for n in out["artifact"].names) == [b"b\xfe\xff", b"caf\xe9"]
    assert sorted(os.fsencode(f.name) for f in out["exported"]) == [b"b\xfe\xff", b"caf\xe9"]


case("src-non-utf8-names", "source and adapter folder names that are not UTF-8 (works; names kept byte-exact)",
     "adapter", None, check=_non_utf8_names)(_non_utf8)


def _duplicate_names(tmp: Path) -> list[Path]:
    write_adapter(tmp / "x" / "p" / "a", MOD, seed=0)
    write_adapter(tmp / "y" / "p" / "a", MOD, seed=1)
    return [tmp / "x" / "p" / "a", tmp / "y" / "p"]


case("src-duplicate-names", "two sources give the same adapter name (x/p/a and y/p/a)", "adapter", SourceError,
     "adapter name 'p--a' is used twice")(_duplicate_names)

# --- artifacts --------------------------------------------------------------------------------------


def base_artifact(tmp: Path, n: int = 2, **kw) -> Path:
    write_collection(tmp / "asrc", n=n, modules=MOD, seed=0)
    return lorazip.compress(lorazip.load_collection(tmp / "asrc"), 2, device="cpu", max_iters=5, **kw).save(
        tmp / "base.lorazip.safetensors")


def meta_case(id: str, what: str, edit, *parts: str, error=ArtifactError):
    def build(tmp: Path) -> Path:
        def apply(doc):
            out = edit(doc)
            return doc if out is None else out

        return resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors", meta_edit=apply)

    case(id, what, "artifact", error, *parts)(build)


def _m(path: str, value):
    """Edit the lorazip document at a dotted path (``modules.0.d_out``); ``...`` deletes."""

    def edit(doc):
        keys = path.split(".")
        obj = doc
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = int(keys[-1]) if isinstance(obj, list) else keys[-1]
        if value is ...:
            del obj[last]
        else:
            obj[last] = value

    return edit


for _path, _value, _part in [
    ("method", 3, "'method' must be a string"),
    ("rank", "2", "'rank' must be a positive integer"),
    ("rank", 0, "'rank' must be a positive integer"),
    ("modules", {}, "'modules' must be a list of objects"),
    ("modules.0", 1, "'modules' must be a list of objects"),
    ("modules.0.name", 5, "modules[0].name must be a unique non-empty string"),
    ("modules.0.d_out", "6", "modules[0].d_out must be a positive integer"),
    ("modules.0.d_out", 7, "missing or not of shape"),
    ("modules.0.n_clusters", 0, "modules[0].n_clusters must be a positive integer"),
    ("modules.0.layout", "conv", "modules[0].layout must be 'linear' or 'embedding'"),
    ("adapters", [], "no adapters"),
    ("adapters", "x", "'adapters' must be a list of objects"),
    ("adapters.0.name", 5, "adapters[0].name must be a non-empty string"),
    ("adapters.0.ranks", ..., "adapters[0].ranks must map module names to ranks"),
    ("adapters.0.ranks", ["x"], "adapters[0].ranks must map module names to ranks"),
    ("adapters.1.ranks.model.layers.0.q_proj", "4", None),  # dotted module name: handled below
    ("adapters.0.source", ..., "adapters[0].source must hold 'path' and 'files'"),
    ("adapters.0.source.files", [], "adapters[0].source must hold 'path' and 'files'"),
    ("adapters.0.source.files.adapter_config.json", {"bytes": "1"}, None),  # dotted file name: below
    ("adapters.0.config", [], "adapters[0].config must be an object"),
    ("adapters.0.extras", "score", "adapters[0].extras must be a list of strings"),
    ("clustering", "x", "'clustering' must be an object"),
    ("clustering", {"n_clusters": 2}, "'clustering' needs 'per_module', 'rounds' and 'converged'"),
    ("checksum", 5, "'checksum' must be a string"),
    ("solver", [], "'solver' must be an object"),
    ("base_model", 5, "'base_model' must be a string"),
]:
    if _part is None:
        continue
    meta_case(f"meta-{_path}-{type(_value).__name__ if _value is not ... else 'missing'}",
              f"artifact metadata: {_path} = {'(missing)' if _value is ... else json.dumps(_value)}",
              _m(_path, _value), _part)


def _set_rank_str(doc):
    doc["adapters"][1]["ranks"]["model.layers.0.q_proj"] = "4"


def _set_file_bytes(doc):
    doc["adapters"][0]["source"]["files"]["adapter_config.json"] = {"bytes": "1", "sha256": None}


meta_case("meta-rank-value-str", "artifact metadata: an adapter's module rank is a string", _set_rank_str,
          "adapters[1].ranks must map module names to ranks")
meta_case("meta-file-bytes-str", "artifact metadata: a source file's size is a string", _set_file_bytes,
          "adapters[0].source.files['adapter_config.json'] must hold 'bytes' and 'sha256'")
meta_case("meta-source-file-path", "artifact metadata: a source file named '../../etc/passwd' (verify must not read it)",
          lambda doc: doc["adapters"][0]["source"]["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": None}}),
          "adapters[0].source.files names '../../etc/passwd', not a plain file name")
meta_case("meta-not-object", "artifact metadata document is a JSON list", lambda doc: json.dumps([doc]),
          "corrupt lorazip metadata (not a JSON object)")
meta_case("meta-deep", "artifact metadata document nested 100,000 deep", lambda doc: "[" * 100_000 + "]" * 100_000,
          "corrupt lorazip metadata (nested too deeply)")
meta_case("meta-duplicate-names", "two adapters of the artifact have the same name",
          lambda doc: doc["adapters"][1].update(name=doc["adapters"][0]["name"]), "adapter name 'a0' is used twice")


def _header_meta_edit(fn):
    def build(tmp: Path) -> Path:
        path = base_artifact(tmp)
        return rewrite_header(path, lambda h: fn(h["__metadata__"]))

    return build


for _version in ("0", "1.0", "-1", "\uff12", ""):
    case(f"art-version-{_version.encode('unicode_escape').decode() or 'empty'}", f"format_version {_version!r}",
         "artifact", ArtifactError, "invalid format_version")(
        _header_meta_edit(lambda m, v=_version: m.__setitem__("format_version", v)))

case("art-version-int", "format_version is a JSON number, not a string", "artifact", ArtifactError,
     "__metadata__ must map strings to strings")(_header_meta_edit(lambda m: m.__setitem__("format_version", 1)))
case("art-version-newer", "format_version 99 (a newer writer)", "artifact", ArtifactError, "newer", "upgrade lorazip")(
    _header_meta_edit(lambda m: m.__setitem__("format_version", "99")))
case("art-no-document", "the 'lorazip' metadata document is missing", "artifact", ArtifactError,
     "no 'lorazip_z' document")(_header_meta_edit(lambda m: m.pop("lorazip_z")))


def _claim_huge(tmp: Path) -> Path:
    path = base_artifact(tmp)
    return rewrite_header(path, lambda h: h["U/model.layers.0.q_proj"].__setitem__("shape", [1, 10**9, 10**9]))


case("art-huge-shape", "artifact header claims U of shape (1, 10^9, 10^9)", "artifact", ArtifactError,
     "does not match its byte size")(_claim_huge)


def _wrong_dtype(tmp: Path) -> Path:
    path = base_artifact(tmp)
    return rewrite_header(path, lambda h: h["U/model.layers.0.q_proj"].__setitem__("dtype", "I32"))


case("art-bases-int", "bases stored as int32 (same byte size)", "artifact", ArtifactError, "has dtype I32")(_wrong_dtype)

case("art-missing-spectra", "the packed spectra tensor is missing", "artifact", ArtifactError,
     "tensor 'spectra' missing")(
    lambda tmp: resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors",
                                tensor_edit=lambda t: t.pop("spectra")))
case("art-short-spectra", "the packed spectra tensor is one value short", "artifact", ArtifactError,
     "tensor 'spectra' missing or not of shape")(
    lambda tmp: resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors",
                                tensor_edit=lambda t: t.update(spectra=t["spectra"][:-1].clone())))

case("art-assign-out-of-range", "cluster index 5 for a module with one basis", "artifact", ArtifactError,
     "cluster indices outside 0..0")(
    lambda tmp: resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors",
                                tensor_edit=lambda t: t.__setitem__("assign/model.layers.0.q_proj",
                                                                    torch.tensor([0, 5], dtype=torch.int32))))


def _flip_data(tmp: Path) -> Path:
    path = base_artifact(tmp)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    return path


case("art-tensor-edited", "one bit of tensor data flipped after writing (checksum)", "artifact", ArtifactError,
     "checksum mismatch")(_flip_data)


def _nan(t: dict[str, torch.Tensor], key: str) -> None:
    t[key] = t[key].clone()
    t[key].view(-1)[0] = float("nan")


case("art-nan-cores", "NaN in a core, checksum recomputed (hostile but consistent file)", "artifact", ArtifactError,
     "cores/model.layers.0.q_proj", "NaN or Inf")(
    lambda tmp: resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors",
                                tensor_edit=lambda t: _nan(t, "cores/model.layers.0.q_proj")))

case("art-inf-stats", "Inf in the recorded errors, checksum recomputed", "artifact", ArtifactError,
     "stats/sq_error", "NaN or Inf")(
    lambda tmp: resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors",
                                tensor_edit=lambda t: t["stats"][0].fill_(float("inf"))))  # packed (v3): row 0


def _overflow_export(tmp: Path) -> Path:
    def big(t):
        t["cores/model.layers.0.q_proj"] = t["cores/model.layers.0.q_proj"] * 0 + 3e38
        t["U/model.layers.0.q_proj"] = t["U/model.layers.0.q_proj"] * 0 + 3e38

    return resave_artifact(base_artifact(tmp), tmp / "bad.lorazip.safetensors", tensor_edit=big)


case("art-export-overflow", "finite bases and cores whose product overflows float32 on export", "artifact",
     ArtifactError, "overflow")(_overflow_export)

case("art-is-folder", "the artifact path is a folder", "artifact", ArtifactError, "not a file")(
    lambda tmp: (tmp / "dir.lorazip.safetensors").mkdir() or tmp / "dir.lorazip.safetensors")

# --- export names and output paths --------------------------------------------------------------


def _evil(name: str):
    def build(tmp: Path):
        path = resave_artifact(base_artifact(tmp), tmp / "evil.lorazip.safetensors",
                               meta_edit=lambda doc: doc["adapters"][0].update(name=name))
        art = lorazip.load_artifact(path)
        out = tmp / "deep" / "out"
        before = tree(tmp)

        def run():
            try:
                lorazip.export(art, out)
            finally:
                assert tree(tmp) == before, "export wrote something"  # nothing, inside or outside OUTDIR

        return run

    return build


for _name in ("../evil", "../../evil", "a/../../evil", "/tmp/evil", "..", ".", "..hidden", "a\\b", "tab\there",
              "nul\x00"):
    case(f"export-name-{_name.encode('unicode_escape').decode()}", f"artifact names an adapter {_name!r}; export",
         "call", ArtifactError, "cannot be used as a folder name")(_evil(_name))


def _symlink_target(tmp: Path):
    path = base_artifact(tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    out = tmp / "out"
    out.mkdir()
    os.symlink(elsewhere, out / "a0")

    def run():
        try:
            lorazip.export(lorazip.load_artifact(path), out, ["a0"], overwrite=True)
        finally:
            assert (elsewhere / "keep.txt").read_text() == "keep" and os.listdir(elsewhere) == ["keep.txt"]

    return run


case("export-symlink-target", "OUTDIR/<name> is a symlink to another folder; export --overwrite", "call",
     OutputError, "symbolic link")(_symlink_target)


def _outdir_file(tmp: Path):
    path = base_artifact(tmp)
    (tmp / "out").write_text("x")
    return lambda: lorazip.export(lorazip.load_artifact(path), tmp / "out")


case("export-outdir-is-file", "OUTDIR is an existing file", "call", OutputError, "cannot create folder")(_outdir_file)


def _verify_sources(tmp: Path):
    path = base_artifact(tmp, n=3)
    src = tmp / "asrc"
    with open(src / "a1" / "adapter_model.safetensors", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    (src / "a2" / "adapter_model.safetensors").unlink()

    def run():
        rep = lorazip.verify(path, [src / "a0", src / "a1", src / "a2"])
        assert rep["checksum"]["ok"] and not rep["ok"]
        assert len(rep["problems"]) == 2
        assert "a1/adapter_model.safetensors: sha256 differs" in rep["problems"][0]
        assert "a2/adapter_model.safetensors: missing" in rep["problems"][1]
        raise ArtifactError(" | ".join(rep["problems"]))  # to record the messages in the catalogue

    return run


case("verify-sources", "verify with one source file edited and one deleted: one line per problem", "call",
     ArtifactError, "sha256 differs from the file compressed into the artifact", "missing")(_verify_sources)


# ----------------------------------------------------------------------------------------------
# Running a case
# ----------------------------------------------------------------------------------------------


def run_case(c: Case, tmp: Path) -> tuple[str, str]:
    """Run one case within its time and memory bounds; return (outcome, message)."""
    rss0 = _max_rss()
    with time_limit(CASE_SECONDS):
        work = tmp / "work"
        work.mkdir(exist_ok=True)
        target = c.build(tmp)
        try:
            if c.kind == "adapter":
                out = adapter_pipeline(target, work)
            elif c.kind == "artifact":
                out = artifact_pipeline(target, work)
            else:
                out = target()
            outcome, message = "ok", ""
        except LorazipError as exc:
            out, outcome, message = None, type(exc).__name__, str(exc)
    assert _max_rss() - rss0 < MAX_RSS_GROWTH, f"{c.id}: peak memory grew by {(_max_rss() - rss0) >> 20} MiB"
    if outcome == "ok" and c.check is not None:
        c.check(out, tmp)
    return outcome, message


def cli_runs(c: Case, tmp: Path, target) -> list[list[str]]:
    """The CLI commands that exercise a case (each must exit 0, or 1 with one error line)."""
    if c.kind == "adapter":
        sources = [str(t) for t in target] if isinstance(target, list) else [str(target)]
        out = str(tmp / "cli.lorazip.safetensors")
        return [["compress", *sources, "-o", out, "--rank", "1", "--device", "cpu", "--max-iters", "5", "--overwrite"],
                ["eval", out, *sources], ["export", out, str(tmp / "cli-export"), "--overwrite"], ["verify", out, *sources]]
    if c.kind == "artifact":
        return [["info", str(target)], ["eval", str(target)], ["export", str(target), str(tmp / "cli-export")],
                ["verify", str(target)]]
    return []


def _one_line(message: str) -> None:
    assert message and "\n" not in message and len(message) < 1000, repr(message[:2000])


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_catalogue(c: Case, tmp_path, capsys):
    outcome, message = run_case(c, tmp_path)
    if c.error is None:
        assert outcome == "ok", f"{c.id}: expected success, got {outcome}: {message}"
    else:
        assert outcome == c.error.__name__, f"{c.id}: expected {c.error.__name__}, got {outcome}: {message}"
        _one_line(message)
        for part in c.parts:
            assert part in message, f"{part!r} not in {message!r}"
    # The same input through the command line: exit 0, or exit 1 with exactly one "error:" line.
    if c.kind == "call":
        return
    cli_tmp = tmp_path / "cli"
    cli_tmp.mkdir()
    target = c.build(cli_tmp)
    from lorazip.cli import main as cli

    codes = []
    for args in cli_runs(c, cli_tmp, target):
        # Capture the CLI's stderr console in a StringIO: it takes any str, as a terminal's stderr
        # (errors="backslashreplace") does, while capsys' stream refuses the non-UTF-8 names' surrogates.
        buf, saved = io.StringIO(), cli.err._file
        cli.err._file = buf
        try:
            with time_limit(CASE_SECONDS):
                rc = cli.main(args)
        finally:
            cli.err._file = saved
        err = buf.getvalue()
        assert "Traceback" not in err
        if rc == 1:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), (args, err)
        else:
            assert rc == 0, (args, rc, err)
        codes.append(rc)
        if rc == 1 and c.kind == "adapter":
            break  # compress failed: nothing to evaluate
    assert (1 in codes) == (c.error is not None), (c.id, codes)


def test_catalogue_size():
    """docs/reliability.md quotes these numbers."""
    assert len(CASES) >= 100
    assert sum(c.error is None for c in CASES) >= 6


# ----------------------------------------------------------------------------------------------
# Fuzzing: mutated real adapters and artifacts
# ----------------------------------------------------------------------------------------------

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

# Examples per fuzz test (adapters, artifacts); the slow variants run LONG_FACTOR times more.
FUZZ_ADAPTERS = int(os.environ.get("LORAZIP_FUZZ_ADAPTERS", "100"))
FUZZ_ARTIFACTS = int(os.environ.get("LORAZIP_FUZZ_ARTIFACTS", "200"))
LONG_FACTOR = 6


def _fuzz_settings(n: int):
    return settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


def json_values():
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.sampled_from([0, -1, 1, 2**63, 10**12])
               | st.floats() | st.text(max_size=8) | st.sampled_from(["F32", "F16", "BF16", "I32", "X", "LORA", ""]))
    return st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=6)


def mutate_json(data, draw):
    """Replace, delete or add one value somewhere in a JSON document (in place where possible)."""
    if not isinstance(data, (dict, list)) or not data or draw(st.integers(0, 9)) == 0:
        return draw(json_values())
    if isinstance(data, dict):
        keys = sorted(data)
        key = draw(st.sampled_from(keys))
        op = draw(st.sampled_from(["set", "delete", "recurse", "recurse", "add", "rename"]))
        if op == "set":
            data[key] = draw(json_values())
        elif op == "delete":
            del data[key]
        elif op == "add":
            data[draw(st.text(max_size=12))] = draw(json_values())
        elif op == "rename":
            data[draw(st.text(max_size=12))] = data.pop(key)
        else:
            data[key] = mutate_json(data[key], draw)
        return data
    i = draw(st.integers(0, len(data) - 1))
    op = draw(st.sampled_from(["set", "delete", "recurse", "recurse", "append"]))
    if op == "set":
        data[i] = draw(json_values())
    elif op == "delete":
        del data[i]
    elif op == "append":
        data.append(draw(json_values()))
    else:
        data[i] = mutate_json(data[i], draw)
    return data


def mutate_file(data: bytes, draw, *, safetensors: bool, meta_doc: bool = False) -> tuple[bytes, str]:
    """One mutation of a file: a bit flip (header or data), a truncation, or a JSON edit."""
    if safetensors:
        kinds = ["flip-data", "flip-data", "flip-header", "truncate", "header-json", "header-json"]
        if meta_doc:
            kinds += ["meta-json", "meta-json", "meta-json"]
    else:
        kinds = ["flip", "flip", "truncate", "config-json", "config-json", "config-json"]
    kind = draw(st.sampled_from(kinds))
    if safetensors:
        (n,) = struct.unpack("<Q", data[:8])
        head_end = 8 + n
    else:
        head_end = len(data)
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))], kind
    if kind.startswith("flip"):
        lo, hi = {"flip-header": (0, head_end - 1), "flip-data": (head_end, len(data) - 1)}.get(kind, (0, len(data) - 1))
        out = bytearray(data)
        for pos in draw(st.lists(st.integers(lo, hi), min_size=1, max_size=3, unique=True)):  # distinct bytes:
            out[pos] ^= 1 << draw(st.integers(0, 7))  # flips never cancel out
        return bytes(out), kind
    if kind == "config-json":
        return json.dumps(mutate_json(json.loads(data), draw)).encode(), kind
    header, body = split_safetensors(data)
    if kind == "header-json":
        tensors = sorted(k for k in header if k != "__metadata__")
        key = draw(st.sampled_from(tensors))
        header[key] = mutate_json(header[key], draw)
    else:
        doc = read_doc(header["__metadata__"])
        write_doc(header["__metadata__"], mutate_json(doc, draw))
    return join_safetensors(header, body), kind


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    if not (FIXTURES / SMALL_FIXTURE).is_dir():
        pytest.skip(f"real adapter fixtures not found at {FIXTURES}")
    base = tmp_path_factory.mktemp("fuzz")
    src = base / "orig" / "adapter"
    src.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # copies: the originals stay untouched
        shutil.copyfile(FIXTURES / SMALL_FIXTURE / name, src / name)
    art = lorazip.compress(lorazip.load_collection(src), 2, device="cpu", max_iters=5)
    art.meta["adapters"][0]["source"]["path"] = "fixture"  # no temporary path: the same bytes, the same examples
    return base, src, art.save(base / "orig.lorazip.safetensors")


def _classify(fn) -> tuple[str, str]:
    try:
        with time_limit(FUZZ_SECONDS):
            fn()
        return "ok", ""
    except LorazipError as exc:
        _one_line(str(exc))
        return f"error:{type(exc).__name__}", str(exc)


def _report_counts(capsys, title: str, counts: Counter) -> None:
    total = sum(v for k, v in counts.items() if k.startswith("outcome:"))
    lines = [f"{title}: {total} examples"] + [f"  {k}: {v}" for k, v in sorted(counts.items())]
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def _fuzz_adapter(fuzz_base, capsys, n: int):
    base, src, _art = fuzz_base
    orig = {name: (src / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    counts: Counter = Counter()

    @_fuzz_settings(n)
    @given(st.data())
    def run(data):
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            folder = work / "adapter"
            folder.mkdir()
            for name, content in orig.items():
                (folder / name).write_bytes(content)
            target = data.draw(st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
            mutated, kind = mutate_file(orig[target], data.draw, safetensors=target.endswith(".safetensors"))
            (folder / target).write_bytes(mutated)
            outcome, _msg = _classify(lambda: adapter_pipeline(folder, work, max_iters=3))
            counts[f"outcome:{outcome}"] += 1
            counts[f"mutation:{target.split('_')[-1]}:{kind} -> {outcome}"] += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()
    _report_counts(capsys, "fuzz adapters", counts)
    assert sum(v for k, v in counts.items() if k.startswith("outcome:")) == n
    assert counts["outcome:ok"] > 0 and counts["outcome:ok"] < n  # both kinds of ending were exercised
    assert (src / "adapter_model.safetensors").read_bytes() == orig["adapter_model.safetensors"]
    return counts


def _fuzz_artifact(fuzz_base, capsys, n: int):
    base, _src, art = fuzz_base
    orig = art.read_bytes()
    counts: Counter = Counter()

    @_fuzz_settings(n)
    @given(st.data())
    def run(data):
        work = Path(tempfile.mkdtemp(dir=base))
        try:
            path = work / "m.lorazip.safetensors"
            mutated, kind = mutate_file(orig, data.draw, safetensors=True, meta_doc=True)
            path.write_bytes(mutated)
            verify = data.draw(st.sampled_from([None, False]))  # False: data flips reach evaluate and export
            outcome, _msg = _classify(lambda: artifact_pipeline(path, work, verify=verify))
            counts[f"outcome:{outcome}"] += 1
            counts[f"mutation:{kind}{'' if verify is None else ' (load without checksum)'} -> {outcome}"] += 1
        finally:
            shutil.rmtree(work, ignore_errors=True)

    run()
    _report_counts(capsys, "fuzz artifacts", counts)
    assert sum(v for k, v in counts.items() if k.startswith("outcome:")) == n
    assert counts["outcome:ok"] > 0 and counts["outcome:ok"] < n
    return counts


@pytest.mark.skipif(given is None, reason="hypothesis not installed")
def test_fuzz_adapters(fuzz_base, capsys):
    _fuzz_adapter(fuzz_base, capsys, FUZZ_ADAPTERS)


@pytest.mark.skipif(given is None, reason="hypothesis not installed")
def test_fuzz_artifacts(fuzz_base, capsys):
    _fuzz_artifact(fuzz_base, capsys, FUZZ_ARTIFACTS)


@pytest.mark.slow
@pytest.mark.skipif(given is None, reason="hypothesis not installed")
def test_fuzz_adapters_long(fuzz_base, capsys):
    _fuzz_adapter(fuzz_base, capsys, LONG_FACTOR * FUZZ_ADAPTERS)


@pytest.mark.slow
@pytest.mark.skipif(given is None, reason="hypothesis not installed")
def test_fuzz_artifacts_long(fuzz_base, capsys):
    _fuzz_artifact(fuzz_base, capsys, LONG_FACTOR * FUZZ_ARTIFACTS)


# ----------------------------------------------------------------------------------------------
# Determinism and integrity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [("jd-full", {}), ("jd-diag", {}), ("svd", {}),
                                       ("jd-clustered", {"clusters": 2})])
def test_same_inputs_same_bytes(tmp_path, method, kw):
    write_collection(tmp_path / "src", n=4, seed=3, extra_tensors={"base_model.model.score.weight": torch.ones(2, 8)})
    paths = []
    for i in range(2):
        coll = lorazip.load_collection(tmp_path / "src")  # fresh objects each time
        art = lorazip.compress(coll, 3, method=method, device="cpu", seed=7, max_iters=50, **kw)
        paths.append(art.save(tmp_path / f"{i}.lorazip.safetensors"))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = lorazip.compress(lorazip.load_collection(tmp_path / "src"), 3, method=method, device="cpu", seed=8,
                             max_iters=50, **kw).save(tmp_path / "seed8.lorazip.safetensors")
    if method in ("jd-full", "jd-diag", "jd-clustered"):  # randomized initialisation: the seed matters
        assert lorazip.load_artifact(other).meta["solver"]["seed"] == 8


def test_real_fixtures_same_bytes(tmp_path, fixtures_dir):
    srcs = [fixtures_dir / "gpt2" / f"winkitee__Lightweight-Fine-Tuning-Project__checkpoint-{k}" for k in (125, 250)]
    outs = [lorazip.compress(lorazip.load_collection(srcs), 4, device="cpu", max_iters=20).save(tmp_path / f"{i}.st")
            for i in range(2)]
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_checksum_file_and_memory_agree(tmp_path):
    path = base_artifact(tmp_path)
    from lorazip.artifact import file_checksum, verify_checksum

    header, tensors = read_artifact_file(path)
    assert file_checksum(path) == tensor_checksum(tensors) == read_doc(header)["checksum"]
    assert verify_checksum(lorazip.load_artifact(path))


def test_load_verifies_small_artifacts_only_by_default(tmp_path, monkeypatch):
    path = _flip_data(tmp_path)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        lorazip.load_artifact(path)
    art = lorazip.load_artifact(path, verify=False)  # lazy, unverified
    assert art.names == ["a0", "a1"]
    monkeypatch.setattr(sys.modules["lorazip.artifact"], "VERIFY_AUTO_BYTES", 16)  # "large" artifact: not checked by default
    assert lorazip.load_artifact(path).names == ["a0", "a1"]
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        lorazip.load_artifact(path, verify=True)
    assert lorazip.verify(path)["checksum"]["ok"] is False


def test_verify_report_and_cli(tmp_path, capsys):
    from lorazip.cli.main import main

    path = base_artifact(tmp_path, n=3)
    src = tmp_path / "asrc"
    rep = lorazip.verify(path, src)
    assert rep["ok"] and rep["problems"] == [] and rep["checksum"]["ok"]
    assert len(rep["files"]) == 6 and all(f["ok"] for f in rep["files"]) and rep["not_checked"] == []
    partial = lorazip.verify(path, src / "a1")
    assert partial["ok"] and partial["not_checked"] == ["a0", "a2"]
    capsys.readouterr()
    assert main(["verify", str(path), str(src), "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["ok"] is True and "ok: tensor checksum matches; 6 source file(s) match" in out.err
    # An unrelated adapter is a problem; so is a changed file, named on its own line.
    write_adapter(tmp_path / "other" / "zz", MOD, seed=9)
    (src / "a0" / "adapter_config.json").write_text((src / "a0" / "adapter_config.json").read_text() + " ")
    assert main(["verify", str(path), str(src), str(tmp_path / "other" / "zz")]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(ln.startswith("error:") for ln in lines)
    assert "a0/adapter_config.json: sha256 differs" in lines[0] and "'zz' is not in the artifact" in lines[1]
    flipped = _flip_data(tmp_path / "f")
    assert main(["verify", str(flipped)]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"error: {flipped}: tensor checksum mismatch: the tensors were changed after the artifact "
                     "was written"]


def _cli(args: list[str]) -> tuple[int, str]:
    """Run the CLI in-process; stderr captured in a StringIO (takes any str, like a terminal's stderr)."""
    from lorazip.cli import main as cli

    buf, saved = io.StringIO(), cli.err._file
    cli.err._file = buf
    try:
        rc = cli.main([str(a) for a in args])
    finally:
        cli.err._file = saved
    return rc, buf.getvalue()


def test_cli_error_line_has_no_newlines_or_escape_sequences(tmp_path):
    folder = tmp_path / "src" / "evil\n\x1b[31mred\x1b]0;title\x07"
    write_adapter(folder, MOD, seed=0, config_overrides={"r": 0})
    rc, err = _cli(["compress", folder, "-o", tmp_path / "x.lorazip.safetensors", "--device", "cpu"])
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err and "\x07" not in err
    assert "evil\\n\\x1b[31mred" in err and "'r' must be a positive integer, got 0" in err


def test_cli_export_refuses_evil_name(tmp_path):
    path = resave_artifact(base_artifact(tmp_path), tmp_path / "evil.lorazip.safetensors",
                           meta_edit=lambda doc: doc["adapters"][1].update(name="../../evil"))
    before = tree(tmp_path)
    rc, err = _cli(["export", path, tmp_path / "out" / "deeper"])
    assert rc == 1 and err.startswith("error: adapter name '../../evil' cannot be used as a folder name")
    assert err.count("\n") == 1
    assert tree(tmp_path) == before and not (tmp_path.parent / "evil").exists()
    rc, err = _cli(["export", path, tmp_path / "out", "--adapter", "a0"])  # a safe adapter of it still exports
    assert rc == 0 and os.listdir(tmp_path / "out") == ["a0"]


def test_artifact_at_non_utf8_path(tmp_path):
    """safetensors opens UTF-8 paths only; lorazip reads and writes artifacts at any path."""
    write_collection(tmp_path / "src", n=2, modules=MOD, seed=0)
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/out\xff"))
    folder.mkdir()
    path = folder / "a\udcfe.lorazip.safetensors"
    lorazip.compress(lorazip.load_collection(tmp_path / "src"), 2, device="cpu", max_iters=5).save(path)
    art = lorazip.load_artifact(path, verify=True)
    rep = lorazip.evaluate(art, tmp_path / "src")
    assert rep["n_adapters"] == 2 and lorazip.verify(path, tmp_path / "src")["ok"]
    folders = lorazip.export(art, folder / "exp\udcfd")
    assert [f.name for f in folders] == ["a0", "a1"]
    state, _ = lorazip.to_peft(art, "a1")
    assert st_load((folders[1] / "adapter_model.safetensors").read_bytes()).keys() == state.keys()


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = base_artifact(tmp_path)
        (folder,) = lorazip.export(lorazip.load_artifact(path), tmp_path / "out", ["a0"])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    assert folder.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert (folder / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644


def test_export_overwrite_keeps_a_complete_folder(tmp_path, monkeypatch):
    """If the new folder cannot be moved in, the old one is put back under its name."""
    path = base_artifact(tmp_path)
    art = lorazip.load_artifact(path)
    (old,) = lorazip.export(art, tmp_path / "out", ["a0"])
    before = tree(old)
    real_replace = os.replace
    calls = []

    def failing_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the second rename (new folder in) fails
            raise KeyboardInterrupt
        return real_replace(a, b)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        lorazip.export(art, tmp_path / "out", ["a0"], overwrite=True)
    monkeypatch.undo()
    assert tree(old) == before and sorted(os.listdir(tmp_path / "out")) == ["a0"]


# ----------------------------------------------------------------------------------------------
# Interrupted and failing runs (real subprocesses)
# ----------------------------------------------------------------------------------------------


def _lorazip_cmd() -> list[str]:
    exe = shutil.which("lorazip")
    return [exe] if exe else [sys.executable, "-c", "from lorazip.cli.main import entry; entry()"]


def _child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _default_signals():
    """In the child: SIGINT handled as usual even if this test runs with SIGINT ignored (background job)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _size_limit(limit: int):
    def pre():
        _default_signals()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return pre


@pytest.fixture(scope="module")
def heavy(tmp_path_factory):
    """16 adapters whose artifact is ~34 MB (a 0.5M-element head each), so writing it takes a while,
    and an older artifact at the output path."""
    root = tmp_path_factory.mktemp("heavy")
    mods = {f"model.layers.{i}.q_proj": (128, 128) for i in range(6)}
    for i in range(16):
        write_adapter(root / "src" / f"a{i:02d}", mods, r=8, seed=i,
                      extra_tensors={"base_model.model.score.weight": torch.full((512, 1024), float(i))})
    old = lorazip.compress(lorazip.load_collection(root / "src"), 1, device="cpu", max_iters=2)
    old.save(root / "old.lorazip.safetensors")
    return root


def _start(args: list[str], cwd: Path, preexec=_default_signals) -> subprocess.Popen:
    return subprocess.Popen(_lorazip_cmd() + args, cwd=cwd, env=_child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def _temp_holds_data(folder: Path, pattern: str) -> bool:
    for p in folder.glob(pattern):
        try:
            if p.is_dir() and any(p.iterdir()) or p.is_file() and p.stat().st_size > 0:
                return True
        except OSError:
            pass
    return False


def _main_running(pid: int) -> bool:
    """True once the child's main() has installed its SIGTERM handler (Linux: SigCgt in /proc/PID/status).

    A signal during interpreter start-up, before that (imports take 1-3 s), gets Python's default
    behaviour (SIGTERM kills the process; SIGINT raises KeyboardInterrupt in an import); nothing has
    been written at that point."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except (OSError, ValueError):
        pass
    return False


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old")))


EXPECT = {signal.SIGINT: (130, ["interrupted"]), signal.SIGTERM: (143, ["terminated"]), signal.SIGKILL: (-9, None)}


class NotCaught(Exception):
    """The child wrote its output faster than the poller saw a temp file with data: a race of the
    test, not a failure of the command; the run is repeated."""


class Run:
    """One ``lorazip compress`` or ``lorazip export`` child over existing outputs, to be signalled."""

    def __init__(self, heavy: Path, tmp: Path, command: str, sig: signal.Signals, delay: float | None):
        self.heavy, self.tmp, self.command, self.sig, self.delay = heavy, tmp, command, sig, delay
        tmp.mkdir(parents=True, exist_ok=True)
        art = heavy / "old.lorazip.safetensors"
        if command == "compress":
            self.watch, self.pattern = tmp, ".x.lorazip.safetensors.*.tmp"
            self.target = tmp / "x.lorazip.safetensors"
            shutil.copyfile(art, self.target)
            self.old = self.target.read_bytes()
            args = ["compress", str(heavy / "src"), "-o", str(self.target), "--rank", "4", "--device", "cpu",
                    "--max-iters", "30", "--overwrite"]
        else:
            self.watch, self.pattern = tmp / "out", ".a*.tmp"
            lorazip.export(lorazip.load_artifact(art), self.watch, ["a00", "a15"])  # folders to be replaced
            self.old = {name: tree(self.watch / name) for name in ("a00", "a15")}
            args = ["export", str(art), str(self.watch), "--overwrite"]
        self.proc = _start(args, tmp)
        self.t0 = None  # when main() is running (its SIGTERM handler installed); delays count from there
        self.sent = False

    def poll(self) -> bool:
        """Send the signal when due (mid-write, or ``delay`` s into main()); True once sent or the run has ended."""
        if self.sent or self.proc.poll() is not None:
            return True
        if self.t0 is None and _main_running(self.proc.pid):
            self.t0 = time.monotonic()
        due = (_temp_holds_data(self.watch, self.pattern) if self.delay is None
               else self.t0 is not None and time.monotonic() - self.t0 >= self.delay)
        if due:
            self.proc.send_signal(self.sig)
            self.sent = True
        return self.sent

    def check(self) -> str:
        out, err = self.proc.communicate(timeout=180)
        done = "exported 16 adapter(s)" in err if self.command == "export" else "lorazip compress ->" in err
        if self.proc.returncode == 0 or done:
            # Finished before the signal, or the signal came after main() returned (during interpreter
            # shutdown, where Python's default handling applies): only possible with a delay.
            if self.delay is None:
                raise NotCaught(f"{self.command}: the write was not caught in progress")
            if self.command == "compress":
                lorazip.load_artifact(self.target, verify=True)
            else:
                assert len([n for n in os.listdir(self.watch) if not n.startswith(".")]) == 16
            return "finished first"
        if not self.sent:
            raise NotCaught(f"{self.command}: the write was not caught in progress")
        rc, lines = EXPECT[self.sig]
        assert self.proc.returncode == rc, (self.command, self.sig, self.proc.returncode, err)
        if lines is not None:
            assert [ln for ln in err.splitlines() if ln.strip()] == lines, err
            assert out == ""
        temps = _temps(self.watch)
        if self.sig == signal.SIGKILL:  # no cleanup possible: a stale temp may remain, never a final name
            assert all(t.startswith(".") for t in temps), temps
        else:
            assert temps == [], temps
        if self.command == "compress":
            # Nothing partial has the final name: the previous artifact intact, byte for byte, or (a
            # signal after the atomic rename, while the report was computed) the new one, complete.
            if self.target.read_bytes() != self.old:
                assert self.delay is not None, "the final name changed while the write was in progress"
                lorazip.load_artifact(self.target, verify=True)
        else:
            # Every folder under a final name is complete: the old export or the new one, never a mix.
            art = lorazip.load_artifact(self.heavy / "old.lorazip.safetensors")
            for name in sorted(os.listdir(self.watch)):
                if name.startswith("."):
                    continue
                files = sorted(os.listdir(self.watch / name))
                assert files == ["adapter_config.json", "adapter_model.safetensors"], (name, files)
                state = load_file(str(self.watch / name / "adapter_model.safetensors"))
                if name not in self.old or tree(self.watch / name) != self.old[name]:
                    want = lorazip.to_peft(art, name)[0]
                    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
        return f"signalled ({self.sig.name})"


def _run_all(runs: list[Run], timeout: float = 180) -> list[str]:
    end = time.monotonic() + timeout
    while not all([r.poll() for r in runs]) and time.monotonic() < end:  # a list: poll every run each time
        time.sleep(0.002)
    return [r.check() for r in runs]


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


@pytest.mark.parametrize("command", ["compress", pytest.param("export", marks=pytest.mark.slow)])
def test_interrupted_mid_write(heavy, tmp_path, command):
    """SIGINT, SIGTERM and SIGKILL while the output is being written (a run that finishes before
    the poller sees the write in progress is repeated: export writes fast since it opens the file once)."""
    for sig in SIGNALS:
        for attempt in range(5):  # each run must catch the write in progress; the timing is a race
            run = Run(heavy, tmp_path / f"{sig.name}-{attempt}", command, sig, None)
            try:
                assert _run_all([run]) == [f"signalled ({sig.name})"]
                break
            except NotCaught:
                continue
        else:
            pytest.fail(f"{command}: the write was never caught in progress in 5 runs ({sig.name})")


@pytest.mark.slow
@pytest.mark.parametrize("k", range(4))
def test_interrupted_at_random_points(heavy, tmp_path, k):
    """Seeded random signals and moments (0 .. 4 s into main()) for compress and export."""
    rng = random.Random(1000 + k)
    runs = [Run(heavy, tmp_path / f"{command}-{i}", command, rng.choice(SIGNALS), rng.uniform(0.0, 4.0))
            for i in range(2) for command in ("compress", "export")]
    _run_all(runs)


def test_file_size_limit_compress_and_export(heavy, tmp_path):
    """RLIMIT_FSIZE makes the write fail with EFBIG: one error line, exit 1, nothing partial left."""
    target = tmp_path / "x.lorazip.safetensors"
    shutil.copyfile(heavy / "old.lorazip.safetensors", target)
    old = target.read_bytes()
    out_dir = tmp_path / "out"
    limit = 1 << 20
    compress = _start(["compress", str(heavy / "src"), "-o", str(target), "--rank", "4", "--device", "cpu",
                       "--max-iters", "30", "--overwrite"], tmp_path, _size_limit(limit))
    export = _start(["export", str(heavy / "old.lorazip.safetensors"), str(out_dir)], tmp_path, _size_limit(limit))
    for proc, want in ((compress, f"error: {target}: cannot write (File too large)"),
                       (export, f"error: {out_dir / 'a00'}: cannot write (File too large)")):
        _out, err = proc.communicate(timeout=180)
        assert proc.returncode == 1, err
        assert [ln for ln in err.splitlines() if ln.strip()] == [want], err
    assert target.read_bytes() == old and _temps(tmp_path) == []
    assert os.listdir(out_dir) == []  # the first adapter's head (2 MB) is over the limit: nothing written


@pytest.mark.slow
def test_same_bytes_across_processes(heavy, tmp_path):
    """The CLI in a fresh process writes the same bytes as the library in this one (same seed, CPU)."""
    out = tmp_path / "cli.lorazip.safetensors"
    proc = _start(["compress", str(heavy / "src"), "-o", str(out), "--rank", "4", "--device", "cpu"], tmp_path)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    here = lorazip.compress(lorazip.load_collection(heavy / "src"), 4, device="cpu").save(tmp_path / "lib.st")
    assert out.read_bytes() == here.read_bytes()


# ----------------------------------------------------------------------------------------------
# `python tests/test_reliability.py`: the catalogue table of docs/reliability.md
# ----------------------------------------------------------------------------------------------


def _markdown_catalogue() -> str:
    torch.set_num_threads(1)
    rows = ["| case | input | outcome | message |", "|---|---|---|---|"]
    for c in CASES:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d).resolve()
            outcome, message = run_case(c, tmp)
            message = message.replace(str(tmp), "<tmp>").replace("|", "\\|")
        rows.append(f"| `{c.id}` | {c.what.replace('|', '/')} | {outcome} | {message or 'works (all steps)'} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(_markdown_catalogue())
