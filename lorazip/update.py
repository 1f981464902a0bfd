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
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .add_residuals import add_residuals, goal_error
from .artifact import Artifact, load_artifact, missing_modules, module_path
from .layout import round_small, trim_spectra
from .solvers.linalg import factor_norms2
from .errors import ArtifactError, OptionError, SourceError, ValidationError
from .io.base_models import same_base_model
from .io.collection import Collection, ModuleInfo, load_collection
from .io.peft import Adapter, load_adapter, sha256_file, short
from .metrics import per_adapter, squared_errors, summary
from .lowbit import packed_bytes
from .quantize import QSCALE, dequantized, requantized, round_to_storage, store_extras
from .solvers import jd_diag, jd_full, spectra
from .solvers.linalg import adapter_weights, orth
from .solvers.svd import individual_svd

REPORT_VERSION = 1
DEFAULT_THRESHOLD = 0.6  # error above which an added adapter is flagged (the paper's figure)
_COMPUTE = {"float64": torch.float64, "float32": torch.float32}


class UpdateWarning(UserWarning):
    """An added adapter is poorly represented by the artifact's bases (error above the threshold)."""


def _open(artifact: Artifact | str | os.PathLike) -> Artifact:
    return artifact if isinstance(artifact, Artifact) else load_artifact(artifact)


def _rounded(t: torch.Tensor, like: torch.Tensor, storage_dtype: str | None) -> torch.Tensor:
    """New bases or cores as they will be stored: in ``like``'s dtype, or (int8 storage, where
    ``like`` holds dequantised float32 values) quantised per row and dequantised again."""
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

