"""Grow or shrink a compressed collection without recompressing it.

:func:`add_adapters` projects new adapters onto an artifact's existing bases: for every module
the core of adapter ``i`` in cluster ``k`` is the least-squares fit for the *stored* bases,
``S = (U_k^T U_k)^+ U_k^T M_i V_k (V_k^T V_k)^+`` (which is ``U_k^T M_i V_k`` for orthonormal
bases), computed from the factors; with ``K > 1`` clusters each new adapter joins the cluster
that keeps most of its weighted energy summed over modules (per module for per-module
clusterings). Its exact errors are measured from the rounded stored tensors, and its cores,
statistics, spectra, extras and metadata are appended; bases and every other adapter's rows
stay bit for bit. ``refit=True`` then reruns JD-Full on *all* adapters, warm-started from the
current bases (per cluster on its members), re-reading the original adapters from the paths
recorded in the artifact (sha256-checked); a module (or cluster) keeps the projection wherever
the refit would not lower its weighted objective, so a refit is never worse than the projection
of the shared part. Format-v2 residual parts: added adapters get residual rank 0 (their
``resid_ranks`` entries are 0, the residual rows of the others stay); a refit drops the residual
parts of every module it refits (the fixed ``b_i a_i`` belong to the old bases), rank-0 modules
are not refit and keep theirs.

:func:`remove_adapters` drops adapters (cores, statistics, assignments, spectra, extras,
metadata, residual row blocks); the shared bases are unchanged.

Both return a new in-memory :class:`~lorazip.artifact.Artifact` (current format) and a report;
``Artifact.save`` writes it atomically.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .add_residuals import add_residuals, goal_error
from .artifact import Artifact, load_artifact, missing_modules, module_path
from .compress.options import COMPUTE_DTYPES, CompressOptions
from .layout import round_small, trim_spectra
from .solvers.linalg import factor_norms2
from .errors import ArtifactError, OptionError, SourceError, ValidationError
from .io.base_models import same_base_model
from .io.collection import Collection, load_collection
from .io.peft import Adapter, load_adapter, sha256_file, short
from .metrics import per_adapter, squared_errors, summary
from .lowbit import packed_bytes
from .layout import shared_bit
from .quantize import QSCALE, SharedRows, dequantized, requantized, round_to_storage, store_extras
from .solvers import jd_diag, jd_full, spectra
from .solvers.linalg import adapter_weights, orth
from .solvers.svd import individual_svd

REPORT_VERSION = 1
DEFAULT_THRESHOLD = 0.6  # error above which an added adapter is flagged (the paper's figure)


class UpdateWarning(UserWarning):
    """An added adapter is poorly represented by the artifact's bases (error above the threshold)."""


def _open(artifact: Artifact | str | os.PathLike) -> Artifact:
    return artifact if isinstance(artifact, Artifact) else load_artifact(artifact)


@dataclass
class _Store:
    """How a module's new bases and cores are stored: the artifact's storage dtype and, for a module
    with ``shared_bits`` (format v6), those widths and the :class:`SharedRows` that remembers the
    codes of the values it rounds (stored later by :func:`requantized`, bit for bit)."""

    dtype: str | None
    bits: list[int] | None = None
    rows: SharedRows | None = None


def _store(storage_dtype: str | None, mod: dict[str, Any], rows: SharedRows | None) -> _Store:
    return _Store(storage_dtype, mod.get("shared_bits"), rows)


def _rounded(t: torch.Tensor, like: torch.Tensor, store: _Store, role: str) -> torch.Tensor:
    """New bases (``role`` "U" / "V") or cores ("cores") as they will be stored: in ``like``'s dtype,
    or (int8 storage, where ``like`` holds dequantised float32 values) quantised per row and
    dequantised again, or (``shared_bits``) at the module's width for ``role``."""
    if store.bits:
        return store.rows.round(t, shared_bit(role, store.bits), role).to(like.dtype)
    storage_dtype = store.dtype
    if storage_dtype == "int8":
        return round_to_storage(t, "int8").to(like.dtype)
    return t.to(like.dtype)


def _label(art: Artifact) -> str:
    return str(art.path) if art.path else "artifact"


def _weights(norms2: torch.Tensor, weighting: str) -> torch.Tensor:
    return adapter_weights(norms2.double(), weighting if weighting in ("relative", "absolute") else "relative")


