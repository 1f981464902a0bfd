"""Compression on a Ray cluster: one task per module, the same artifact byte for byte.

Each test starts what it needs on this machine (``ray.init(num_cpus=2)`` in this process, or the
CLI's own local instance in a subprocess) and stops it, so CI needs no Ray service. The driver
and the workers run one torch thread (conftest; each Ray task), as ``LORAZIP_THREADS=1`` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import lorazip
from helpers import assert_one_error_line, run_cli, write_collection

ROOT = Path(__file__).resolve().parents[1]
FORTUNES = ROOT / "examples" / "fortunes" / "adapters"
# m.h: d_out 3 < rank, so that side is kept whole (the one-side path); m.o: 16 x 16
MODULES = {"m.q": (24, 16), "m.v": (12, 16), "m.o": (16, 16), "m.h": (3, 20)}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance in this process for the module's tests, stopped after them."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # pragma: no cover - someone else's instance
        pytest.skip("Ray is already initialised in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=200 * 2**20,
             logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-coll")
    write_collection(root, n=7, modules=MODULES, r=4, seed=3)
    return lorazip.load_collection(root)


def _bytes(art, path: Path) -> bytes:
    art.save(path, overwrite=True)
    return path.read_bytes()


CASES = {
    "rank": dict(rank=6),
    "jd-diag": dict(rank=3, method="jd-diag"),
    "svd": dict(rank=2, method="svd"),
    "int8": dict(rank=4, storage_dtype="int8"),
    "clusters": dict(rank=3, clusters=2),
    "per-module-clusters": dict(rank=3, clusters=2, per_module_clusters=True),
    "budget": dict(budget=9000),
    "target-error": dict(target_error=0.2, target_stat="max"),
    "budget-jd-diag": dict(budget=9000, method="jd-diag"),
    "memory-limit": dict(rank=4, memory_limit=3000),  # every module streams, 1-2 adapters a chunk
    "clusters-auto": dict(rank=3, clusters="auto", target_error=0.3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ray_artifact_is_byte_identical_to_single_process(cluster, coll, tmp_path, case):
    from lorazip.compress.executor import RayExecutor

    kw = CASES[case]
    local = _bytes(lorazip.compress(coll, **kw), tmp_path / "local.safetensors")
    with RayExecutor() as ex:
        remote = _bytes(lorazip.compress(coll, executor=ex, **kw), tmp_path / "ray.safetensors")
        rep = ex.report()
    assert remote == local  # the sources' sha256 included: hashed by the workers (below), not the driver
    assert rep["tasks"] >= len(coll.modules)
    assert sum(w["tasks"] for w in rep["workers"]) == rep["tasks"]
    assert all(w["busy_s"] > 0 for w in rep["workers"])
    assert sum(w.get("hash_s", 0.0) for w in rep["workers"]) > 0


def test_source_hashes_not_computed_by_a_worker_are_computed_here(coll):
    """A file no task hashed (a run stopped before its map) gets its sha256 on the driver when asked."""
    from lorazip.compress.provenance import SourceHashes
    from lorazip.io.files import sha256_file

    class Never:  # an executor whose map never runs
        def hash_sources(self, hashes):
            self.hashes = hashes

    ex = Never()
    h = SourceHashes(coll, True, ex)
    files = [f for a in coll.adapters for f in a.files()]
    assert ex.hashes is h and h.pending() == files
    h.put(files[0], "x" * 64)
    assert h.get(files[0]) == "x" * 64 and h.get(files[1]) == sha256_file(files[1])
    assert SourceHashes(coll, False, ex).get(files[0]) is None


def test_progress_is_fed_by_completed_tasks(cluster, coll):
    from lorazip.compress.executor import RayExecutor

    seen = []
    with RayExecutor(workers=2) as ex:  # on a running instance: at most 2 tasks at once
        lorazip.compress(coll, rank=4, executor=ex, progress=lambda done, total, item: seen.append((done, total, item)))
    assert [d for d, _, _ in seen] == list(range(1, len(coll.modules) + 1))
    assert {t for _, t, _ in seen} == {len(coll.modules)}
    assert sorted(i for _, _, i in seen) == sorted(m.name for m in coll.modules)


def test_a_memory_limit_no_node_can_give_is_an_error_not_a_hang(cluster, coll):
    from lorazip.compress.executor import RayExecutor

    with RayExecutor() as ex, pytest.raises(lorazip.ClusterError, match="largest node offers"):
        lorazip.compress(coll, rank=4, executor=ex, memory_limit=1 << 50)


def test_sources_a_worker_cannot_see_are_one_clear_error(cluster, tmp_path):
    from lorazip.compress.executor import RayExecutor

    write_collection(tmp_path / "src", n=3, modules=MODULES, r=4, seed=1)
    coll = lorazip.load_collection(tmp_path / "src")
    (tmp_path / "src").rename(tmp_path / "elsewhere")  # as on a worker without the shared filesystem
    with RayExecutor() as ex, pytest.raises(lorazip.SourceError) as exc:
        lorazip.compress(coll, rank=4, executor=ex, hash_sources=False)
    msg = str(exc.value)
    assert "\n" not in msg and "cannot see" in msg and "shares with the driver" in msg
    assert str(tmp_path / "src") in msg


def test_without_ray_installed_ray_is_one_line(monkeypatch, capsys, tmp_path):
    write_collection(tmp_path / "src", n=2, modules={"m.q": (8, 8)}, r=2, seed=0)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, find_spec says not installed
    out = tmp_path / "out.lorazip.safetensors"
    rc, stdout, err = run_cli(capsys, "compress", tmp_path / "src", "-o", out, "--rank", "2", "--ray")
    assert rc == 1 and stdout == ""
    assert_one_error_line(err, "pip install 'lorazip[ray]'")
    assert not out.exists()
    with pytest.raises(lorazip.OptionError, match=r"pip install 'lorazip\[ray\]'"):
        lorazip.RayExecutor()


def _busy_workers() -> list[int]:
    """Ray worker processes running one of lorazip's tasks now (their title is ray::lorazip:...)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::lorazip:") and d.stat().st_uid == os.getuid():
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray workers through /proc")
def test_a_worker_killed_mid_run_is_retried_and_the_artifact_is_identical(cluster, tmp_path):
    from lorazip.compress.executor import RayExecutor

    modules = {f"layer{i}.q": (96, 64) for i in range(8)}
    write_collection(tmp_path / "src", n=60, modules=modules, r=8, seed=5)
    coll = lorazip.load_collection(tmp_path / "src")
    kw = dict(rank=12, tol=1e-9, max_iters=300)
    local = _bytes(lorazip.compress(coll, **kw), tmp_path / "local.safetensors")
    killed: list[int] = []

    def kill_one(done, total, item):  # on the first completed task, one still running is killed
        deadline = time.monotonic() + 10
        while not killed and time.monotonic() < deadline:
            busy = _busy_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
                break
            time.sleep(0.01)

    with RayExecutor(max_retries=3) as ex:
        art = lorazip.compress(coll, executor=ex, progress=kill_one, **kw)
        rep = ex.report()
    assert killed, "no busy Ray worker was found to kill"
    assert _bytes(art, tmp_path / "ray.safetensors") == local
    assert rep["tasks_by_phase"]["modules"] == len(modules)  # every module once: the killed one was retried


