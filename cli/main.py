"""The ``lorazip`` command line: parses options, calls the library, prints results.

Progress and tables go to stderr (rich); ``--json`` prints one machine-readable report
alone on stdout. A :class:`~lorazip.errors.LorazipError` becomes one ``error:`` line and
exit status 1; Ctrl-C prints one line and exits 130; anything else is a bug and keeps
its traceback.

Importing this module loads typer, click and rich only: each command imports the parts of
lorazip it runs, so ``--help``, usage errors, ``info`` and ``verify`` never load torch (or numpy), and
``export`` loads numpy only (torch only for an artifact its NumPy reader does not know).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import click
import typer

try:  # newer typer vendors its own click; its exceptions are not click's
    from typer._click.exceptions import ClickException as _TyperClickException
except ImportError:  # pragma: no cover - older typer uses click itself
    _TyperClickException = click.exceptions.ClickException
_TyperAbort = getattr(typer, "Abort", click.exceptions.Abort)
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import lorazip  # cheap: its public names are imported on first use
from lorazip.errors import LorazipError

from . import report as fmt

app = typer.Typer(
    name="lorazip",
    help="Jointly compress collections of LoRA adapters into shared bases plus small per-adapter cores.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
_threads: int | None = None  # LORAZIP_THREADS, read by main()


def _torch_threads() -> None:
    """Apply LORAZIP_THREADS to torch if it is loaded."""
    if _threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(_threads)


def _load_torch() -> None:
    """Import torch (first thing in each command that computes; the others never load it) with
    SIGINT and SIGTERM held back: a KeyboardInterrupt raised inside torch's C++ start-up aborts
    the process (pybind11 ``terminate``) instead of exiting 130 with one line. A signal that
    arrives meanwhile is delivered as soon as the import is done. Then applies LORAZIP_THREADS."""
    import signal

    if "torch" not in sys.modules:
        held = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if hasattr(signal, "pthread_sigmask") else None
        try:
            import torch  # noqa: F401
        finally:
            if old is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    _torch_threads()


def _hash_early(sources: list[Path]) -> None:
    """Start hashing local adapters' files (the artifact records their sha256) while torch loads, on
    the core its import leaves idle, rather than beside the solver. Sources that do not resolve are
    left to the load, which reports them."""
    from lorazip.io.files import CONFIG_NAME, WEIGHTS_NAME, hash_early, resolve_sources

    if not sources:  # the load says what is missing
        return
    try:
        found = resolve_sources(sources)
    except lorazip.LorazipError:
        return
    hash_early([d / name for _, d, _ in found for name in (CONFIG_NAME, WEIGHTS_NAME)])


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err, transient=True, disable=not err.is_terminal,
    )


def _emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


HUB_HELP = "Hub sources"
_author = typer.Option(None, "--hub-author", help="Hub: every model repo of this author/org ...", rich_help_panel=HUB_HELP)
_search = typer.Option(None, "--hub-search", help="... whose name contains this text.", rich_help_panel=HUB_HELP)
_collection = typer.Option(None, "--hub-collection", help="Hub: the model repos of a collection (slug).", rich_help_panel=HUB_HELP)
_list = typer.Option(None, "--hub-list", help="Text file of repo ids, one org/name[@rev] per line.", rich_help_panel=HUB_HELP)
_token = typer.Option(None, "--token", help="Hub token (default: HF_TOKEN or saved login).", rich_help_panel=HUB_HELP)
_skip = typer.Option(False, "--skip-failed", help="Skip repos that fail to download; list them.", rich_help_panel=HUB_HELP)
_workers = typer.Option(8, "--workers", help="Repos downloaded in parallel.", rich_help_panel=HUB_HELP)
_offline = typer.Option(False, "--offline", help="Use the Hub cache only (like HF_HUB_OFFLINE=1).", rich_help_panel=HUB_HELP)
RAY_HELP = "Ray cluster (needs lorazip[ray])"
_compress_workers = typer.Option(
    None, "--workers", help="Hub repos downloaded in parallel (default 8); with --ray, also the local Ray "
    "instance's CPUs (default: the cores), or with --ray-address at most this many module tasks at once.",
    rich_help_panel=RAY_HELP,
)


def _gather(sources, hub_author, hub_search, hub_collection, hub_list, token, skip_failed, workers, offline):
    from huggingface_hub.utils import logging as hf_logging

    from lorazip.io.sources import gather_sources

    hf_logging.set_verbosity_error()  # lorazip reports failures itself, one line each
    with _progress() as bar:
        task = bar.add_task("downloading", total=None, item="")
        got = gather_sources(
            [str(s) for s in sources or []], hub_author=hub_author, hub_search=hub_search,
            hub_collection=hub_collection, hub_list=hub_list, token=token, skip_failed=skip_failed,
            max_workers=workers, offline=offline or None,
            progress=lambda done, total: bar.update(task, completed=done, total=total, item="repos"),
        )
    for repo, why in got.skipped:
        err.print(f"skipped {escape(repo)}: {escape(why)}", highlight=False)
    return got


# options of `lorazip compress` whose help runs over a line
_SOURCES = typer.Argument(
        None, help="Adapter folders, folders of adapter folders, or Hub repo ids (org/name[@rev])."
    )
_RANK = typer.Option(
        None, "--rank", "-r", help="Shared rank per module, shared parts only (the paper's fixed-rank mode). "
        "Default: with no --budget / --target-error, a target mean error of 0.03 (about 99% of the adapters' "
        "task gain kept, docs/task_eval.md); rank 16 for --method jd-diag / svd, and for finding the groups of "
        "--clusters (the target's allocation then chooses shared ranks and residuals on them).")
_DTYPE = typer.Option(
        "auto", "--dtype", help="Storage dtype: auto (the adapters' own; with --budget/--target-error int8 where "
        "that does better) | float32 | float16 | bfloat16 | int8 (per-row int8 with one scale per row: about half "
        "the bytes of float16)."
    )
_EXTRAS_DTYPE = typer.Option(
        "auto", "--extras-dtype", help="modules_to_save tensors (2+ dims): auto (stored as they came) | float32 | "
        "float16 | bfloat16 | int8; their error is reported apart."
    )
_CLUSTERS = typer.Option(
        None, "--clusters", "-k", help="K groups with their own bases (jd-clustered; with --budget/--target-error: their shared ranks and residuals allocated), or 'auto' with --target-error/--budget."
    )
_TARGET_ERROR = typer.Option(
        None, help="Mean per-adapter error to reach with the least storage (ranks, or K with --clusters auto)."
    )
_BUDGET = typer.Option(
        None, help="Artifact size limit (500MB, 2GiB, a ratio like 50x, or a share of the original bytes like 2%): ranks (or K with --clusters auto) are chosen to fit."
    )
_MEMORY_LIMIT = typer.Option(
        None, help="Memory for module factors (e.g. 4GB): a module needing more than a third streams from disk "
        "in chunks of adapters (jd-full, jd-diag); built rows beyond it are held in temporary files in TMPDIR "
        "(default: beyond a quarter of the available memory)."
    )
_CALIBRATION = typer.Option(
        None, "--calibration", help="Statistics from `lorazip calibrate`: minimise the error of each module's outputs "
        "on the calibration inputs instead of its weights (--budget / --target-error then bound that error)."
    )
_CALIBRATION_LAMBDA = typer.Option(
        None, "--calibration-lambda", help="Regulariser of the statistics, C + lambda mean(diag C) I (default 0.01)."
    )
_RAY = typer.Option(False, "--ray", help="One Ray task per module (a local instance unless --ray-address); "
                             "the workers read the adapters from a shared filesystem or HF cache.",
                             rich_help_panel=RAY_HELP)
_RAY_ADDRESS = typer.Option(None, "--ray-address", help="Join a running cluster: auto | HOST:PORT "
                                              "(implies --ray).", rich_help_panel=RAY_HELP)


@app.command()
def compress(
    sources: Optional[List[str]] = _SOURCES,
    output: Path = typer.Option(..., "-o", "--output", help="Artifact to write (.lorazip.safetensors)."),
    rank: Optional[int] = _RANK,
    method: str = typer.Option("jd-full", help="jd-full | jd-diag | svd (per-adapter baseline)."),
    weighting: str = typer.Option("relative", help="relative (each adapter counts equally) | absolute."),
    objective: str = typer.Option(
        "energy", help="How a budget or target weighs each adapter's modules: energy (its relative error "
        "over all its modules) | sqrt (each module by the square root of its energy) | module (every "
        "module alike; docs/task_eval.md)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    backend: str = typer.Option("torch", help="Array library of the jd-full solver: torch | numpy | cupy."),
    dtype: str = _DTYPE,
    compute_dtype: str = typer.Option("float32", help="Solver precision: float32 | float64 (errors always in float64)."),
    seed: int = typer.Option(0, help="Seed of the randomized initialisation."),
    max_iters: int = typer.Option(500, help="Maximum solver sweeps per module."),
    tol: float = typer.Option(1e-4, help="Stop when the bases move, or the captured energy grows, less than this."),
    base_model: Optional[str] = typer.Option(None, help="Override the base model check."),
    allow_pickle: bool = typer.Option(False, help="Also load adapter_model.bin (torch.load weights_only)."),
    no_extras: bool = typer.Option(False, "--no-extras", help="Do not store modules_to_save tensors."),
    extras_dtype: str = _EXTRAS_DTYPE,
    clusters: Optional[str] = _CLUSTERS,
    per_module_clusters: bool = typer.Option(False, help="Cluster each module separately (default: one group per adapter)."),
    max_rounds: int = typer.Option(30, help="Maximum fit/assign rounds of jd-clustered."),
    target_error: Optional[float] = _TARGET_ERROR,
    target_stat: str = typer.Option("mean", help="Which per-adapter error --target-error bounds: mean | max."),
    budget: Optional[str] = _BUDGET,
    max_rank: int = typer.Option(64, help="Largest rank considered by --budget / --target-error."),
    uniform_rank: bool = typer.Option(False, help="With --budget / --target-error: one rank for all modules."),
    memory_limit: Optional[str] = _MEMORY_LIMIT,
    calibration: Optional[Path] = _CALIBRATION,
    calibration_lambda: Optional[float] = _CALIBRATION_LAMBDA,
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    hub_author: Optional[str] = _author,
    hub_search: Optional[str] = _search,
    hub_collection: Optional[str] = _collection,
    hub_list: Optional[Path] = _list,
    token: Optional[str] = _token,
    skip_failed: bool = _skip,
    workers: Optional[int] = _compress_workers,
    offline: bool = _offline,
    ray: bool = _RAY,
    ray_address: Optional[str] = _RAY_ADDRESS,
) -> None:
    """Compress a collection of PEFT LoRA adapters (local or from the Hub) into one artifact."""
    if output.is_dir():
        raise lorazip.OutputError(f"{output}: is a folder; give the artifact's file path "
                                  f"(e.g. {output / 'collection.lorazip.safetensors'})")
    if output.exists() and not overwrite:
        raise lorazip.OutputError(f"{output}: already exists (pass --overwrite to replace it)")
    _writable(output)
    if not (ray or ray_address or hub_author or hub_search or hub_collection or hub_list):
        _hash_early(sources)
    _load_torch()
    from lorazip.compress import CompressOptions, compress as run_compress
    from lorazip.io.collection import load_collection

    from .parse import parse_size

    limit = parse_size(memory_limit, what="memory limit") if memory_limit is not None else None
    if rank is not None and (budget or target_error is not None) and clusters in (None, 1, "1"):
        # (the library takes the rank as the one clusters group the adapters at, and ignores it otherwise)
        raise lorazip.OptionError("--rank fixes the shared rank (shared parts only), while --budget / --target-error "
                                  "let the allocator choose the ranks: give one of them (--max-rank caps the ranks "
                                  "it tries)")
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise lorazip.OptionError(f"--workers must be at least 1, got {workers}")
    got = _gather(sources, hub_author, hub_search, hub_collection, hub_list, token, skip_failed, workers or 8,
                  offline)
    coll = load_collection(got.sources, base_model=base_model, allow_pickle=allow_pickle)
    t_load = time.perf_counter() - t0
    orig = sum(a.weights_file.stat().st_size for a in coll.adapters)
    opts = CompressOptions(
        rank=rank, budget=parse_size(budget, orig) if budget else None, target_error=target_error,
        target_stat=target_stat, method=method, clusters=clusters if clusters is not None else 1,
        per_module_clusters=per_module_clusters, max_rounds=max_rounds, uniform_rank=uniform_rank, max_rank=max_rank,
        storage_dtype=dtype, keep_extras=not no_extras, extras_dtype=extras_dtype, weighting=weighting,
        objective=objective, calibration_lambda=calibration_lambda, device=device, backend=backend, compute_dtype=compute_dtype, seed=seed,
        max_iters=max_iters, tol=tol, memory_limit=limit)
    opts.check_collection(len(coll))  # before the run says anything
    if opts.is_default_run:  # the library aims at the same target; said here once
        err.print(f"no --rank, --budget or --target-error: the least storage for mean error {opts.goal} "
                  "(about 99% of the adapters' task gain kept; --rank 16 is the paper's fixed-rank mode)")
    executor = _ray_executor(ray, ray_address, workers)
    try:
        art = _run_with_progress(
            "choosing K" if opts.clusters == "auto" else "allocating" if opts.allocates else "compressing",
            lambda progress: run_compress(coll, options=opts, progress=progress, executor=executor,
                                          calibration=str(calibration) if calibration is not None else None))
    finally:
        if executor is not None:
            executor.close()  # a local Ray instance stops here, also on an error or an interrupt
    t_solve = time.perf_counter() - t0 - t_load
    art.save(output, overwrite=overwrite)
    rep = _compress_report(art, coll, got, {"validate_s": t_load, "compress_s": t_solve,
                                            "total_s": time.perf_counter() - t0}, executor, budget)
    if as_json:
        _emit_json(rep)
    fmt.print_compress(err, rep, output)


def _ray_executor(ray: bool, address: Optional[str], workers: Optional[int]):
    """A started :class:`RayExecutor` for ``--ray`` / ``--ray-address``, else None."""
    if not ray and address is None:
        return None
    from lorazip.compress.executor import RayExecutor

    return RayExecutor(address=address, workers=workers).start()


def _run_with_progress(what: str, run):
    """``run(progress)`` under a progress bar titled ``what``."""
    with _progress() as bar:
        task = bar.add_task(what, total=None, item="")
        return run(lambda done, total, item: bar.update(task, completed=done, total=total, item=item))


def _compress_report(art, coll, got, timing: dict, executor, budget: Optional[str]) -> dict:
    """The report of ``lorazip compress``: the evaluation of the artifact with what was chosen and how."""
    from lorazip.artifact import extras_kept
    from lorazip.evaluate import evaluate

    rep = evaluate(art)
    rep["timing"] = timing
    rep["missing_modules"] = coll.missing_modules()
    rep["extras"] = coll.extras()
    rep["extras_kept"] = bool(extras_kept(art))
    rep["skipped"] = [{"repo": r, "reason": why} for r, why in got.skipped]
    if art.cluster_choice is not None:
        rep["k_selection"] = {**art.cluster_choice, "budget": budget}  # as given
    if art.allocation is not None:
        rep["rank_allocation"] = art.allocation
    if executor is not None:
        rep["ray"] = executor.report()
    return rep


@app.command()
def calibrate(
    base_model: str = typer.Argument(..., help="Base model: a transformers folder (save_pretrained) or a Hub id."),
    data: List[Path] = typer.Option(
        ..., "--data", help="Calibration text: a .txt file, a .jsonl file ({\"text\": ...} per line) or a folder "
        "of them (repeatable). Not the held-out text you evaluate on."
    ),
    output: Path = typer.Option(..., "-o", "--output", help="Statistics file to write (.safetensors)."),
    adapters: Optional[List[str]] = typer.Option(
        None, "--adapters", help="Adapters whose modules to calibrate (folders, as for compress; repeatable). "
        "Default: every Linear, Conv1D and Embedding module of the base model."
    ),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens (default: all)."),
    max_length: int = typer.Option(512, "--max-length", help="Tokens per window (documents are cut into windows)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Windows per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda."),
    allow_pickle: bool = typer.Option(False, help="Also read adapter_model.bin adapters (their module names only)."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON on stdout."),
) -> None:
    """Input statistics of the base model's modules on calibration text, for compress --calibration
    (docs/calibration.md; needs the eval extra: transformers)."""
    if output.exists() and not overwrite:
        raise lorazip.OutputError(f"{output}: already exists (pass --overwrite to replace it)")
    _writable(output)
    _load_torch()
    from lorazip.calibrate import calibrate as run_calibrate

    t0 = time.perf_counter()
    with _progress() as bar:
        task = bar.add_task("calibrating", total=None, item="")
        stats = run_calibrate(
            base_model, [str(d) for d in data], adapters=list(adapters) if adapters else None, max_tokens=max_tokens,
            max_length=max_length, batch_size=batch_size, device=device, allow_pickle=allow_pickle,
            progress=lambda done, total, item: bar.update(task, completed=done, total=total, item=item),
        )
    path = stats.save(output, overwrite=overwrite)
    meta = stats.meta
    n_tensors = len({e["tensor"] for e in meta["modules"].values()})
    summary = {"report_version": 1, "output": str(path), "bytes": path.stat().st_size, "sha256": stats.sha256,
               "base_model": meta["base_model"], "n_modules": len(meta["modules"]), "n_tensors": n_tensors,
               "n_documents": meta["n_documents"], "n_windows": meta["n_windows"], "n_tokens": meta["n_tokens"],
               "seconds": time.perf_counter() - t0}
    if as_json:
        _emit_json(summary)
    err.print(f"calibrated {summary['n_modules']} module(s) ({n_tensors} distinct input(s)) on {meta['n_tokens']:,} "
              f"tokens of {meta['n_documents']:,} document(s) in {summary['seconds']:.1f} s -> {escape(str(path))} "
              f"({summary['bytes'] / 1e6:.1f} MB)", highlight=False)


TASK_HELP = "Task-level evaluation (needs the eval extra: transformers, peft)"


def _task_eval(art, base_model, data, originals, max_texts, max_length, batch_size, device, allow_pickle, as_json):
    from lorazip import taskeval

    if base_model is None or data is None:
        raise lorazip.OptionError("task-level evaluation needs both --base-model and --data")
    with _progress() as bar:
        task = bar.add_task("evaluating", total=None, item="")
        rep = taskeval.evaluate_tasks(
            art, str(base_model), data, [str(o) for o in originals] if originals else None, max_texts,
            max_length=max_length, batch_size=batch_size, device=device, allow_pickle=allow_pickle,
            progress=lambda done, total, name: bar.update(task, completed=done, total=total, item=name),
        )
    if as_json:
        _emit_json(rep)
    err.print(taskeval.table(rep, title=f"lorazip eval {art.path} (task)"))
    for s in rep["skipped"]:
        err.print(f"skipped {escape(s['name'])}: {escape(s['reason'])}", highlight=False)


@app.command("eval")
def eval_(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    sources: Optional[List[Path]] = typer.Argument(None, help="Original adapters: recompute errors against them."),
    allow_pickle: bool = typer.Option(False, help="Also load adapter_model.bin sources."),
    top: int = typer.Option(10, help="Show this many worst adapters."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of the error distribution (adapters, modules); needs lorazip[plot]."),
    base_model: Optional[Path] = typer.Option(None, "--base-model", help="Task eval: base model folder (with --data).", rich_help_panel=TASK_HELP),
    data: Optional[Path] = typer.Option(None, "--data", help="Task eval: folder of <adapter>.jsonl held-out texts.", rich_help_panel=TASK_HELP),
    originals: Optional[List[Path]] = typer.Option(None, "--originals", help="Task eval: original adapter folders (default: SOURCES, else the recorded paths).", rich_help_panel=TASK_HELP),
    max_texts: Optional[int] = typer.Option(None, "--max-texts", help="Task eval: first N texts per adapter.", rich_help_panel=TASK_HELP),
    max_length: int = typer.Option(128, "--max-length", help="Task eval: truncate each text to this many tokens.", rich_help_panel=TASK_HELP),
    batch_size: int = typer.Option(16, "--batch-size", help="Task eval: texts per forward pass.", rich_help_panel=TASK_HELP),
    device: str = typer.Option("auto", "--device", help="Task eval: auto | cpu | cuda.", rich_help_panel=TASK_HELP),
) -> None:
    """Report reconstruction errors (recorded, or recomputed against SOURCES); with --base-model and
    --data, held-out loss of base / original / compressed adapters and retention (docs/task_eval.md)."""
    _load_torch()
    from lorazip.artifact import load_artifact
    from lorazip.evaluate import evaluate

    art = load_artifact(artifact)
    if base_model is not None or data is not None:
        if plot is not None:
            raise lorazip.OptionError("--plot draws reconstruction errors; it cannot be combined with --base-model/--data")
        _task_eval(art, base_model, data, originals or sources, max_texts, max_length, batch_size, device,
                   allow_pickle, as_json)
        return
    rep = evaluate(art, [str(s) for s in sources] if sources else None, allow_pickle=allow_pickle)
    if plot is not None:
        from lorazip.analyze import plot_eval

        plot_eval(art, plot, [str(s) for s in sources] if sources else None, allow_pickle=allow_pickle)
    if as_json:
        _emit_json(rep)
    fmt.print_summary(err, rep, title=f"lorazip eval {artifact}")
    fmt.print_notes(err, rep)
    fmt.print_worst(err, rep, top)
    if plot is not None:
        err.print(f"plot written to {escape(str(plot))}")


@app.command()
def info(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON on stdout."),
) -> None:
    """Describe an artifact: adapters, modules, ranks, method, bytes, ratio."""
    from lorazip.artifact import load_artifact  # the header only: no torch

    art = load_artifact(artifact)
    desc = fmt.describe(art)
    if as_json:
        _emit_json(desc)
    fmt.print_info(err, desc)


@app.command()
def export(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    outdir: Path = typer.Argument(..., help="Folder to write PEFT adapter folders into."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", "-a", help="Adapter name (repeatable; default all)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | float16 | bfloat16."),
    overwrite: bool = typer.Option(False, help="Replace existing adapter folders."),
    memory_limit: Optional[str] = typer.Option(
        None, help="Memory for the adapters being written (e.g. 2GB): they are built and written in chunks "
        "of about half of it (default: chunks of about 256 MiB)."),
    as_json: bool = typer.Option(False, "--json", help="Print the written folders as JSON on stdout."),
) -> None:
    """Export adapters back to standard PEFT folders (loadable by PEFT and vLLM)."""
    from lorazip.artifact import extras_kept, load_artifact
    from lorazip.export_core import Unsupported, export_numpy

    from .parse import parse_size

    limit = parse_size(memory_limit, what="memory limit") if memory_limit is not None else None
    art = load_artifact(artifact)
    empty: list[str] = []
    kw = dict(dtype=dtype, overwrite=overwrite, memory_limit=limit, empty=empty)
    try:  # NumPy and plain file reads: the same bytes as the torch export, without importing torch
        paths = export_numpy(art, outdir, adapter or None, **kw)
    except Unsupported:  # an artifact the NumPy reader does not know (raised before anything is written)
        _load_torch()
        from lorazip.export import export as run_export

        empty.clear()
        paths = run_export(art, outdir, adapter or None, **kw)
    written, kept = {p.name for p in paths}, extras_kept(art)
    dropped = [a["name"] for i, a in enumerate(art.meta["adapters"])
               if a.get("extras") and a["name"] in written and i not in kept]
    if as_json:
        _emit_json({"report_version": 1, "exported": [str(p) for p in paths], "zero": empty, "extras_left_out": dropped})
    err.print(f"exported {len(paths)} adapter(s) to {outdir}")
    if empty:
        err.print(f"note: {len(empty)} adapter(s) are stored at nothing in every module (a budget left them out, or their update is zero), "
                  f"exported as a zero LoRA that computes the base model: {fmt.names(empty)}")
    if dropped:
        err.print(f"note: {len(dropped)} adapter(s) had non-LoRA tensors (modules_to_save heads) that the artifact "
                  f"does not keep (compressed with --no-extras); their folders lack them, so PEFT keeps the base "
                  f"model's: {fmt.names(dropped)}")


@app.command()
def download(
    sources: Optional[List[str]] = typer.Argument(None, help="Hub repo ids (org/name[@rev])."),
    hub_author: Optional[str] = _author,
    hub_search: Optional[str] = _search,
    hub_collection: Optional[str] = _collection,
    hub_list: Optional[Path] = _list,
    token: Optional[str] = _token,
    skip_failed: bool = _skip,
    workers: int = _workers,
    offline: bool = _offline,
    as_json: bool = typer.Option(False, "--json", help="Print repos, commits and cache folders as JSON."),
) -> None:
    """Download Hub adapters into the Hugging Face cache without compressing (resumable)."""
    got = _gather(sources, hub_author, hub_search, hub_collection, hub_list, token, skip_failed, workers, offline)
    rows = [{"repo": a.ref.repo_id, "revision": a.ref.revision, "commit": a.commit, "path": str(a.path)}
            for a in got.hub_adapters]
    if as_json:
        _emit_json({"report_version": 1, "downloaded": rows,
                    "skipped": [{"repo": r, "reason": w} for r, w in got.skipped]})
    err.print(f"{len(rows)} adapter repo(s) in the cache; {len(got.skipped)} skipped")


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    sources: Optional[List[Path]] = typer.Argument(
        None, help="Original adapters: check each file's sha256 against the one recorded in the artifact."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the verification report as JSON on stdout."),
) -> None:
    """Check an artifact's tensor checksum and, given SOURCES, the original files' sha256."""
    from lorazip.verify import verify as run_verify  # header and file hashes only: no torch

    rep = run_verify(artifact, [str(s) for s in sources] if sources else None)
    if as_json:
        _emit_json(rep)
    for line in rep["problems"]:
        err.print(f"[red]error:[/red] {escape(_printable(line))}", highlight=False, soft_wrap=True)
    if rep["problems"]:
        raise typer.Exit(1)
    n_files = len(rep["files"])
    err.print(f"ok: tensor checksum matches{f'; {n_files} source file(s) match' if sources else ''}")
    if rep["not_checked"]:
        err.print(f"note: {len(rep['not_checked'])} adapter(s) of the artifact had no source to check")


@app.command()
def add(
    artifact: Path = typer.Argument(..., help="Artifact file to grow."),
    sources: List[str] = typer.Argument(..., help="New adapter folders, folders of adapters, or Hub repo ids."),
    threshold: float = typer.Option(0.6, help="Warn about added adapters whose relative squared error is above this."),
    refit: bool = typer.Option(False, help="Refit the bases on all adapters (re-reads the originals recorded in the artifact)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of updating ARTIFACT in place."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    name: Optional[List[str]] = typer.Option(None, "--name", help="Name of each new adapter (repeatable; default: folder names)."),
    base_model: Optional[str] = typer.Option(None, help="Accept adapters of another base model name."),
    allow_pickle: bool = typer.Option(False, help="Also load adapter_model.bin (torch.load weights_only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Add adapters to an artifact: project them onto its bases (or --refit) and report their errors."""
    _load_torch()
    import warnings

    from lorazip.artifact import load_artifact
    from lorazip.update import add_adapters

    out = _update_target(artifact, output, overwrite)
    art = load_artifact(artifact)
    got = _gather(sources, None, None, None, None, None, False, 8, False)
    with _progress() as bar, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report's warnings are printed below
        task = bar.add_task("refitting" if refit else "projecting", total=len(art.modules), item="")
        new, rep = add_adapters(
            art, got.sources, threshold=threshold, refit=refit, names=name or None, base_model=base_model,
            allow_pickle=allow_pickle, progress=lambda done, total, item: bar.update(task, completed=done, item=item),
        )
    new.save(out, overwrite=True)
    rep["output"] = str(out)
    if as_json:
        _emit_json(rep)
    fmt.print_added(err, rep)
    for line in rep["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {escape(line)}", highlight=False, soft_wrap=True)