def project_cores(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Least-squares cores of ``M_i = B[i] @ A[i]`` for fixed bases ``U`` (d_out, r), ``V`` (d_in, r).

    Full cores: ``(U^T U)^+ U^T M V (V^T V)^+`` (n, r, r); diagonal cores: the solution of
    ``((U^T U) * (V^T V)) s = diag(U^T M V)`` (n, r). All in float64; never forms ``M``.
    """
    B, A, U, V = B.double(), A.double(), U.double(), V.double()
    X = (B.transpose(1, 2) @ U).transpose(1, 2) @ (A @ V)  # U^T M V: (n, r, r)
    GU, GV = U.T @ U, V.T @ V
    if diagonal:
        G = GU * GV
        return torch.diagonal(X, dim1=1, dim2=2) @ torch.linalg.pinv(G, hermitian=True)
    return torch.linalg.pinv(GU, hermitian=True) @ X @ torch.linalg.pinv(GV, hermitian=True)


# -- sources --------------------------------------------------------------------------------

def _check_compatible(art: Artifact, coll: Collection, base_model: str | None) -> None:
    """Same base model (unless overridden) and every new module present with the same shape."""
    mine = (art.meta.get("base_model") or "").rstrip("/")
    if base_model is None and mine:
        for a in coll.adapters:
            theirs = (a.base_model or "").rstrip("/")
            if theirs and not same_base_model(theirs, mine):
                raise ValidationError(
                    f"{a.path}: base model {theirs!r} differs from the artifact's {mine!r} "
                    "(pass --base-model to override)"
                )
    mods = {m["name"]: m for m in art.modules}
    coll.align(art.modules)
    paths = {module_path(m) for m in art.modules}
    for info in coll.modules:
        who = next(a for a in coll.adapters if info.name in a.modules)
        have = mods.get(info.name)
        if have is None and info.path in paths:
            continue  # a new shape of a module the artifact has: a new shape group (_start_shape_groups)
        if have is None:
            raise ValidationError(
                f"{who.weights_file}: module {info.name!r} is not in the artifact {_label(art)} "
                f"(it has bases for {len(mods)} modules); recompress to add modules"
            )
        want = (have.get("layout", "linear"), have["d_out"], have["d_in"])
        if (info.layout, info.d_out, info.d_in) != want:
            raise ValidationError(
                f"{who.weights_file}: module {info.name!r} is {info.layout} {info.d_out}x{info.d_in} "
                f"but {want[0]} {want[1]}x{want[2]} in the artifact"
            )


def original_adapters(art: Artifact, *, allow_pickle: bool = False) -> list[Adapter]:
    """Re-open the artifact's adapters from the source paths recorded in it, after checking
    every recorded file's sha256 (``--refit`` needs the exact originals)."""
    out = []
    for a in art.meta["adapters"]:
        name, src = a["name"], a["source"]
        path = src.get("path")
        if not path:
            raise SourceError(f"adapter {name!r}: no source path recorded in the artifact; --refit needs the originals")
        folder = Path(path)
        if not folder.is_dir():
            raise SourceError(
                f"{folder}: original of adapter {name!r} is missing; --refit re-reads every original adapter "
                "(restore it, or add without --refit)"
            )
        for fname, rec in sorted(src.get("files", {}).items()):
            f = folder / fname
            if not f.is_file():
                raise SourceError(f"{f}: missing (recorded for adapter {name!r}); --refit needs the original files")
            want = rec.get("sha256")
            if want and sha256_file(f) != want:
                raise ValidationError(
                    f"{f}: sha256 differs from the file compressed into the artifact (adapter {name!r}); "
                    "--refit needs the original files"
                )
        adapter = load_adapter(folder, name, allow_pickle=allow_pickle)
        adapter.source.update({k: v for k, v in src.items() if k not in ("path", "files")})
        out.append(adapter)
    return out


def _rename(coll: Collection, names: Sequence[str] | None) -> None:
    if names is None:
        return
    names = list(names)
    if len(names) != len(coll.adapters):
        raise OptionError(f"{len(names)} name(s) given for {len(coll.adapters)} new adapter(s)")
    for a, n in zip(coll.adapters, names):
        if not isinstance(n, str) or not n.strip():
            raise OptionError(f"adapter names must be non-empty strings, got {short(n)}")
        a.name = n
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise OptionError(f"adapter name {sorted(dup)[0]!r} is given twice")


# -- add ---------------------------------------------------------------------------------------

def add_adapters(
    artifact: Artifact | str | os.PathLike,
    sources,
    threshold: float = DEFAULT_THRESHOLD,
    refit: bool = False,
    *,
    names: Sequence[str] | None = None,
    base_model: str | None = None,
    allow_pickle: bool = False,
    options: CompressOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    **settings: Any,
) -> tuple[Artifact, dict[str, Any]]:
    """Add adapters to a compressed collection.

    Parameters
    ----------
    artifact : an :class:`Artifact` or the path of one.
    sources : new adapters, as for :func:`lorazip.load_collection` (folders, Hub downloads).
    threshold : an added adapter whose relative squared error exceeds this is flagged
        (``report["warnings"]`` and an :class:`UpdateWarning`).
    refit : rerun JD-Full on all adapters warm-started from the current bases (needs the
        original adapters at the paths recorded in the artifact, checked by sha256). A refit
        drops the per-adapter residual parts (format v2) of every module it refits; their
        errors are then those of the shared part alone. Without refit, in an artifact with
        per-adapter parts (a budget or target run) the added adapters get theirs, chosen by
        error removed per byte at the artifact's bits until their error reaches its target
        (a budget: the mean error of its adapters; :mod:`lorazip.add_residuals`); in a
        ``--rank`` artifact, residual rank 0.
    names : names for the new adapters (default: their folder / repo names).
    base_model : accept adapters whose config names another base model.
    options, settings : a :class:`~lorazip.compress.options.CompressOptions` (the run's own may be
        passed: what it says of the plan is the artifact's already) and/or its fields as keywords.
        An addition builds with the artifact's plan, its bases fixed (``refit``: refitted), so only
        these settings apply: ``keep_extras``, ``hash_sources`` and the refit's solver settings
        ``max_iters``, ``tol``, ``compute_dtype`` (default: the artifact's, unless given); another
        keyword is an :class:`OptionError`.

    Returns
    -------
    ``(artifact, report)``: a new in-memory artifact (same format, storage dtype, bases unless
    refit) and a dict (``report_version`` 1) with ``added[]`` (name, source, error,
    projection_error, above_threshold, cluster, missing_modules), ``warnings``, ``objective``
    (weighted residual fraction after projection and after refit) and ``errors`` (summary over
    all adapters).

    Raises
    ------
    SourceError, AdapterFormatError, ValidationError (base model, modules, shapes, a name
    already in the artifact, changed or missing originals with ``refit``), OptionError.
    """
    keep_extras, hash_sources, max_iters, tol, compute_dtype = _add_settings(options, settings)
    art = _addable(artifact, threshold)
    coll = _new_collection(art, sources, names, base_model, allow_pickle)
    warn: list[str] = []
    _same_files(art, coll, warn)
    out, add = _project_added(art, coll, refit, keep_extras, hash_sources, max_iters, tol, progress)
    refit_info = None
    if refit:
        out, refit_info = _refit(out, art, coll, add.weighting, allow_pickle, max_iters, tol, compute_dtype, progress,
                                 add.shared)
        add.objective["refit"] = _objective(out.tensors(), add.weighting)
    if add.storage_dtype == "int8":  # store the bases and cores again as int8 (unchanged ones bit for bit)
        out = Artifact(out.meta, tensors=requantized(out.tensors(), add.old, add.raw, add.storage_dtype, out.meta,
                                                     add.shared))
    report = _add_report(art, out, coll, add, threshold, refit, warn, refit_info)
    for w in warn:
        warnings.warn(w, UpdateWarning, stacklevel=2)
    return out, report


_ADD_SETTINGS = ("keep_extras", "hash_sources", "max_iters", "tol", "compute_dtype")


def _add_settings(options: CompressOptions | None, settings: dict[str, Any]):
    """``(keep_extras, hash_sources, max_iters, tol, compute_dtype)`` of an addition; the solver's are
    None (the artifact's) unless given as keywords or in ``options``."""
    other = sorted(set(settings) - set(_ADD_SETTINGS))
    if other:
        raise OptionError(f"adding adapters keeps the artifact's plan (its bases fixed, or refitted): "
                          f"{', '.join(other)} do(es) not apply")
    opts = CompressOptions.of(options, **settings)
    defaults = CompressOptions()
    given = set(settings) | ({k for k in _ADD_SETTINGS if getattr(opts, k) != getattr(defaults, k)}
                             if options is not None else set())
    solver = ("max_iters", "tol", "compute_dtype")
    return (opts.keep_extras, opts.hash_sources, *(getattr(opts, k) if k in given else None for k in solver))


def _addable(artifact: Artifact | str | os.PathLike, threshold: float) -> Artifact:
    """The artifact to add to (opened), after checking the threshold and that adding is supported."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise OptionError(f"--threshold must be a number >= 0, got {threshold!r}")
    art = _open(artifact)
    if art.meta.get("calibration"):  # its bases and errors are in the activation metric
        raise OptionError(f"{_label(art)} was compressed with calibration statistics: adding adapters to it is not "
                          "supported yet; compress the whole collection again with --calibration")
    return art


@dataclass
class _Addition:
    """What projecting the new adapters leaves for the refit, the int8 storage and the report."""

    n_old: int  # adapters already in the artifact
    weighting: str
    storage_dtype: str | None
    raw: dict[str, torch.Tensor]  # the artifact's tensors as stored ...
    old: dict[str, torch.Tensor]  # ... and dequantised (with the new shape groups)
    proj_err: torch.Tensor  # (n_new,) the new adapters' errors after projection (before their residual parts)
    pick: torch.Tensor | None  # (n_new,) their cluster where all modules share one assignment
    goal: float | None  # the error their own residual parts aimed at
    objective: dict[str, float | None]
    shared: SharedRows  # the codes of low-bit shared rows, stored and rounded (format v6 shared_bits)


def _project_added(art: Artifact, coll: Collection, refit: bool, keep_extras: bool, hash_sources: bool,
                   max_iters: int | None, tol: float | None, progress) -> tuple[Artifact, _Addition]:
    """The artifact with the new adapters appended: projected onto its bases (new shape groups
    first), in the cluster that suits them, with their own residual parts where the artifact
    stores such parts, their statistics, spectra, metadata and extras; in its storage dtype
    except int8 (dequantised values, stored again by the caller)."""
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    n_old = len(art.names)
    weighting = meta.get("weighting", "relative")
    sd = meta.get("storage_dtype")
    raw = art.tensors()
    old = dequantized(raw, meta)  # int8 storage: computed on float32 values, stored again at the end
    shared = SharedRows()
    shared.learn_all(raw, meta)
    tensors: dict[str, torch.Tensor] = dict(old)
    mods = meta["modules"]
    _start_shape_groups(art, coll, old, mods, max_iters, tol)
    tensors.update({k: v for k, v in old.items() if k not in tensors})

    proj = _project(art, coll, old, mods, sd, progress, shared)
    shared_k = _shared_clusters(art, old, mods)
    choice = _choose_clusters(art, proj, shared_k, weighting)
    sq_new = _append_rows(art, tensors, old, mods, proj, choice, sd, shared)
    _append_spectra(tensors, old, mods, proj.spectra)
    proj_sq = sq_new.clone()
    goal = goal_error(meta, old["stats/sq_error"], old["stats/norm2"]) if art.method != "svd" else None
    if goal is not None:  # the artifact stores per-adapter parts: the new adapters get theirs, up to its goal
        _add_own_residuals(meta, tensors, raw, old, mods, proj, choice, sq_new, n_old, goal)
    _append_stats(tensors, old, sq_new, proj.norm2)
    _append_adapter_meta(meta, coll, hash_sources)
    _append_extras(tensors, old, meta, coll, n_old, keep_extras)
    objective = {"projection": _objective(tensors, weighting), "refit": None}
    meta.setdefault("updates", []).append(
        {"op": "add", "adapters": coll.names, "refit": bool(refit), "lorazip_version": __version__}
    )
    trim_spectra(tensors, meta)
    round_small(tensors, meta)
    return Artifact(meta, tensors=tensors), _Addition(
        n_old, weighting, sd, raw, old, per_adapter(proj_sq, proj.norm2), choice[0] if shared_k else None, goal,
        objective, shared)


def _add_report(art: Artifact, out: Artifact, coll: Collection, add: _Addition, threshold: float, refit: bool,
                warn: list[str], refit_info: dict | None) -> dict[str, Any]:
    """The report of :func:`add_adapters`; ``warn`` gains a warning per adapter above the threshold."""
    sq_all, nn_all = out.stats()
    err_all = per_adapter(sq_all.double(), nn_all.double())
    added = _added_rows(coll, out.meta, err_all, add, threshold)
    warn += _threshold_warnings(added, threshold, refit)
    report = {
        "report_version": REPORT_VERSION,
        "operation": "add",
        "artifact": str(art.path) if art.path else None,
        "method": art.method,
        "threshold": threshold,
        "refit": bool(refit),
        "n_adapters": len(out.names),
        "added": added,
        "warnings": warn,
        "objective": add.objective,
        "errors": summary(err_all.tolist()),
        "residual_goal": add.goal,  # the error added adapters' own residual parts aimed at (None: none given)
    }
    if refit_info is not None:
        report["refit_modules"] = refit_info
    return report


def _new_collection(art: Artifact, sources, names: Sequence[str] | None, base_model: str | None,
                    allow_pickle: bool) -> Collection:
    """The adapters to add, renamed as asked; none may have a name already in the artifact, and
    they must fit it (:func:`_check_compatible`, which aligns them with its modules)."""
    coll = load_collection(sources, base_model=base_model, allow_pickle=allow_pickle)
    _rename(coll, names)
    existing = set(art.names)
    for a in coll.adapters:
        if a.name in existing:
            raise ValidationError(
                f"{a.path}: adapter name {a.name!r} is already in the artifact {_label(art)} "
                "(remove it first, or give another name)"
            )
    _check_compatible(art, coll, base_model)
    return coll


@dataclass
class _Projection:
    """The new adapters on the artifact's modules (in its order): per module their float64
    ``factors`` ``(B, A)``, spectra, and (unless per-adapter SVD, then None) the ``cores``
    (n_new, K, ...) they would get in each of its K clusters, rounded as stored, with their exact
    squared ``errors`` (n_new, K); ``norm2`` (n_new, M) their squared norms."""

    factors: list[tuple[torch.Tensor, torch.Tensor]]
    norm2: torch.Tensor
    spectra: list[torch.Tensor]
    cores: list[torch.Tensor | None]
    errors: list[torch.Tensor | None]


def _project(art: Artifact, coll: Collection, old: dict[str, torch.Tensor], mods: list[dict[str, Any]],
             sd: str | None, progress, shared: SharedRows) -> _Projection:
    """Project every new adapter onto every cluster's bases of every module (reported as progress)."""
    n_mod = len(mods)
    coll_mods = {m.name for m in coll.modules}
    proj = _Projection([], torch.zeros(len(coll), n_mod, dtype=torch.float64), [], [], [])
    for j, mod in enumerate(mods):
        name = mod["name"]
        B, A = _factors(coll, name, mod, coll_mods)
        proj.factors.append((B, A))
        proj.norm2[:, j] = factor_norms2(B, A)
        proj.spectra.append(spectra(B, A).float())
        if progress:
            progress(j + 1, n_mod, name)
        if art.method == "svd":
            cores = errors = None
        else:
            cores, errors = _cluster_candidates(B, A, old[f"U/{name}"], old[f"V/{name}"], old[f"cores/{name}"],
                                                 _store(sd, mod, shared))
        proj.cores.append(cores)
        proj.errors.append(errors)
    return proj


def _cluster_candidates(B: torch.Tensor, A: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                        cores_old: torch.Tensor, sd: _Store) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores (n_new, K, ...) of the new adapters projected on each cluster's bases, rounded as
    stored, and their exact squared errors (n_new, K)."""
    diagonal = cores_old.dim() == 2
    cs, es = [], []
    for k in range(U.shape[0]):
        S = _rounded(project_cores(B, A, U[k], V[k], diagonal), cores_old, sd, "cores")
        e, _ = squared_errors(B, A, U[k], V[k], S)
        cs.append(S)
        es.append(e)
    return torch.stack(cs, 1), torch.stack(es, 1)


def _shared_clusters(art: Artifact, old: dict[str, torch.Tensor], mods: list[dict[str, Any]]) -> int:
    """K where every module shares one assignment to K > 1 clusters (a new adapter then joins one
    cluster for all modules); 0 otherwise."""
    clustering = art.meta.get("clustering") or {}
    Ks = {int(old[f"U/{m['name']}"].shape[0]) for m in mods}
    if art.method == "svd" or clustering.get("per_module", False) or len(Ks) != 1:
        return 0
    K = next(iter(Ks))
    return K if K > 1 else 0


def _choose_clusters(art: Artifact, proj: _Projection, shared_k: int, weighting: str) -> list[torch.Tensor | None]:
    """Per module, the cluster (n_new,) each new adapter joins: the one that keeps most weighted
    energy, summed over modules with a shared assignment; None for per-adapter SVD."""
    n_mod = len(proj.factors)
    if art.method == "svd":
        return [None] * n_mod
    if shared_k:
        total = torch.zeros(proj.norm2.shape[0], shared_k, dtype=torch.float64)
        for j in range(n_mod):
            total += _weights(proj.norm2[:, j], weighting)[:, None] * proj.errors[j]
        return [total.argmin(1)] * n_mod
    return [e.argmin(1) for e in proj.errors]


def _append_rows(art: Artifact, tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor],
                 mods: list[dict[str, Any]], proj: _Projection, choice: list[torch.Tensor | None],
                 sd: str | None, shared: SharedRows) -> torch.Tensor:
    """Append the new adapters' cores (and, for per-adapter SVD, bases) and assignments to
    ``tensors``; their exact squared errors (n_new, M)."""
    n_old = len(art.names)
    sq_new = torch.zeros(proj.norm2.shape, dtype=torch.float64)
    for j, mod in enumerate(mods):
        if art.method == "svd":
            sq_new[:, j] = _append_own_bases(tensors, old, mod, *proj.factors[j], n_old,
                                                 _store(sd, mod, shared))
        else:
            sq_new[:, j] = _append_cores(tensors, old, mod["name"], proj.cores[j], proj.errors[j], choice[j], n_old)
    return sq_new


def _append_own_bases(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], mod: dict[str, Any],
                      B: torch.Tensor, A: torch.Tensor, n_old: int, sd: _Store) -> torch.Tensor:
    """Per-adapter SVD: each new adapter's own truncated-SVD bases and cores at the module's rank;
    their exact squared errors."""
    name = mod["name"]
    n_new = B.shape[0]
    U, V, cores_old = old[f"U/{name}"], old[f"V/{name}"], old[f"cores/{name}"]
    res = individual_svd(B, A, U.shape[-1])
    Un, Vn = _rounded(res.U, U, sd, "U"), _rounded(res.V, V, sd, "V")
    Sn = torch.stack([project_cores(B[i : i + 1], A[i : i + 1], Un[i], Vn[i], True)[0] for i in range(n_new)])
    Sn = _rounded(Sn, cores_old, sd, "cores")
    sq = squared_errors(B, A, Un, Vn, Sn, torch.arange(n_new))[0]
    tensors[f"U/{name}"] = torch.cat([U, Un]).contiguous()
    tensors[f"V/{name}"] = torch.cat([V, Vn]).contiguous()
    tensors[f"cores/{name}"] = torch.cat([cores_old, Sn]).contiguous()
    tensors[f"assign/{name}"] = torch.arange(n_old + n_new, dtype=torch.int32)
    mod["n_clusters"] = n_old + n_new
    return sq


def _append_cores(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], name: str, cores: torch.Tensor,
                  errors: torch.Tensor, k: torch.Tensor, n_old: int) -> torch.Tensor:
    """Shared bases: append each new adapter's cores in its cluster ``k`` (and the assignment
    where the module has one); their exact squared errors."""
    akey = f"assign/{name}"
    rows = torch.arange(cores.shape[0])
    tensors[f"cores/{name}"] = torch.cat([old[f"cores/{name}"], cores[rows, k]]).contiguous()
    if akey in old or int(old[f"U/{name}"].shape[0]) > 1:
        prev = old[akey] if akey in old else torch.zeros(n_old, dtype=torch.int32)
        tensors[akey] = torch.cat([prev, k.to(prev.dtype)]).contiguous()
    return errors[rows, k]


def _append_spectra(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], mods: list[dict[str, Any]],
                    new_spectra: list[torch.Tensor]) -> None:
    """Append the new adapters' spectra and, in format v2, their residual ranks: 0, no rows (an
    artifact with per-adapter parts then gives them theirs, :func:`_add_own_residuals`)."""
    for j, mod in enumerate(mods):
        key = f"spectra/{mod['name']}"
        tensors[key] = _cat_padded(old[key], new_spectra[j])
        rkey = f"resid_ranks/{mod['name']}"
        if rkey in old:
            n_new = new_spectra[j].shape[0]
            tensors[rkey] = torch.cat([old[rkey], torch.zeros(n_new, dtype=old[rkey].dtype)]).contiguous()


def _add_own_residuals(meta: dict[str, Any], tensors: dict[str, torch.Tensor], raw: dict[str, torch.Tensor],
                       old: dict[str, torch.Tensor], mods: list[dict[str, Any]], proj: _Projection,
                       choice: list[torch.Tensor | None], sq_new: torch.Tensor, n_old: int, goal: float) -> None:
    """Per-adapter residual parts of the new adapters on top of their projection, up to ``goal``
    (:func:`lorazip.add_residuals.add_residuals`; ``sq_new`` is updated in place)."""
    bases = []
    for j, mod in enumerate(mods):
        U, V = old[f"U/{mod['name']}"].double(), old[f"V/{mod['name']}"].double()
        S = tensors[f"cores/{mod['name']}"][n_old:].double()
        S = torch.diag_embed(S) if S.dim() == 2 else S
        bases.append((U[choice[j]], V[choice[j]], S))
    add_residuals(meta, tensors, raw, [(B.double(), A.double()) for B, A in proj.factors], bases, sq_new,
                  proj.norm2, n_old, goal)


def _append_stats(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], sq_new: torch.Tensor,
                  norm_new: torch.Tensor) -> None:
    sq_old, nn_old = old["stats/sq_error"], old["stats/norm2"]
    tensors["stats/sq_error"] = torch.cat([sq_old, sq_new.to(sq_old.dtype)])
    tensors["stats/norm2"] = torch.cat([nn_old, norm_new.to(nn_old.dtype)])


def _append_adapter_meta(meta: dict[str, Any], coll: Collection, hash_sources: bool) -> None:
    """The new adapters' metadata entries, as compress records them (source, file hashes, ranks)."""
    from .compress.provenance import SourceHashes, adapter_meta

    hashes = SourceHashes(coll, hash_sources)
    try:
        meta["adapters"].extend(adapter_meta(a, hashes) for a in coll.adapters)
    finally:
        hashes.close()