def _module_infos(modules: list[dict[str, Any]]) -> list[ModuleInfo]:
    return [ModuleInfo(m["name"], m["d_out"], m["d_in"], m.get("layout", "linear"), m.get("target")) for m in modules]


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
    coll.align(_module_infos(art.modules))
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
    keep_extras: bool = True,
    hash_sources: bool = True,
    max_iters: int | None = None,
    tol: float | None = None,
    compute_dtype: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
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
    max_iters, tol, compute_dtype : refit solver settings (default: the artifact's).

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
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
        raise OptionError(f"--threshold must be a number >= 0, got {threshold!r}")
    art = _open(artifact)
    if art.meta.get("calibration"):  # its bases and errors are in the activation metric
        raise OptionError(f"{_label(art)} was compressed with calibration statistics: adding adapters to it is not "
                          "supported yet; compress the whole collection again with --calibration")
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
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
    warn: list[str] = []
    _same_files(art, coll, warn)

    n_old, n_new = len(art.names), len(coll)
    weighting = meta.get("weighting", "relative")
    clustering = meta.get("clustering") or {}
    shared_assign = not clustering.get("per_module", False)
    sd = meta.get("storage_dtype")
    raw = art.tensors()
    old = dequantized(raw)  # int8 storage: computed on float32 values, stored again at the end
    tensors: dict[str, torch.Tensor] = dict(old)
    mods = meta["modules"]
    _start_shape_groups(art, coll, old, mods, max_iters, tol)
    tensors.update({k: v for k, v in old.items() if k not in tensors})
    n_mod = len(mods)
    coll_mods = {m.name for m in coll.modules}

    # 1. candidate cores and errors of every new adapter under every cluster of every module
    cand: list[tuple[torch.Tensor, torch.Tensor]] = []  # per module: cores (n_new, K, ...), errors (n_new, K)
    norm_new = torch.zeros(n_new, n_mod, dtype=torch.float64)
    new_spectra = []
    facs = []
    for j, mod in enumerate(mods):
        name = mod["name"]
        B, A = _factors(coll, name, mod, coll_mods)
        facs.append((B, A))
        U, V, cores_old = old[f"U/{name}"], old[f"V/{name}"], old[f"cores/{name}"]
        diagonal = cores_old.dim() == 2
        norm_new[:, j] = factor_norms2(B, A)
        new_spectra.append(spectra(B, A).float())
        if progress:
            progress(j + 1, n_mod, name)
        if art.method == "svd":
            cand.append((None, None))
            continue
        cs, es = [], []
        for k in range(U.shape[0]):
            S = _rounded(project_cores(B, A, U[k], V[k], diagonal), cores_old, sd)
            e, _ = squared_errors(B, A, U[k], V[k], S)
            cs.append(S)
            es.append(e)
        cand.append((torch.stack(cs, 1), torch.stack(es, 1)))

    # 2. cluster choice: most weighted energy kept (summed over modules unless per-module clusters)
    choice: list[torch.Tensor | None] = [None] * n_mod
    Ks = {int(old[f"U/{m['name']}"].shape[0]) for m in mods}
    if art.method != "svd":
        if shared_assign and len(Ks) == 1 and next(iter(Ks)) > 1:
            total = torch.zeros(n_new, next(iter(Ks)), dtype=torch.float64)
            for j in range(n_mod):
                total += _weights(norm_new[:, j], weighting)[:, None] * cand[j][1]
            pick = total.argmin(1)
            choice = [pick] * n_mod
        else:
            choice = [c[1].argmin(1) for c in cand]

    # 3. append rows
    sq_new = torch.zeros(n_new, n_mod, dtype=torch.float64)
    for j, mod in enumerate(mods):
        name = mod["name"]
        cores_old = old[f"cores/{name}"]
        akey = f"assign/{name}"
        if art.method == "svd":
            B, A = facs[j]
            U, V = old[f"U/{name}"], old[f"V/{name}"]
            res = individual_svd(B, A, U.shape[-1])
            Un, Vn = _rounded(res.U, U, sd), _rounded(res.V, V, sd)
            Sn = torch.stack([project_cores(B[i : i + 1], A[i : i + 1], Un[i], Vn[i], True)[0] for i in range(n_new)])
            Sn = _rounded(Sn, cores_old, sd)
            sq_new[:, j] = squared_errors(B, A, Un, Vn, Sn, torch.arange(n_new))[0]
            tensors[f"U/{name}"] = torch.cat([U, Un]).contiguous()
            tensors[f"V/{name}"] = torch.cat([V, Vn]).contiguous()
            tensors[f"cores/{name}"] = torch.cat([cores_old, Sn]).contiguous()
            tensors[akey] = torch.arange(n_old + n_new, dtype=torch.int32)
            mod["n_clusters"] = n_old + n_new
            continue
        cs, es = cand[j]
        k = choice[j]
        rows = torch.arange(n_new)
        tensors[f"cores/{name}"] = torch.cat([cores_old, cs[rows, k]]).contiguous()
        sq_new[:, j] = es[rows, k]
        if akey in old or int(old[f"U/{name}"].shape[0]) > 1:
            prev = old[akey] if akey in old else torch.zeros(n_old, dtype=torch.int32)
            tensors[akey] = torch.cat([prev, k.to(prev.dtype)]).contiguous()
    for j, mod in enumerate(mods):
        key = f"spectra/{mod['name']}"
        tensors[key] = _cat_padded(old[key], new_spectra[j])
        rkey = f"resid_ranks/{mod['name']}"
        if rkey in old:  # format v2: the new adapters have no residual part (rank 0, no rows) ...
            tensors[rkey] = torch.cat([old[rkey], torch.zeros(n_new, dtype=old[rkey].dtype)]).contiguous()
    proj_sq = sq_new.clone()
    goal = goal_error(meta, old["stats/sq_error"], old["stats/norm2"]) if art.method != "svd" else None
    if goal is not None:  # ... unless the artifact stores per-adapter parts: then theirs, up to its goal
        bases = []
        for j, mod in enumerate(mods):
            U, V = old[f"U/{mod['name']}"].double(), old[f"V/{mod['name']}"].double()
            S = tensors[f"cores/{mod['name']}"][n_old:].double()
            S = torch.diag_embed(S) if S.dim() == 2 else S
            bases.append((U[choice[j]], V[choice[j]], S))
        add_residuals(meta, tensors, raw, [(B.double(), A.double()) for B, A in facs], bases, sq_new, norm_new,
                      n_old, goal)
    sq_old, nn_old = old["stats/sq_error"], old["stats/norm2"]
    tensors["stats/sq_error"] = torch.cat([sq_old, sq_new.to(sq_old.dtype)])
    tensors["stats/norm2"] = torch.cat([nn_old, norm_new.to(nn_old.dtype)])
    from .compress.provenance import SourceHashes, adapter_meta  # the same metadata compress records

    hashes = SourceHashes(coll, hash_sources)
    try:
        meta["adapters"].extend(adapter_meta(a, hashes) for a in coll.adapters)
    finally:
        hashes.close()
    ex_sq, ex_n2 = torch.zeros(n_new, dtype=torch.float64), torch.zeros(n_new, dtype=torch.float64)
    for j, a in enumerate(coll.adapters):
        if keep_extras and a.extras:  # converted as the artifact's extras were (extras_dtype)
            ex_sq[j], ex_n2[j], orig = store_extras(tensors, n_old + j, a.extra_tensors(),
                                                     meta.get("extras_dtype") or "auto")
            if orig:
                meta["adapters"][n_old + j]["extras_dtypes"] = orig
    for key, new in (("stats/extras_sq_error", ex_sq), ("stats/extras_norm2", ex_n2)):
        if key in old:
            tensors[key] = torch.cat([old[key], new.to(old[key].dtype)])
    proj_err = per_adapter(proj_sq, norm_new)
    objective = {"projection": _objective(tensors, weighting), "refit": None}
    meta.setdefault("updates", []).append(
        {"op": "add", "adapters": coll.names, "refit": bool(refit), "lorazip_version": __version__}
    )
    trim_spectra(tensors, meta)
    round_small(tensors, meta)
    out = Artifact(meta, tensors=tensors)

    refit_info = None
    if refit:
        out, refit_info = _refit(out, art, coll, weighting, allow_pickle, max_iters, tol, compute_dtype, progress)
        objective["refit"] = _objective(out.tensors(), weighting)
    if sd == "int8":  # store the bases and cores again as int8 (unchanged ones bit for bit)
        out = Artifact(out.meta, tensors=requantized(out.tensors(), old, raw, sd))

    sq_all, nn_all = out.stats()
    err_all = per_adapter(sq_all.double(), nn_all.double())
    added = []
    for j, a in enumerate(coll.adapters):
        i = n_old + j
        row = {
            "name": a.name,
            "source": meta["adapters"][i]["source"].get("path"),
            "error": float(err_all[i]),
            "projection_error": float(proj_err[j]),
            "above_threshold": bool(err_all[i] > threshold),
            "missing_modules": missing_modules(mods, a.modules),
        }
        if art.method != "svd" and choice[0] is not None and shared_assign and len(Ks) == 1 and next(iter(Ks)) > 1:
            row["cluster"] = int(choice[0][j])
        added.append(row)
        if row["above_threshold"]:
            warn.append(
                f"adapter {a.name!r}: relative squared error {row['error']:.4f} is above the threshold "
                f"{threshold:g}: the shared bases do not represent it well"
                + ("" if refit else " (try --refit, or recompress the collection)")
            )
    for w in warn:
        warnings.warn(w, UpdateWarning, stacklevel=2)
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
        "objective": objective,
        "errors": summary(err_all.tolist()),
        "residual_goal": goal,  # the error added adapters' own residual parts aimed at (None: none given)
    }
    if refit_info is not None:
        report["refit_modules"] = refit_info
    return out, report


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

