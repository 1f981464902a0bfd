"""A fresh install has only the core dependencies: the package must work with nothing else.

The check runs in a subprocess whose ``sys.meta_path`` hides every top-level module that is
neither the standard library nor provided by ``[project].dependencies`` of ``pyproject.toml``
(and what those require in turn). Whatever a developer installed by hand (test extras, matplotlib,
transformers, ...) is then invisible, as on a fresh machine. This is the test that would have
caught ``array_api_compat`` being declared only in the ``cupy`` extra.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import write_collection

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("tomllib")

# Runs in the subprocess: install the hiding finder, then do what a user does.
_PRELUDE = textwrap.dedent(
    r'''
    import re, sys, tomllib
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires
    from packaging.requirements import Requirement

    def _norm(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    meta = tomllib.load(open(PYPROJECT, "rb"))["project"]
    todo = [Requirement(d).name for d in meta["dependencies"]]
    closure = set()
    while todo:
        name = _norm(todo.pop())
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for spec in reqs:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    allowed = set(sys.stdlib_module_names) | {"lorazip", "_distutils_hack", "__editable___lorazip_0_1_0_finder"}
    for top, dists in packages_distributions().items():
        if any(_norm(d) in closure for d in dists):
            allowed.add(top)
    HIDDEN = sorted({top for top in packages_distributions() if top not in allowed})

    class HideNonCore:
        """Refuse every top-level module that a fresh install of the core dependencies lacks."""

        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top not in allowed and not top.startswith("_"):
                raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency)", name=name)
            return None

    for mod in [m for m in sys.modules if m.partition(".")[0] in HIDDEN]:
        del sys.modules[mod]
    sys.meta_path.insert(0, HideNonCore())
    '''
)


def _run(script: str) -> subprocess.CompletedProcess:
    code = f"PYPROJECT = {str(ROOT / 'pyproject.toml')!r}\n" + _PRELUDE + textwrap.dedent(script)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_the_finder_hides_what_is_not_a_core_dependency():
    proc = _run(
        """
        import json
        for name in ("hypothesis", "pytest"):
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise SystemExit(f"{name} is visible")
        import numpy, torch, safetensors, typer, rich, scipy, huggingface_hub  # core: visible
        print(json.dumps(HIDDEN))
        """
    )
    assert proc.returncode == 0, proc.stderr
    hidden = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "hypothesis" in hidden and "pytest" in hidden


def test_every_module_imports_and_compress_runs_with_core_dependencies_only(tmp_path):
    write_collection(tmp_path / "src", n=3)
    out = tmp_path / "out.lorazip.safetensors"
    proc = _run(
        f"""
        import importlib, pkgutil
        import lorazip, lorazip.cli
        names = []
        for pkg in (lorazip, lorazip.cli):
            for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        assert "lorazip.solvers.jd_full" in names and "lorazip.cli.main" in names, names
        from lorazip.cli.main import main
        for argv in (["compress", {str(tmp_path / 'src')!r}, "-o", {str(out)!r}, "--rank", "2"],
                     ["compress", {str(tmp_path / 'src')!r}, "-o", {str(out)!r}, "--target-error", "0.3", "--overwrite"],
                     ["eval", {str(out)!r}, {str(tmp_path / 'src')!r}],
                     ["info", {str(out)!r}],
                     ["export", {str(out)!r}, {str(tmp_path / 'exported')!r}],
                     ["verify", {str(out)!r}, {str(tmp_path / 'src')!r}]):
            rc = main(argv)
            assert rc == 0, (argv, rc)
        print("ok", len(names))
        """
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("ok")
    assert out.is_file() and (tmp_path / "exported" / "a0" / "adapter_model.safetensors").is_file()


def test_an_optional_extra_missing_is_one_line_naming_it(tmp_path):
    write_collection(tmp_path / "src", n=2)
    proc = _run(
        f"""
        from lorazip.cli.main import main
        rc = main(["analyze", {str(tmp_path / 'src')!r}, "--ranks", "1,2", "--plot", {str(tmp_path / 'a.png')!r}])
        raise SystemExit(rc)
        """
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error:") and "pip install 'lorazip[plot]'" in lines[-1], proc.stderr
    assert not (tmp_path / "a.png").exists()