def _append_extras(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], meta: dict[str, Any],
                   coll: Collection, n_old: int, keep_extras: bool) -> None:
    """The new adapters' extra tensors, converted as the artifact's were (``extras_dtype``), and
    their rounding statistics where the artifact keeps them."""
    n_new = len(coll)
    ex_sq, ex_n2 = torch.zeros(n_new, dtype=torch.float64), torch.zeros(n_new, dtype=torch.float64)
    for j, a in enumerate(coll.adapters):
        if keep_extras and a.extras:
            ex_sq[j], ex_n2[j], orig = store_extras(tensors, n_old + j, a.extra_tensors(),
                                                     meta.get("extras_dtype") or "auto")
            if orig:
                meta["adapters"][n_old + j]["extras_dtypes"] = orig
    for key, new in (("stats/extras_sq_error", ex_sq), ("stats/extras_norm2", ex_n2)):
        if key in old:
            tensors[key] = torch.cat([old[key], new.to(old[key].dtype)])


def _added_rows(coll: Collection, meta: dict[str, Any], err_all: torch.Tensor, add: _Addition,
                threshold: float) -> list[dict[str, Any]]:
    """The report's ``added[]``: per new adapter its source, final and projection errors, whether
    it is above the threshold, its missing modules and (one shared assignment) its cluster."""
    added = []
    for j, a in enumerate(coll.adapters):
        i = add.n_old + j
        row = {
            "name": a.name,
            "source": meta["adapters"][i]["source"].get("path"),
            "error": float(err_all[i]),
            "projection_error": float(add.proj_err[j]),
            "above_threshold": bool(err_all[i] > threshold),
            "missing_modules": missing_modules(meta["modules"], a.modules),
        }
        if add.pick is not None:
            row["cluster"] = int(add.pick[j])
        added.append(row)
    return added


