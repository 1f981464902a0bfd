"""A CLI that starts at once: ``--help``, usage errors, ``info`` and ``verify`` never import torch.

Each run is a fresh interpreter (``sys.executable -c``) that calls ``lorazip.cli.main.main`` and
then reports what ``sys.modules`` holds. The artifacts are made here, in the test process, with
the library. The pure-Python pieces that the torch-free paths repeat (safetensors header checks,
source naming, storage numbers) are compared with the originals they stand in for.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import write_adapter, write_collection, write_raw_safetensors

import lorazip
from lorazip.errors import AdapterFormatError, ArtifactError, SourceError

ROOT = Path(__file__).resolve().parents[1]


def _child(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line last; return it."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_main(argv: list[str], env: dict[str, str] | None = None) -> dict:
    return _child(
        f"""
        import contextlib, io, json, sys
        from lorazip.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main({argv!r})
        heavy = ("torch", "numpy", "scipy", "safetensors", "huggingface_hub")
        print(json.dumps({{"rc": rc, "loaded": [m for m in heavy if m in sys.modules]}}))
        """,
        env,
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Sources, a plain artifact, a clustered one (assign/ tensors) and one with a flipped data bit."""
    root = tmp_path_factory.mktemp("startup")
    write_collection(root / "src", n=3, seed=0)
    coll = lorazip.load_collection(root / "src")
    art = lorazip.compress(coll, 2, device="cpu", max_iters=20).save(root / "a.lorazip.safetensors")
    clustered = lorazip.compress(coll, 2, method="jd-clustered", clusters=2, device="cpu", max_iters=20)
    clustered = clustered.save(root / "k2.lorazip.safetensors")
    flipped = root / "flipped.lorazip.safetensors"
    data = bytearray(art.read_bytes())
    data[-7] ^= 0x01
    flipped.write_bytes(bytes(data))
    return {"src": root / "src", "art": art, "clustered": clustered, "flipped": flipped, "root": root}