@app.command()
def remove(
    artifact: Path = typer.Argument(..., help="Artifact file."),
    names: List[str] = typer.Argument(..., help="Names of the adapters to drop."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write here instead of updating ARTIFACT in place."),
    overwrite: bool = typer.Option(False, help="Replace OUTPUT if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Remove adapters from an artifact (bases unchanged)."""
    _load_torch()
    from lorazip.artifact import load_artifact
    from lorazip.update import remove_adapters

    out = _update_target(artifact, output, overwrite)
    new, rep = remove_adapters(load_artifact(artifact), names)
    new.save(out, overwrite=True)
    rep["output"] = str(out)
    if as_json:
        _emit_json(rep)
    err.print(f"removed {len(rep['removed'])} adapter(s); {escape(str(out))} holds {rep['n_adapters']} "
              f"(mean error {rep['errors']['mean']:.4f})", highlight=False)


def _update_target(artifact: Path, output: Optional[Path], overwrite: bool) -> Path:
    """Where add/remove write: ARTIFACT itself (atomically replaced) or -o OUTPUT."""
    if output is None or output.resolve() == artifact.resolve():
        return artifact
    if output.exists() and not overwrite:
        raise lorazip.OutputError(f"{output}: already exists (pass --overwrite to replace it)")
    _writable(output)
    return output


def _writable(output: Path) -> None:
    """Refuse, before any work, an output whose nearest existing folder above it is a file."""
    from lorazip.artifact import missing_folders

    missing_folders(output)


@app.command()
def analyze(
    sources: Optional[List[str]] = typer.Argument(
        None, help="Adapter folders, folders of adapter folders, or Hub repo ids (org/name[@rev])."
    ),
    ranks: str = typer.Option("1,2,4,8,16,32", help="Shared ranks to try (comma-separated)."),
    clusters: str = typer.Option("1,2,4", help="Numbers of clusters K to try (comma-separated)."),
    cluster_ranks: Optional[str] = typer.Option(None, help="Ranks at which K is varied (default: --ranks)."),
    target_error: Optional[float] = typer.Option(None, help="Pick the rank and K of least storage meeting this mean error."),
    weighting: str = typer.Option("relative", help="relative | absolute."),
    max_iters: int = typer.Option(50, help="Solver sweeps per fit (loose: an estimate)."),
    tol: float = typer.Option(1e-3, help="Solver tolerance (loose: an estimate)."),
    base_model: Optional[str] = typer.Option(None, help="Override the base model check."),
    allow_pickle: bool = typer.Option(False, help="Also load adapter_model.bin (torch.load weights_only)."),
    frontier: bool = typer.Option(True, "--frontier/--no-frontier",
                                  help="Bytes-vs-error frontier: shared only, per-adapter SVD only, the --budget mix."),
    frontier_max_rank: int = typer.Option(
        64, help="Largest shared rank per module for the frontier (as compress --max-rank)."
    ),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: spectra, error vs rank, error vs K, frontier (needs lorazip[plot])."),
    as_json: bool = typer.Option(False, "--json", help="Print the analysis as JSON on stdout."),
    hub_author: Optional[str] = _author,
    hub_search: Optional[str] = _search,
    hub_collection: Optional[str] = _collection,
    hub_list: Optional[Path] = _list,
    token: Optional[str] = _token,
    skip_failed: bool = _skip,
    workers: int = _workers,
    offline: bool = _offline,
) -> None:
    """Before compressing: spectra, shared vs per-adapter SVD error by rank, error by K, a pick, bytes-vs-error frontier."""
    _load_torch()
    from lorazip.analyze import analyze as run_analysis
    from lorazip.analyze import plot_analysis

    from .parse import parse_int_list
    from lorazip.io.collection import load_collection

    rank_list = parse_int_list(ranks, "--ranks")
    k_list = parse_int_list(clusters, "--clusters")
    crank_list = parse_int_list(cluster_ranks, "--cluster-ranks") if cluster_ranks else None
    got = _gather(sources, hub_author, hub_search, hub_collection, hub_list, token, skip_failed, workers, offline)
    coll = load_collection(got.sources, base_model=base_model, allow_pickle=allow_pickle)
    with _progress() as bar:
        task = bar.add_task("analyzing", total=None, item="")
        rep = run_analysis(
            coll, rank_list, k_list, target_error=target_error, cluster_ranks=crank_list, weighting=weighting,
            max_iters=max_iters, tol=tol, frontier=frontier, frontier_max_rank=frontier_max_rank,
            progress=lambda done, total, item: bar.update(task, completed=done, total=total, item=item),
        )
    if plot is not None:
        plot_analysis(rep, plot)
    if as_json:
        _emit_json(rep)
    fmt.print_analysis(err, rep)
    if plot is not None:
        err.print(f"plot written to {escape(str(plot))}")


def _printable(text: str) -> str:
    """One line, no terminal control sequences: names and paths in messages come from strangers'
    files and folders (newlines, ESC sequences, undecodable bytes are shown escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status.

    SIGTERM is turned into the same clean exit as Ctrl-C (temp files removed, one line,
    exit 143 instead of 130); the previous handler is restored on return.
    """
    import signal
    import threading

    caught: list[int] = []

    def _on_signal(signum, _frame):
        caught.append(signum)
        raise KeyboardInterrupt

    def _stopped() -> int:
        term = signal.SIGTERM in caught
        err.print("terminated" if term else "interrupted")
        return 143 if term else 130

    global _threads
    threads = os.environ.get("LORAZIP_THREADS")
    _threads = None
    if threads:  # on a shared machine one thread avoids torch's spinning thread pool
        try:
            _threads = max(1, int(threads))
        except ValueError:
            err.print(f"[red]error:[/red] LORAZIP_THREADS must be a number, got {escape(threads)!s}")
            return 1
        _torch_threads()  # torch already loaded (in-process callers); else each computing command applies it
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # leave an ignored SIGINT ignored
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
    try:
        rc = app(args=argv, prog_name="lorazip", standalone_mode=False)
        if rc == 130 or caught:  # newer typer turns KeyboardInterrupt into a silent exit code 130
            return _stopped()
        return rc if isinstance(rc, int) else 0
    except LorazipError as exc:
        if caught:  # the interrupt surfaced inside a native read as a failed read: it is the interrupt
            return _stopped()
        err.print(f"[red]error:[/red] {escape(_printable(str(exc)))}", highlight=False, soft_wrap=True)
        return 1
    except (KeyboardInterrupt, click.exceptions.Abort, _TyperAbort):
        return _stopped()
    except (click.exceptions.ClickException, _TyperClickException) as exc:
        exc.show()
        return exc.exit_code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