def _threshold_warnings(added: list[dict[str, Any]], threshold: float, refit: bool) -> list[str]:
    return [
        f"adapter {row['name']!r}: relative squared error {row['error']:.4f} is above the threshold "
        f"{threshold:g}: the shared bases do not represent it well"
        + ("" if refit else " (try --refit, or recompress the collection)")
        for row in added if row["above_threshold"]
    ]


def _start_shape_groups(art: Artifact, coll: Collection, old: dict[str, torch.Tensor], mods: list[dict[str, Any]],
                        max_iters: int | None, tol: float | None) -> None:
    """Append a shape group for every new shape of a module the artifact has (a 3-label head added
    to 2-label ones): bases fitted by JD-Full on the new adapters of that shape at the artifact's rank
    (or its other groups' largest, capped by the shape and the new adapters' ranks), zero cores for the adapters already in the artifact (they do not
    adapt that shape), so that the projection below treats it like any other module. In place:
    ``old`` gains the group's tensors (and a zero column in the statistics), ``mods`` its entry."""
    have = {m["name"] for m in mods}
    n_old = len(art.names)
    for info in coll.modules:
        if info.name in have:
            continue
        peers = [m for m in mods if module_path(m) == info.path]
        first = peers[0]["name"]
        rank = max([art.meta.get("rank") or 0] + [m["rank"] for m in peers])  # requested, not a capped group's
        fac = coll.module_factors(info.name, dtype=torch.float64)
        rows = [i for i, a in enumerate(coll.adapters) if info.name in a.modules]
        r = max(1, min(rank, info.d_out, info.d_in, int(fac.ranks.sum())))
        U_old, cores_old = old[f"U/{first}"], old[f"cores/{first}"]
        K = U_old.shape[0]
        if art.method == "svd":  # per-adapter bases: zeros for the adapters already stored
            U = torch.zeros(n_old, info.d_out, r, dtype=torch.float64)
            V = torch.zeros(n_old, info.d_in, r, dtype=torch.float64)
        else:
            res = jd_full(fac.B[rows], fac.A[rows], r, weighting=art.meta.get("weighting", "relative"),
                          max_iters=max_iters or 1000, tol=tol or 1e-6, seed=0)
            U, V = res.U.expand(K, -1, -1), res.V.expand(K, -1, -1)  # the same bases in every cluster
        name = info.name
        old[f"U/{name}"] = U.to(U_old.dtype).contiguous()
        old[f"V/{name}"] = V.to(U_old.dtype).contiguous()
        shape = (n_old, r) if cores_old.dim() == 2 else (n_old, r, r)
        old[f"cores/{name}"] = torch.zeros(shape, dtype=cores_old.dtype)
        if f"assign/{first}" in old:
            old[f"assign/{name}"] = old[f"assign/{first}"].clone()
        old[f"spectra/{name}"] = torch.zeros(n_old, 1, dtype=old[f"spectra/{first}"].dtype)
        for key in ("stats/sq_error", "stats/norm2"):
            old[key] = torch.cat([old[key], old[key].new_zeros(n_old, 1)], 1)
        mods.append({**info.entry(), "rank": r, "n_clusters": int(U.shape[0]), "iters": 0, "converged": True})
        have.add(name)