@pytest.mark.slow
def test_cli_ray_starts_a_local_instance_and_writes_the_same_artifact(tmp_path, capsys):
    """`lorazip compress --ray --workers 2 --budget` in a fresh process (its own local Ray instance,
    stopped at the end) against the single-process run, on the bundled adapters."""
    pytest.importorskip("ray")
    if not FORTUNES.is_dir():
        pytest.skip("bundled adapters not found")
    before = _raylets()
    local, remote = tmp_path / "local.lorazip.safetensors", tmp_path / "ray.lorazip.safetensors"
    args = ["compress", FORTUNES, "--budget", "3MB", "--max-rank", "8"]
    env = {**os.environ, "LORAZIP_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lorazip.cli.main", *map(str, args), "-o", str(remote), "--ray",
                           "--workers", "2", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)  # stdout holds the report alone
    rc, _, err = run_cli(capsys, *args, "-o", local)
    assert rc == 0, err
    assert remote.read_bytes() == local.read_bytes()
    ray_rep = rep["ray"]
    assert ray_rep["address"] == "local" and ray_rep["cluster_cpus"] == 2
    n_mod = len(lorazip.load_collection(FORTUNES).modules)
    assert ray_rep["tasks_by_phase"] == {"fit": n_mod, "build": n_mod}  # both passes of the allocator
    assert 1 <= len(ray_rep["workers"]) <= 2
    for w in ray_rep["workers"]:
        assert w["tasks"] > 0 and w["busy_s"] > 0 and {"read_s", "solve_s"} <= set(w)
    assert "ray (local, 2 CPUs)" in proc.stderr
    time.sleep(0.5)
    assert not [p for p in _raylets() if p not in before], "the CLI left its Ray instance running"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray workers through /proc")
def test_interrupting_the_driver_leaves_no_artifact_and_no_ray_instance(tmp_path):
    pytest.importorskip("ray")
    modules = {f"layer{i}.q": (96, 64) for i in range(40)}
    write_collection(tmp_path / "src", n=60, modules=modules, r=8, seed=2)
    out = tmp_path / "out.lorazip.safetensors"
    before = _raylets()
    proc = subprocess.Popen([sys.executable, "-m", "lorazip.cli.main", "compress", str(tmp_path / "src"), "-o",
                             str(out), "--rank", "12", "--tol", "1e-9", "--ray", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LORAZIP_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not _busy_workers() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    time.sleep(0.5)
    assert not [p for p in _raylets() if p not in before], "the interrupted CLI left its Ray instance running"


def _raylets() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"raylet" in (d / "cmdline").read_bytes().split(b"\0")[0]:
                    out.append(int(d.name))
            except OSError:
                continue
    return out



def test_clustered_rounds_keep_module_factors_in_the_object_store(cluster, coll, tmp_path):
    """Clustering visits every module several times (the start, each round of each start, the
    final cores, the errors): within ``cache_bytes`` each module is
    read once (its first task leaves the factors in Ray's object store for the later rounds and
    the final errors), with no cache once per task; the artifact is the same byte for byte."""
    from lorazip.compress.executor import RayExecutor

    kw = dict(rank=3, clusters=2, max_rounds=4)
    local = _bytes(lorazip.compress(coll, **kw), tmp_path / "local.safetensors")
    got = {}
    for cache in (2 << 30, 0):
        with RayExecutor() as ex:
            art = lorazip.compress(coll, executor=ex, cache_bytes=cache, **kw)
            got[cache] = (_bytes(art, tmp_path / f"ray{cache}.safetensors"), ex.report())
    assert got[2 << 30][0] == local and got[0][0] == local
    kept, every = got[2 << 30][1], got[0][1]
    phases = every["tasks_by_phase"]
    assert phases["start_module"] == phases["final_cores"] == phases["finish"] == len(coll.modules)
    assert phases["round_step"] >= 3 * len(coll.modules)  # n_init = 3 starts, a round or more each
    assert every["module_reads"] == every["tasks"]  # every task read its module
    assert kept["module_reads"] == len(coll.modules)  # once each
    assert sum(w.get("module_reads", 0) for w in kept["workers"]) == len(coll.modules)