def _refit(out: Artifact, art: Artifact, coll: Collection, weighting: str, allow_pickle: bool,
           max_iters: int | None, tol: float | None, compute_dtype: str | None, progress) -> tuple[Artifact, dict]:
    """JD-Full (per cluster on its members) on all adapters, warm-started from the current bases."""
    solver = out.meta.get("solver") or {}
    max_iters = int(max_iters or solver.get("max_iters") or 500)
    tol = float(tol or solver.get("tol") or 1e-4)
    cdtype = _COMPUTE.get(compute_dtype or solver.get("compute_dtype") or "float32")
    if cdtype is None:
        raise OptionError(f"unknown compute dtype {compute_dtype!r}; choose float64 or float32")
    sd = out.meta.get("storage_dtype")
    olds = original_adapters(art, allow_pickle=allow_pickle)
    full = Collection(olds + list(coll.adapters), base_model=out.meta.get("base_model") or coll.base_model or "")
    full.align(_module_infos(out.modules))  # the artifact's shape groups, not a new keying
    names_full = {m.name for m in full.modules}
    tensors = dict(out.tensors())
    info = {"refit": 0, "kept_projection": 0, "skipped": 0}
    method = out.method
    n_mod = len(out.modules)
    for j, mod in enumerate(out.modules):
        name = mod["name"]
        if progress:
            progress(j, n_mod, name)
        if method == "svd" or name not in names_full or mod["rank"] == 0:
            info["skipped"] += 1  # per-adapter SVD is already optimal; nobody adapts the module; no shared part
            continue
        for key in (f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}", f"qbits/{name}",
                    f"{QSCALE}resid_B/{name}", f"{QSCALE}resid_A/{name}"):
            tensors.pop(key, None)  # residual parts fit the old bases: a refit drops them
        mod.pop("residual", None)
        fac = full.module_factors(name, dtype=torch.float64)
        B, A = fac.B, fac.A
        U_all, V_all = tensors[f"U/{name}"].clone(), tensors[f"V/{name}"].clone()
        cores = tensors[f"cores/{name}"].clone()
        akey = f"assign/{name}"
        assign = tensors[akey].long() if akey in tensors else torch.zeros(B.shape[0], dtype=torch.long)
        norms2 = fac.norms2()
        sq, _ = squared_errors(B, A, U_all, V_all, cores, assign)  # the projection's exact errors
        r = U_all.shape[-1]
        diagonal = cores.dim() == 2
        changed, iters, conv = False, 0, True
        for k in range(U_all.shape[0]):
            idx = (assign == k).nonzero().flatten()
            if len(idx) == 0:
                continue
            w = _weights(norms2[idx], weighting)
            if float((w * norms2[idx]).sum()) <= 0:
                continue
            Bk, Ak = B[idx], A[idx]
            if method == "jd-diag":
                res = jd_diag(Bk.to(cdtype), Ak.to(cdtype), r, weights=w.to(cdtype), max_iters=max_iters, tol=tol,
                              seed=int(solver.get("seed") or 0))
                Un = res.U.double() / torch.linalg.norm(res.U.double(), dim=0).clamp_min(1e-300)
                Vn = res.V.double() / torch.linalg.norm(res.V.double(), dim=0).clamp_min(1e-300)
            else:
                U0, V0 = orth(U_all[k].double()).to(cdtype), orth(V_all[k].double()).to(cdtype)
                res = jd_full(Bk.to(cdtype), Ak.to(cdtype), r, weights=w.to(cdtype), max_iters=max_iters, tol=tol,
                              U0=U0, V0=V0)
                Un, Vn = orth(res.U.double()), orth(res.V.double())
            Un, Vn = _rounded(Un, U_all, sd), _rounded(Vn, V_all, sd)
            Sn = _rounded(project_cores(Bk, Ak, Un, Vn, diagonal), cores, sd)
            e_new, _ = squared_errors(Bk, Ak, Un, Vn, Sn)
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
    if progress:
        progress(n_mod, n_mod, "")
    trim_spectra(tensors, out.meta)
    round_small(tensors, out.meta)
    return Artifact(out.meta, tensors=tensors), info


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
    drop = {have.index(n) for n in names}
    keep = [i for i in range(len(have)) if i not in drop]
    new_index = {old: new for new, old in enumerate(keep)}
    idx = torch.tensor(keep, dtype=torch.long)
    meta = copy.deepcopy(art.meta)
    meta.pop("checksum", None)
    old = art.tensors()
    tensors: dict[str, torch.Tensor] = {}
    for mod in meta["modules"]:  # format v2 residual parts: keep the row blocks of the kept adapters
        name = mod["name"]
        rkey, bkey, akey = f"resid_ranks/{name}", f"resid_B/{name}", f"resid_A/{name}"
        if rkey not in old:
            continue
        ks = old[rkey].long()
        offs = (torch.cumsum(ks, 0) - ks).tolist()
        blocks = [(offs[i], offs[i] + int(ks[i])) for i in keep if int(ks[i]) > 0]
        if not blocks:  # no kept adapter has a residual part here
            mod.pop("residual", None)
            continue
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
    for key, t in old.items():
        q = QSCALE if key.startswith(QSCALE) else ""  # int8 row scales follow their tensor's rows
        base = key[len(q):]
        if base.startswith(("resid_", "qbits/")):
            continue  # above
        if base.startswith("extras/"):
            _, i, rest = base.split("/", 2)
            if int(i) in new_index:
                tensors[f"{q}extras/{new_index[int(i)]}/{rest}"] = t
        elif base.startswith(("cores/", "spectra/", "stats/")):
            tensors[key] = t[idx].contiguous()
        elif base.startswith("assign/"):
            tensors[key] = (torch.arange(len(keep), dtype=t.dtype) if art.method == "svd" else t[idx]).contiguous()
        elif art.method == "svd" and base.startswith(("U/", "V/")):
            tensors[key] = t[idx].contiguous()
        else:
            tensors[key] = t
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


__all__ = [
    "add_adapters", "remove_adapters", "project_cores", "original_adapters", "UpdateWarning", "DEFAULT_THRESHOLD",
]