def _factors(coll: Collection, name: str, mod: dict[str, Any], coll_mods: set[str]):
    """float64 factors of module ``name`` for the new adapters; zeros where none adapts it."""
    if name in coll_mods:
        fac = coll.module_factors(name, dtype=torch.float64)
        return fac.B, fac.A
    n = len(coll)
    return torch.zeros(n, mod["d_out"], 1, dtype=torch.float64), torch.zeros(n, 1, mod["d_in"], dtype=torch.float64)


def _cat_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stack (n1, w1) and (n2, w2) spectra, zero-padding to the wider one (zeros are exact)."""
    w = max(a.shape[1], b.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, w - t.shape[1])) if t.shape[1] < w else t  # noqa: E731
    return torch.cat([pad(a), pad(b).to(a.dtype)]).contiguous()


def _objective(tensors: dict[str, torch.Tensor], weighting: str) -> float:
    """Weighted residual fraction ``sum w_im e_im / sum w_im ||M_im||^2`` (the solvers' objective)."""
    sq, nn = tensors["stats/sq_error"].double(), tensors["stats/norm2"].double()
    w = _weights(nn, weighting)
    total = float((w * nn).sum())
    return float((w * sq).sum()) / total if total else 0.0


def _same_files(art: Artifact, coll: Collection, warn: list[str]) -> None:
    """Warn when a new adapter's weights are byte-identical to an adapter already stored."""
    by_hash = {}
    for a in art.meta["adapters"]:
        for fname, rec in a["source"].get("files", {}).items():
            if not fname.endswith(".json") and rec.get("sha256"):
                by_hash[rec["sha256"]] = a["name"]
    if not by_hash:
        return
    for a in coll.adapters:
        try:
            h = sha256_file(a.weights_file)
        except OSError:
            continue
        if h in by_hash:
            warn.append(f"adapter {a.name!r} has the same weights as {by_hash[h]!r}, already in the artifact")


# -- refit -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _RefitSettings:
    max_iters: int
    tol: float
    cdtype: torch.dtype
    seed: int


def _refit(out: Artifact, art: Artifact, coll: Collection, weighting: str, allow_pickle: bool,
           max_iters: int | None, tol: float | None, compute_dtype: str | None, progress,
           shared: SharedRows) -> tuple[Artifact, dict]:
    """JD-Full (per cluster on its members) on all adapters, warm-started from the current bases."""
    settings = _refit_settings(out.meta.get("solver") or {}, max_iters, tol, compute_dtype)
    olds = original_adapters(art, allow_pickle=allow_pickle)
    full = Collection(olds + list(coll.adapters), base_model=out.meta.get("base_model") or coll.base_model or "")
    full.align(out.modules)  # the artifact's shape groups, not a new keying
    names_full = {m.name for m in full.modules}
    tensors = dict(out.tensors())
    info = {"refit": 0, "kept_projection": 0, "skipped": 0}
    n_mod = len(out.modules)
    for j, mod in enumerate(out.modules):
        name = mod["name"]
        if progress:
            progress(j, n_mod, name)
        if out.method == "svd" or name not in names_full or mod["rank"] == 0:
            info["skipped"] += 1  # per-adapter SVD is already optimal; nobody adapts the module; no shared part
            continue
        _drop_residuals(tensors, mod)
        fac = full.module_factors(name, dtype=torch.float64)
        _refit_module(tensors, j, mod, fac, out.method, weighting, settings,
                      _store(out.meta.get("storage_dtype"), mod, shared), info)
    if progress:
        progress(n_mod, n_mod, "")
    trim_spectra(tensors, out.meta)
    round_small(tensors, out.meta)
    return Artifact(out.meta, tensors=tensors), info


def _refit_settings(solver: dict[str, Any], max_iters: int | None, tol: float | None,
                    compute_dtype: str | None) -> _RefitSettings:
    """The refit's solver settings: those given, else the artifact's, else the defaults."""
    max_iters = int(max_iters or solver.get("max_iters") or 500)
    tol = float(tol or solver.get("tol") or 1e-4)
    cdtype = COMPUTE_DTYPES.get(compute_dtype or solver.get("compute_dtype") or "float32")
    if cdtype is None:
        raise OptionError(f"unknown compute dtype {compute_dtype!r}; choose float64 or float32")
    return _RefitSettings(max_iters, tol, cdtype, int(solver.get("seed") or 0))


def _drop_residuals(tensors: dict[str, torch.Tensor], mod: dict[str, Any]) -> None:
    """Residual parts fit the old bases: a refit of the module drops them."""
    name = mod["name"]
    for key in (f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}", f"qbits/{name}",
                f"{QSCALE}resid_B/{name}", f"{QSCALE}resid_A/{name}"):
        tensors.pop(key, None)
    mod.pop("residual", None)


