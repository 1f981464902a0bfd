"""A CLI that starts at once: ``--help``, usage errors, ``info`` and ``verify`` never import torch.

Each run is a fresh interpreter (``sys.executable -c``) that calls ``lorazip.cli.main.main`` and
then reports what ``sys.modules`` holds. The artifacts are made here, in the test process, with
the library. The pure-Python pieces the torch-free paths need (safetensors header checks, source
naming, storage numbers) live in torch-free modules that the torch-side code imports too; they are
checked here on their own.
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
# The torch-free pieces: one copy, shared by the torch-free paths and the library
# ----------------------------------------------------------------------------------------------


def test_torch_free_modules_import_without_torch():
    got = _child(
        """
        import json, sys
        import lorazip.artifact, lorazip.verify, lorazip.io.files, lorazip.io.safetensors_header
        import lorazip.cli.report
        print(json.dumps({"loaded": [m for m in ("torch", "numpy") if m in sys.modules]}))
        """
    )
    assert got == {"loaded": []}


def test_storage_numbers(made):
    from lorazip.artifact import storage_summary
    from lorazip.cli.report import describe, storage
    from lorazip.evaluate import storage as eval_storage

    assert storage is eval_storage is storage_summary  # one function for `lorazip info` and evaluate
    coll = lorazip.load_collection(made["src"])
    orig_params = sum(a.modules[m].rank * (a.modules[m].d_in + a.modules[m].d_out)
                      for a in coll.adapters for m in a.modules)
    orig_bytes = sum(a.weights_file.stat().st_size for a in coll.adapters)
    for art in (lorazip.load_artifact(made["art"]), lorazip.load_artifact(made["clustered"]),
                lorazip.compress(coll, 2, method="svd", device="cpu"),  # in memory: no path
                lorazip.compress(coll, 2, method="jd-diag", device="cpu", max_iters=5)):
        st = storage(art)
        n = len(art.names)
        art_bytes = art.path.stat().st_size if art.path else art.nbytes_tensors()
        assert st["original_params"] == orig_params and st["original_bytes"] == orig_bytes
        assert st["artifact_bytes"] == art_bytes and st["bytes_per_adapter"] == art_bytes / n
        assert st["ratio_params"] == orig_params / st["compressed_params"]
        assert st["ratio_bytes"] == orig_bytes / art_bytes
        k = {m["name"]: m.get("n_clusters", 1) for m in art.modules}
        core = 2 if art.method in ("jd-diag", "svd") else 4
        assert st["compressed_params"] == sum(k[m["name"]] * 2 * (m["d_in"] + m["d_out"]) + n * core
                                              for m in art.modules)
    assert describe(lorazip.load_artifact(made["art"]))["storage"] == storage(lorazip.load_artifact(made["art"]))


def test_header_dtypes_match_torch():
    from lorazip import artifact
    from lorazip.io import peft, safetensors_header

    assert artifact.FLOAT_DTYPES is peft.FLOAT_DTYPES is safetensors_header.FLOAT_DTYPES
    assert artifact.ST_DTYPES is peft.ST_DTYPES is safetensors_header.ST_DTYPES
    assert set(peft.ST_TORCH) <= set(artifact.ST_DTYPES)
    for name, (width, torch_name) in artifact.ST_DTYPES.items():
        dtype = getattr(torch, torch_name.removeprefix("torch."), None)
        if dtype is None:  # an older torch: adapters in that dtype are refused
            assert name not in peft.ST_TORCH and name not in peft._DTYPES, name
            continue
        assert peft.ST_TORCH[name] is dtype and str(dtype) == torch_name, name
        assert torch.empty(0, dtype=dtype).element_size() == width == peft._DTYPES[name], name
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


# what each file of _bad_files gives: the header's tensor count, or the error message after "<path>: "
_HEADER_OUTCOMES = {
    "good": 1,
    "empty": 0,
    "meta not strings": "corrupt safetensors header (__metadata__ must map strings to strings)",
    "not an object": "corrupt safetensors header",
    "bad dtype": "tensor 'x' has unsupported dtype 'F128'",
    "dtype not a string": "tensor 'x' has unsupported dtype ['F32']",
    "bad shape": "corrupt safetensors entry for 'x' (offsets/shape)",
    "negative offset": "corrupt safetensors entry for 'x' (offsets/shape)",
    "no offsets": "corrupt safetensors entry for 'x' (offsets/shape)",
    "size mismatch": "tensor 'x': shape [3] does not match its byte size",
    "gap": "corrupt safetensors file (gap in the data before 'x')",
    "overlap": "tensors 'y' and another overlap",
    "padded": "truncated or padded safetensors file (data size mismatch)",
    "past the end": "corrupt safetensors entry for 'x' (offsets/shape)",
    "short": "truncated safetensors file (no header)",
    "huge length": "corrupt safetensors header (length 1099511627776 > file size)",
    "not utf-8": "corrupt safetensors header (not JSON: not UTF-8 text)",
    "not json": "corrupt safetensors header (not JSON: Expecting property name enclosed in double quotes",
    "duplicate keys": "corrupt safetensors header (not JSON: duplicate key 'a')",
    "nested": "corrupt safetensors header (not JSON: nested too deeply)",
    "missing": "cannot read (",
    "a folder": "cannot read (",
}


def test_header_checks_raise_each_readers_error(tmp_path):
    from lorazip.artifact import HeaderReader, read_header
    from lorazip.io.peft import SafetensorsReader, parse_safetensors

    readers = [(read_header, ArtifactError), (parse_safetensors, AdapterFormatError),
               (lambda p: HeaderReader(p).header, ArtifactError),
               (lambda p: SafetensorsReader(p).header, AdapterFormatError),
               (lambda p: SafetensorsReader(p, ArtifactError).header, ArtifactError)]
    paths = _bad_files(tmp_path)
    assert sorted(p.name.removesuffix(".safetensors") for p in paths) == sorted(_HEADER_OUTCOMES)
    for path in paths:
        want = _HEADER_OUTCOMES[path.name.removesuffix(".safetensors")]
        for read, error in readers:
            if isinstance(want, int):
                got = read(path)
                header = got[0] if isinstance(got, tuple) else got
                assert len(header) == want, path.name
                continue
            with pytest.raises(error) as info:
                read(path)
            assert type(info.value) is error, path.name
            assert str(info.value).startswith(f"{path}: {want}"), (path.name, str(info.value))
    header, meta, start = read_header(tmp_path / "good.safetensors")
    assert (header, meta) == ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, {"a": "b"})
    assert start == (tmp_path / "good.safetensors").stat().st_size - 8
    assert parse_safetensors(tmp_path / "good.safetensors") == (header, meta, start)


def test_verify_names_sources_as_load_collection_does(tmp_path):
    from lorazip.io.collection import resolve_sources
    from lorazip.io.files import resolve_sources as plain_resolve_sources

    assert resolve_sources is plain_resolve_sources  # lorazip.verify names sources with this one too
    mod = {"q": (4, 4)}
    for rel in ("one/a", "one/b", "two/a", "two/deep/b", "solo", "x/ckpt/inner"):
        write_adapter(tmp_path / rel, mod, r=2, seed=len(rel))
    (tmp_path / "two" / "loop").symlink_to(tmp_path / "two")
    t = tmp_path
    cases = [
        (t / "solo", [("solo", "solo")]),
        ([t / "one", t / "two"], [("one--a", "one/a"), ("one--b", "one/b"), ("two--a", "two/a"),
                                  ("two--deep--b", "two/deep/b")]),
        ([t / "one" / "a", t / "two" / "a"], [("one--a", "one/a"), ("two--a", "two/a")]),
        (str(t / "x"), [("inner", "x/ckpt/inner")]),
        ([t / "one", t / "one" / "a"], f"{t}/one/a: the same adapter is listed twice (also as {t}/one/a)"),
        ([t / "nope"], f"{t}/nope: no such file or directory"),
        ([t / "solo" / "adapter_config.json"],
         f"{t}/solo/adapter_config.json: not a folder (give an adapter folder or a folder of adapters)"),
        ([t / "one" / "a", t / "one" / "a"], f"{t}/one/a: the same adapter is listed twice (also as {t}/one/a)"),
        ([t / "one", t / "two" / "deep"], [("a", "one/a"), ("one--b", "one/b"), ("deep--b", "two/deep/b")]),
    ]
    for sources, want in cases:
        try:
            got = [(name, str(d.relative_to(t))) for name, d, prov in resolve_sources(sources) if prov == {}]
        except SourceError as exc:
            got = str(exc)
        assert got == want, sources
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no adapter folders"):
        resolve_sources(empty)


def test_verify_checks_source_files_by_name(made, tmp_path):
    import shutil

    rep = lorazip.verify(made["art"], made["src"])
    assert rep["ok"] and rep["problems"] == [] and rep["not_checked"] == []
    assert {f["adapter"] for f in rep["files"]} == set(lorazip.load_artifact(made["art"]).names)
    copy = tmp_path / "src"
    shutil.copytree(made["src"], copy)
    name = sorted(p.name for p in copy.iterdir())[0]
    (copy / name / "adapter_model.safetensors").write_bytes(b"changed")
    rep = lorazip.verify(made["art"], copy / name)
    assert not rep["ok"] and len(rep["problems"]) == 1
    assert rep["problems"][0].endswith("adapter_model.safetensors: sha256 differs from the file compressed into the artifact")


def test_a_signal_during_the_torch_import_waits_for_it():
    """SIGINT arriving while a command imports torch is held until the import is done (raised
    inside torch's C++ start-up it aborted the process: pybind11 terminate, exit -6)."""
    code = textwrap.dedent(
        """
        import builtins, os, signal, sys
        from lorazip.cli.main import _load_torch
        real = builtins.__import__
        def importing(name, *args, **kw):
            if name == "torch" and "torch" not in sys.modules:
                os.kill(os.getpid(), signal.SIGINT)  # arrives just as the import starts
            return real(name, *args, **kw)
        builtins.__import__ = importing
        try:
            _load_torch()
        except KeyboardInterrupt:
            print("interrupted after import:", "torch" in sys.modules and hasattr(sys.modules["torch"], "Tensor"))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "interrupted after import: True", (res.stdout, res.stderr)