CASES = {  # name: (argv with {placeholders}, exit status, numpy allowed)
    "help": (["--help"], 0, False),
    "command help": (["compress", "--help"], 0, False),
    "no arguments": ([], 2, False),  # no_args_is_help: the help, as a usage error
    "info": (["info", "{art}"], 0, False),
    "info json": (["info", "{art}", "--json"], 0, False),
    "info clustered": (["info", "{clustered}"], 0, False),
    "info missing file": (["info", "{root}/nope.lorazip.safetensors"], 1, False),
    "info damaged": (["info", "{flipped}"], 1, False),
    "verify": (["verify", "{art}"], 0, True),
    "verify sources": (["verify", "{art}", "{src}"], 0, True),
    "verify clustered": (["verify", "{clustered}", "{src}/a1", "--json"], 0, True),
    "verify damaged": (["verify", "{flipped}"], 1, True),
    "verify bad source": (["verify", "{art}", "{root}/nope"], 1, True),
    "missing argument": (["info"], 2, False),
    "missing option": (["compress", "{src}"], 2, False),
    "bad value": (["compress", "{src}", "-o", "{root}/x.safetensors", "--rank", "abc"], 2, False),
    "unknown option": (["compress", "{src}", "--frobnicate"], 2, False),
    "unknown command": (["frobnicate"], 2, False),
    "output exists": (["compress", "{src}", "-o", "{art}"], 1, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_light_commands_do_not_import_torch(made, name):
    argv, want_rc, numpy_ok = CASES[name]
    got = _run_main([a.format(**made) for a in argv])
    assert got["rc"] == want_rc, got
    assert "torch" not in got["loaded"], got
    if not numpy_ok:
        assert "numpy" not in got["loaded"], got


def test_bad_lorazip_threads_is_an_error_without_torch():
    got = _run_main(["--help"], env={"LORAZIP_THREADS": "many"})
    assert got == {"rc": 1, "loaded": []}


def test_lorazip_threads_still_reaches_torch(made, tmp_path):
    got = _child(
        f"""
        import json, sys
        from lorazip.cli.main import main
        rc = main(["compress", {str(made['src'])!r}, "-o", {str(tmp_path / 'x.lorazip.safetensors')!r},
                   "--rank", "2", "--device", "cpu", "--max-iters", "5"])
        import torch
        print(json.dumps({{"rc": rc, "threads": torch.get_num_threads()}}))
        """,
        env={"LORAZIP_THREADS": "1", "OMP_NUM_THREADS": "2"},
    )
    assert got == {"rc": 0, "threads": 1}


def test_import_lorazip_is_cheap_and_the_api_still_resolves():
    got = _child(
        """
        import json, sys
        import lorazip
        light = [lorazip.__version__, lorazip.LorazipError.__name__, lorazip.ArtifactError.__name__,
                 "torch" in sys.modules, "numpy" in sys.modules]
        listed = sorted(set(lorazip.__all__) - set(dir(lorazip)))
        from lorazip.verify import verify  # submodules named like their function: the function stays
        import lorazip.compress, lorazip.evaluate, lorazip.export, lorazip.analyze
        kinds = {n: type(getattr(lorazip, n)).__name__ for n in lorazip.__all__}
        print(json.dumps({"light": light, "listed": listed, "kinds": kinds, "same": verify is lorazip.verify,
                          "serve": lorazip.serve.__name__, "torch": "torch" in sys.modules}))
        """
    )
    assert got["light"] == [lorazip.__version__, "LorazipError", "ArtifactError", False, False]
    assert got["listed"] == []  # dir() shows the whole public API before it is loaded
    for name in ("compress", "evaluate", "export", "verify", "analyze", "load_artifact", "load_collection",
                 "to_peft", "apply", "add_adapters", "remove_adapters"):
        assert got["kinds"][name] == "function", (name, got["kinds"])
    assert got["kinds"]["Artifact"] == got["kinds"]["Collection"] == "type"
    assert got["same"] and got["serve"] == "lorazip.serve" and got["torch"]


def test_public_names_are_the_same_objects_as_their_modules():
    import lorazip.artifact
    import lorazip.io.collection

    assert lorazip.compress is sys.modules["lorazip.compress"].compress
    assert lorazip.verify is sys.modules["lorazip.verify"].verify
    assert lorazip.Artifact is lorazip.artifact.Artifact and lorazip.Collection is lorazip.io.collection.Collection
    with pytest.raises(AttributeError):
        lorazip.no_such_name  # noqa: B018


# ----------------------------------------------------------------------------------------------
# The torch-free copies agree with what they stand in for
# ----------------------------------------------------------------------------------------------


def test_info_storage_is_evaluate_storage(made):
    from lorazip.cli.report import describe, storage
    from lorazip.evaluate import storage as eval_storage

    coll = lorazip.load_collection(made["src"])
    for art in (lorazip.load_artifact(made["art"]), lorazip.load_artifact(made["clustered"]),
                lorazip.compress(coll, 2, method="svd", device="cpu"),  # in memory: no path
                lorazip.compress(coll, 2, method="jd-diag", device="cpu", max_iters=5)):
        assert storage(art) == eval_storage(art)
    assert describe(lorazip.load_artifact(made["art"]))["storage"] == eval_storage(lorazip.load_artifact(made["art"]))


def test_header_dtypes_match_torch():
    from lorazip import artifact
    from lorazip.io import peft

    assert artifact.FLOAT_DTYPES == peft.FLOAT_DTYPES
    assert set(peft.ST_TORCH) <= set(artifact.ST_DTYPES)
    for name, dtype in peft.ST_TORCH.items():
        assert artifact.ST_DTYPES[name] == (peft._DTYPES[name], str(dtype)), name
    assert artifact.STORAGE_DTYPES == {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                                      "int8": torch.int8}


def _bad_files(tmp: Path) -> list[Path]:
    """Safetensors files broken in each way the header parser checks (and two good ones)."""
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    files = {
        "good": ({"__metadata__": {"a": "b"}, "x": t}, b"\0" * 8),
        "empty": ({}, b""),
        "meta not strings": ({"__metadata__": {"a": 1}, "x": t}, b"\0" * 8),
        "not an object": ([1, 2], b""),
        "bad dtype": ({"x": {**t, "dtype": "F128"}}, b"\0" * 8),
        "dtype not a string": ({"x": {**t, "dtype": ["F32"]}}, b"\0" * 8),
        "bad shape": ({"x": {**t, "shape": [2.0]}}, b"\0" * 8),
        "negative offset": ({"x": {**t, "data_offsets": [-1, 7]}}, b"\0" * 8),
        "no offsets": ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        "size mismatch": ({"x": {**t, "shape": [3]}}, b"\0" * 8),
        "gap": ({"x": {**t, "data_offsets": [4, 12]}}, b"\0" * 12),
        "overlap": ({"x": t, "y": {**t, "data_offsets": [4, 12]}}, b"\0" * 12),
        "padded": ({"x": t}, b"\0" * 12),
        "past the end": ({"x": {**t, "data_offsets": [0, 16], "shape": [4]}}, b"\0" * 8),
    }
    out = []
    for name, (header, data) in files.items():
        p = tmp / f"{name}.safetensors"
        write_raw_safetensors(p, header, data)
        out.append(p)
    raw = {
        "short": b"\1\2\3",
        "huge length": struct.pack("<Q", 1 << 40) + b"{}",
        "not utf-8": struct.pack("<Q", 2) + b"\xff\xfe",
        "not json": struct.pack("<Q", 4) + b"{x:1",
        "duplicate keys": struct.pack("<Q", 15) + b'{"a":{},"a":{}}',
        "nested": struct.pack("<Q", 20000) + b"[" * 10000 + b"]" * 10000,
    }
    for name, data in raw.items():
        p = tmp / f"{name}.safetensors"
        p.write_bytes(data)
        out.append(p)
    out.append(tmp / "missing.safetensors")
    folder = tmp / "a folder.safetensors"
    folder.mkdir()
    out.append(folder)
    return out


def test_header_reader_agrees_with_the_adapter_reader(tmp_path):
    from lorazip.artifact import read_header
    from lorazip.io.peft import parse_safetensors

    outcomes = set()
    for path in _bad_files(tmp_path):
        try:
            want = ("ok", parse_safetensors(path))
        except AdapterFormatError as exc:
            want = ("error", str(exc))
        try:
            got = ("ok", read_header(path))
        except ArtifactError as exc:
            got = ("error", str(exc))
        assert got == want, path.name
        outcomes.add(want[0] if want[0] == "ok" else want[1].replace(str(path), "").split("(")[0])
    assert len(outcomes) >= 12, outcomes  # the cases reach many different checks


def test_verify_names_sources_as_load_collection_does(tmp_path):
    from lorazip.io.collection import resolve_sources
    from lorazip.verify import _resolve_sources

    mod = {"q": (4, 4)}
    for rel in ("one/a", "one/b", "two/a", "two/deep/b", "solo", "x/ckpt/inner"):
        write_adapter(tmp_path / rel, mod, r=2, seed=len(rel))
    (tmp_path / "two" / "loop").symlink_to(tmp_path / "two")
    cases = [
        tmp_path / "solo", [tmp_path / "one", tmp_path / "two"], [tmp_path / "one" / "a", tmp_path / "two" / "a"],
        str(tmp_path / "x"), [tmp_path / "one", tmp_path / "one" / "a"], [tmp_path / "nope"],
        [tmp_path / "solo" / "adapter_config.json"], [tmp_path / "one" / "a", tmp_path / "one" / "a"],
        [tmp_path / "one", tmp_path / "two" / "deep"],
    ]
    for sources in cases:
        try:
            want = [(name, d) for name, d, _prov in resolve_sources(sources)]
        except SourceError as exc:
            want = str(exc)
        try:
            got = _resolve_sources(sources)
        except SourceError as exc:
            got = str(exc)
        assert got == want, sources
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no adapter folders"):
        _resolve_sources(empty)