def _refit_module(tensors: dict[str, torch.Tensor], j: int, mod: dict[str, Any], fac, method: str, weighting: str,
                  settings: _RefitSettings, sd: _Store, info: dict[str, int]) -> None:
    """Refit module ``j`` cluster by cluster, keeping the projection of a cluster wherever the
    refit would not lower its weighted error; its bases, cores and statistics column are written
    to ``tensors``, the counts to ``info``."""
    name = mod["name"]
    B, A = fac.B, fac.A
    U_all, V_all = tensors[f"U/{name}"].clone(), tensors[f"V/{name}"].clone()
    cores = tensors[f"cores/{name}"].clone()
    akey = f"assign/{name}"
    assign = tensors[akey].long() if akey in tensors else torch.zeros(B.shape[0], dtype=torch.long)
    norms2 = fac.norms2()
    sq, _ = squared_errors(B, A, U_all, V_all, cores, assign)  # the projection's exact errors
    changed, iters, conv = False, 0, True
    for k in range(U_all.shape[0]):
        idx = (assign == k).nonzero().flatten()
        if len(idx) == 0:
            continue
        w = _weights(norms2[idx], weighting)
        if float((w * norms2[idx]).sum()) <= 0:
            continue
        Un, Vn, Sn, e_new, res = _refit_cluster(B[idx], A[idx], w, U_all, V_all, cores, k, method, settings, sd)
        if float((w * e_new).sum()) < float((w * sq[idx]).sum()):
            U_all[k], V_all[k] = Un, Vn
            cores[idx] = Sn
            sq[idx] = e_new
            changed = True
            iters, conv = max(iters, res.n_iters), conv and res.converged
            info["refit"] += 1
        else:
            info["kept_projection"] += 1
    tensors[f"U/{name}"], tensors[f"V/{name}"] = U_all.contiguous(), V_all.contiguous()
    tensors[f"cores/{name}"] = cores.contiguous()
    stats_sq = tensors["stats/sq_error"].clone()
    stats_nn = tensors["stats/norm2"].clone()
    stats_sq[:, j] = sq.to(stats_sq.dtype)
    stats_nn[:, j] = norms2.to(stats_nn.dtype)
    tensors["stats/sq_error"], tensors["stats/norm2"] = stats_sq, stats_nn
    if changed:
        mod["iters"], mod["converged"] = iters, conv


