"""Where per-module work runs: in this process, or as Ray tasks on a cluster (``lorazip[ray]``).

Every module of a collection is solved on its own, so compression maps one task over the
modules. A task is a module-level function ``fn(collection, *args, clock)`` of picklable
arguments (the collection's adapter descriptions, not their tensors; a module index; settings)
that reads that module's factors from the sources itself and returns only small results (bases,
cores, errors, spectra, residual parts). :func:`map_modules` runs it in this process, in module
order and with the caller's read-ahead, or hands it to a :class:`RayExecutor`, which runs one Ray
task per module on the cluster's workers and yields results as they complete. The solve is the
same function either way, so an artifact built on Ray is byte-identical to the one built here
(with the same seed and one torch thread per process: each Ray task runs one thread).

The driver assembles and writes the artifact, as without Ray. Ray is imported only when a
:class:`RayExecutor` starts.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import time
from collections import defaultdict
from typing import Any, Callable, Container, Iterator, Sequence

from ..errors import ClusterError, LorazipError, OptionError, SourceError, first_line
from ..io.files import sha256_file

RAY_HINT = "pip install 'lorazip[ray]'"
CLOCK_KEYS = ("read_s", "solve_s", "error_s")  # what tasks add to the caller's clock (report: also hash_s)
COUNT_KEYS = ("module_reads",)  # counted by tasks, summed in the report


def map_modules(
    executor: "RayExecutor | None",
    fn: Callable[..., Any],
    collection,
    args: Sequence[tuple],
    *,
    labels: Sequence[str],
    clock: dict[str, float] | None = None,
    local: Callable[[int], dict[str, Any]] | None = None,
    memory: int | None = None,
    phase: str = "modules",
    held: dict[int, Any] | None = None,
    keep: Container[int] = (),
) -> Iterator[tuple[int, Any]]:
    """Yield ``(j, fn(collection, *args[j], clock=...))`` for every task ``j``.

    Without an executor the tasks run here in order, each given ``local(j)`` as extra keyword
    arguments (the caller's read-ahead of module factors) and ``clock`` itself. With one they
    run on its workers and come back as they complete; their clocks are added to ``clock``.
    ``memory``: bytes one task may use (a Ray resource request), ``labels``: what each task is.
    ``held``, ``keep``: module factors kept in Ray's object store (see :meth:`RayExecutor.map`;
    not used here, where the caller's ``local`` keeps them).
    """
    if executor is None:
        clk = clock if clock is not None else {}
        for j, a in enumerate(args):
            yield j, fn(collection, *a, clock=clk, **(local(j) if local is not None else {}))
        return
    yield from executor.map(fn, collection, args, labels=labels, clock=clock, memory=memory, phase=phase, held=held,
                            keep=keep)


def _module_task(collection, fn: Callable[..., Any], args: tuple, threads: int, files: Sequence = (),
                 factors: Any = None, keep: bool = False):
    """What a Ray worker runs: ``fn(collection, *args)`` with ``threads`` torch threads, timed, then
    the sha256 of ``files`` (its share of the sources' provenance). A source the worker cannot read
    becomes one clear :class:`SourceError`. Returns ``(result, stats, [(file, sha256), ...])``.

    ``factors`` (the module's factors, from Ray's object store) are given to ``fn`` as ``factors=``;
    with ``keep``, ``fn`` is asked for the factors it read (``keep=True``: it returns ``(result,
    factors)``) and they come back as a second return value, to stay in the object store."""
    import torch

    torch.set_num_threads(threads)
    host = socket.gethostname()
    _check_visible(collection, host, every=False)
    clock: dict[str, float] = {}
    kw: dict[str, Any] = {}
    if factors is not None:
        kw["factors"] = factors
    if keep:
        kw["keep"] = True
    t0 = time.perf_counter()
    kept = None
    try:
        out = fn(collection, *args, clock=clock, **kw)
        if keep:
            out, kept = out
    except (LorazipError, OSError):
        _check_visible(collection, host, every=True)  # a missing file says so, not "cannot read tensors"
        raise
    t1 = time.perf_counter()
    try:
        digests = [(f, sha256_file(f)) for f in files]
    except OSError as exc:
        raise SourceError(f"Ray worker on {host} cannot read {exc.filename}: {exc.strerror}") from None
    if files:
        clock["hash_s"] = time.perf_counter() - t1
    stats = {"worker": f"{host}:{os.getpid()}", "busy_s": time.perf_counter() - t0, **clock}
    return ((out, stats, digests), kept) if keep else (out, stats, digests)


def _check_visible(collection, host: str, every: bool) -> None:
    adapters = collection.adapters if every else collection.adapters[:: max(len(collection.adapters) - 1, 1)]
    for a in adapters:
        if not os.path.exists(a.weights_file):
            raise SourceError(
                f"Ray worker on {host} cannot see {a.weights_file}: the adapters must be on a filesystem "
                "(or Hugging Face cache) that every worker shares with the driver, at the same path"
            )


class RayExecutor:
    """Run compression's per-module tasks on a Ray cluster (one task per module).

    Parameters
    ----------
    address : None (default) starts a local Ray instance with ``workers`` CPUs, shut down by
        :meth:`close`; "auto" or "HOST:PORT" joins a running cluster. If Ray is already
        initialised in this process, that instance is used and left running.
    workers : with a local instance, its CPUs (default: this machine's cores); otherwise at most
        this many tasks run at once (default: as many as the cluster has CPUs for).
    max_retries : how often a task whose worker process dies is run again (Ray task retries);
        a task that raises is not retried.

    Use it as a context manager (or call :meth:`close`) so a local instance is stopped::

        with RayExecutor() as ex:
            art = lorazip.compress(coll, rank=16, executor=ex)

    After a run, :meth:`report` gives per-worker timings.
    """

    def __init__(self, address: str | None = None, workers: int | None = None, *, max_retries: int = 3):
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise OptionError(f"workers must be a positive integer, got {workers!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise OptionError(f"max_retries must be a non-negative integer, got {max_retries!r}")
        if importlib.util.find_spec("ray") is None:  # before any work: the package is an extra
            raise OptionError(f"compressing on Ray needs the ray package: {RAY_HINT}")
        self.address, self.workers, self.max_retries = address, workers, max_retries
        self._ray = None
        self._owned = False  # this executor called ray.init (so close() calls ray.shutdown)
        self._local = False  # ... and started a local instance with ``workers`` CPUs
        self._remote = None
        self._refs: dict[int, tuple[Any, Any]] = {}  # id(collection) -> (collection, object ref)
        self._tasks: list[dict[str, Any]] = []
        self._cpus = None
        self._hashes = None  # source hashes the next map's tasks compute (SourceHashes)

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> "RayExecutor":
        """Start or join Ray (done by the first :meth:`map`)."""
        if self._ray is not None:
            return self
        try:
            import ray
        except ImportError:
            raise OptionError(f"compressing on Ray needs the ray package: {RAY_HINT}") from None
        if not ray.is_initialized():
            kw: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING)
            try:
                if self.address is None:  # on loopback, for this run only: Ray's start-up notices are noise
                    ray.init(num_cpus=self.workers or os.cpu_count() or 1, include_dashboard=False,
                             **{**kw, "logging_level": logging.ERROR})
                else:
                    ray.init(address=self.address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = "start a local Ray instance" if self.address is None else \
                    f"join the Ray cluster at {self.address}"
                raise ClusterError(f"cannot {where}: {first_line(exc)}") from None
            self._owned, self._local = True, self.address is None
        self._ray = ray
        self._remote = ray.remote(_module_task)
        self._cpus = int(ray.cluster_resources().get("CPU", 0))
        return self

    def close(self) -> None:
        """Release the collection's object refs; stop the local Ray instance if this executor started it."""
        self._refs.clear()
        if self._ray is not None and self._owned:
            self._ray.shutdown()
        self._ray, self._remote, self._owned, self._local = None, None, False, False

    def __enter__(self) -> "RayExecutor":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- tasks --------------------------------------------------------------------------------

    def hash_sources(self, hashes) -> None:
        """Have the tasks of the next :meth:`map` compute ``hashes``' source digests, an even share
        each after its module, instead of the driver reading every file a second time."""
        self._hashes = hashes

    def map(self, fn, collection, args: Sequence[tuple], *, labels: Sequence[str],
            clock: dict[str, float] | None = None, memory: int | None = None,
            phase: str = "modules", held: dict[int, Any] | None = None,
            keep: Container[int] = ()) -> Iterator[tuple[int, Any]]:
        """Yield ``(j, result)`` of ``fn(collection, *args[j])`` as the Ray tasks complete (see
        :func:`map_modules`). Pending tasks are cancelled if the caller stops early or fails.

        ``held``: module factors kept in Ray's object store (refs by task): task ``j`` gets
        ``held[j]`` as ``fn(..., factors=)``. Each task ``j`` in ``keep`` without one returns the
        factors it read (``fn(..., keep=True)``) and ``held[j]`` is set to their ref, so a later map
        over the same modules does not read them again. Drop the refs to free the store."""
        self.start()
        ray = self._ray
        errors = ray.exceptions
        ref = self._collection_ref(collection)
        opts: dict[str, Any] = dict(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        if memory:
            self._check_memory(int(memory))
            opts["memory"] = int(memory)
        cap = self.workers if (self.workers and not self._local) else len(args)  # a local instance has its CPUs
        todo = list(range(len(args)))[::-1]
        pending: dict[Any, tuple[int, float]] = {}
        hashes, self._hashes = self._hashes, None
        files = hashes.pending() if hashes is not None else []
        share = [files[j :: len(args)] for j in range(len(args))] if args else []

        def submit() -> None:
            while todo and len(pending) < max(cap, 1):
                j = todo.pop()
                have = held.get(j) if held is not None else None
                keeping = held is not None and have is None and j in keep
                task = self._remote.options(name=f"lorazip:{phase}:{labels[j]}", num_returns=2 if keeping else 1,
                                            **opts)
                r = task.remote(ref, fn, args[j], 1, share[j], have, keeping)
                if keeping:
                    r, held[j] = r
                pending[r] = (j, time.perf_counter())

        try:
            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for r in ready:
                    j, t_submit = pending.pop(r)
                    try:
                        out, stats, digests = ray.get(r)
                    except errors.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, LorazipError):
                            raise cause from None
                        raise
                    except errors.WorkerCrashedError as exc:
                        raise ClusterError(f"{labels[j]}: the Ray worker running it died "
                                           f"{self.max_retries + 1} times ({first_line(exc)})") from None
                    except errors.RayError as exc:
                        raise ClusterError(f"{labels[j]}: Ray could not run it ({first_line(exc)})") from None
                    for f, digest in digests:
                        hashes.put(f, digest)
                    self._record(phase, labels[j], stats, time.perf_counter() - t_submit, clock)
                    submit()
                    yield j, out
        finally:
            # A run that stops early (interrupted, failed) leaves tasks behind. An instance this
            # executor started is shut down by close(), which ends them. On a joined cluster they
            # are cancelled without force: a forced cancel kills the worker, and a reply racing the
            # kill aborts the driver inside Ray ("Tried to complete task that was not pending").
            if not self._owned:
                for r in pending:
                    try:
                        ray.cancel(r, force=False)
                    except Exception:  # noqa: BLE001 - best effort: the task may have finished meanwhile
                        pass

    def _check_memory(self, memory: int) -> None:
        """A task asking for more memory than any node has would wait forever: say so instead."""
        largest = max((node.get("Resources", {}).get("memory", 0) for node in self._ray.nodes() if node.get("Alive")),
                      default=0)
        if memory > largest:
            raise ClusterError(f"each task asks Ray for the memory limit, {memory / 2**30:.2f} GiB, but the largest "
                               f"node offers {largest / 2**30:.2f} GiB: lower the memory limit")

    def _collection_ref(self, collection):
        got = self._refs.get(id(collection))
        if got is None or got[0] is not collection:
            got = (collection, self._ray.put(collection))  # the adapters' descriptions, not their tensors
            self._refs[id(collection)] = got
        return got[1]

    def _record(self, phase: str, label: str, stats: dict[str, Any], latency: float, clock) -> None:
        self._tasks.append({"phase": phase, "task": label, "latency_s": latency, **stats})
        if clock is not None:
            for key in CLOCK_KEYS:
                if key in stats:
                    clock[key] = clock.get(key, 0.0) + stats[key]

    # -- report -------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Per-worker timings of the tasks run so far: tasks, busy seconds (and, where the task
        measured them, seconds reading, solving and measuring errors), plus totals."""
        per: dict[str, dict[str, float]] = defaultdict(lambda: {"tasks": 0, "busy_s": 0.0})
        for t in self._tasks:
            w = per[t["worker"]]
            w["tasks"] += 1
            for key in ("busy_s", *CLOCK_KEYS, "hash_s", *COUNT_KEYS):
                if key in t:
                    w[key] = w.get(key, 0.0) + t[key]
        phases: dict[str, int] = defaultdict(int)
        for t in self._tasks:
            phases[t["phase"]] += 1
        return {
            "address": self.address or "local",
            "cluster_cpus": self._cpus,
            "workers_option": self.workers,
            "max_retries": self.max_retries,
            "tasks": len(self._tasks),
            "tasks_by_phase": dict(phases),
            "busy_s": sum(t["busy_s"] for t in self._tasks),
            "module_reads": sum(t.get("module_reads", 0) for t in self._tasks),
            "workers": [{"worker": k, **v} for k, v in sorted(per.items())],
        }