def _refit_cluster(Bk: torch.Tensor, Ak: torch.Tensor, w: torch.Tensor, U_all: torch.Tensor, V_all: torch.Tensor,
                   cores: torch.Tensor, k: int, method: str, s: _RefitSettings, sd: _Store):
    """``(U, V, cores, errors, solver result)``: cluster ``k``'s bases fitted on its members
    (JD-Diag, or JD-Full warm-started from its current bases), rounded as stored, with the
    members' projected cores and exact squared errors."""
    r = U_all.shape[-1]
    cdtype = s.cdtype
    if method == "jd-diag":
        res = jd_diag(Bk.to(cdtype), Ak.to(cdtype), r, weights=w.to(cdtype), max_iters=s.max_iters, tol=s.tol,
                      seed=s.seed)
        Un = res.U.double() / torch.linalg.norm(res.U.double(), dim=0).clamp_min(1e-300)
        Vn = res.V.double() / torch.linalg.norm(res.V.double(), dim=0).clamp_min(1e-300)
    else:
        U0, V0 = orth(U_all[k].double()).to(cdtype), orth(V_all[k].double()).to(cdtype)
        res = jd_full(Bk.to(cdtype), Ak.to(cdtype), r, weights=w.to(cdtype), max_iters=s.max_iters, tol=s.tol,
                      U0=U0, V0=V0)
        Un, Vn = orth(res.U.double()), orth(res.V.double())
    Un, Vn = _rounded(Un, U_all, sd, "U"), _rounded(Vn, V_all, sd, "V")
    Sn = _rounded(project_cores(Bk, Ak, Un, Vn, cores.dim() == 2), cores, sd, "cores")
    e_new, _ = squared_errors(Bk, Ak, Un, Vn, Sn)
    return Un, Vn, Sn, e_new, res


# -- remove ------------------------------------------------------------------------------------

def remove_adapters(artifact: Artifact | str | os.PathLike, names: Sequence[str]) -> tuple[Artifact, dict[str, Any]]:
    """Drop the named adapters: their cores, statistics, assignments, spectra, extras, residual
    row blocks (format v2) and metadata.

    The shared bases are unchanged (for the ``svd`` baseline, whose bases are per adapter,
    the removed adapters' bases go too). Returns ``(artifact, report)``.

    Raises
    ------
    ArtifactError for a name not in the artifact; OptionError for a name given twice or
    for removing every adapter.
    """
    art = _open(artifact)
    names = _names_to_remove(art, names)
    drop = {art.names.index(n) for n in names}
    keep = [i for i in range(len(art.names)) if i not in drop]
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    old = art.tensors()
    tensors: dict[str, torch.Tensor] = {}
    idx = torch.tensor(keep, dtype=torch.long)
    for mod in meta["modules"]:  # format v2 residual parts: keep the row blocks of the kept adapters
        _keep_residual_rows(tensors, old, mod, keep, idx)
    _keep_adapter_rows(tensors, old, keep, art.method)
    if art.method == "svd":
        for mod in meta["modules"]:
            mod["n_clusters"] = len(keep)
    meta["adapters"] = [a for i, a in enumerate(meta["adapters"]) if i not in drop]
    meta.setdefault("updates", []).append({"op": "remove", "adapters": names, "lorazip_version": __version__})
    trim_spectra(tensors, meta)
    round_small(tensors, meta)
    out = Artifact(meta, tensors=tensors)
    sq, nn = out.stats()
    report = {
        "report_version": REPORT_VERSION,
        "operation": "remove",
        "artifact": str(art.path) if art.path else None,
        "removed": names,
        "n_adapters": len(keep),
        "errors": summary(per_adapter(sq.double(), nn.double()).tolist()),
    }
    return out, report


def _names_to_remove(art: Artifact, names: Sequence[str] | str) -> list[str]:
    """``names`` as a list, each in the artifact once, and not all of its adapters."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise OptionError("no adapter names given to remove")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise OptionError(f"adapter {n!r} is named twice")
        seen.add(n)
    have = art.names
    for n in names:
        if n not in have:
            near = ", ".join(have[:5]) + (" ..." if len(have) > 5 else "")
            raise ArtifactError(f"{_label(art)}: no adapter named {n!r} (it has: {near})")
    if len(names) == len(have):
        raise OptionError("cannot remove every adapter: an artifact holds at least one")
    return names


def _keep_residual_rows(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], mod: dict[str, Any],
                        keep: list[int], idx: torch.Tensor) -> None:
    """Format v2: the kept adapters' residual ranks and row blocks of module ``mod`` (with their
    int8 row scales, or their low-bit scales and bits), and its updated ``residual`` entry."""
    name = mod["name"]
    rkey, bkey, akey = f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}"
    if rkey not in old:
        return
    ks = old[rkey].long()
    offs = (torch.cumsum(ks, 0) - ks).tolist()
    blocks = [(offs[i], offs[i] + int(ks[i])) for i in keep if int(ks[i]) > 0]
    if not blocks:  # no kept adapter has a residual part here
        mod.pop("residual", None)
        return
    rows = torch.cat([torch.arange(a, b) for a, b in blocks])
    tensors[rkey] = old[rkey][idx].contiguous()
    # int8 storage: the rows' scales too; low-bit rows: their scales and bits
    for key in (bkey, akey, QSCALE + bkey, QSCALE + akey, f"qbits/{name}"):
        if key in old:
            tensors[key] = old[key][rows].contiguous()
    bits = (mod.get("residual") or {}).get("bits")
    mod["residual"] = {"max_rank": int(ks[idx].max()), "total_rank": int(rows.numel())}
    if bits:
        kept = tensors[f"qbits/{name}"].numpy()
        mod["residual"]["bits"] = {**bits, "bytes": [packed_bytes(mod["d_out"], kept),
                                                     packed_bytes(mod["d_in"], kept)]}


def _keep_adapter_rows(tensors: dict[str, torch.Tensor], old: dict[str, torch.Tensor], keep: list[int],
                       method: str) -> None:
    """Every other tensor: the kept adapters' rows of cores, spectra, statistics and assignments
    (int8 row scales follow their tensor), their extras renumbered; shared bases as they are
    (per-adapter SVD: the kept adapters' bases)."""
    new_index = {old_i: new_i for new_i, old_i in enumerate(keep)}
    idx = torch.tensor(keep, dtype=torch.long)
    for key, t in old.items():
        q = QSCALE if key.startswith(QSCALE) else ""  # int8 row scales follow their tensor's rows
        base = key[len(q):]
        if base.startswith(("resid_", "qbits/")):
            continue  # _keep_residual_rows
        if base.startswith("extras/"):
            _, i, rest = base.split("/", 2)
            if int(i) in new_index:
                tensors[f"{q}extras/{new_index[int(i)]}/{rest}"] = t
        elif base.startswith(("cores/", "spectra/", "stats/")):
            tensors[key] = t[idx].contiguous()
        elif base.startswith("assign/"):
            tensors[key] = (torch.arange(len(keep), dtype=t.dtype) if method == "svd" else t[idx]).contiguous()
        elif method == "svd" and base.startswith(("U/", "V/")):
            tensors[key] = t[idx].contiguous()
        else:
            tensors[key] = t

__all__ = [
    "add_adapters", "remove_adapters", "project_cores", "original_adapters", "UpdateWarning", "DEFAULT_THRESHOLD",
]
