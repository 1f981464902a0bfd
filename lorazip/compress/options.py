"""The settings of a compression run, validated once (:class:`CompressOptions`).

Every entry point takes one: :func:`lorazip.compress` (which also takes them as keywords), the
CLI, the engines of :mod:`lorazip.compress` and their Ray tasks, and :func:`lorazip.update.add_adapters`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import models
from ..artifact import STORAGE_DTYPES
from ..backend import BACKENDS
from ..errors import OptionError
from ..quantize import EXTRAS_DTYPES
from ..solvers import METHODS
from ..solvers.linalg import WEIGHTINGS

COMPUTE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
STATS = ("mean", "max")
# How a budget or target run weighs an adapter's modules (lorazip.metrics.objective_errors): "energy",
# its relative error over all its modules together (each module by its energy: what every report
# states); "sqrt", each module by the square root of its energy; "module", every module alike.
OBJECTIVES = ("energy", "sqrt", "module")
DEFAULT_RANK = 16  # the paper's fixed-rank mode, and the rank at which --clusters groups the adapters
# With none of rank, budget and target: the mean error at which the bundled collection keeps about 99% of
# its adapters' task gain (docs/task_eval.md: every adapter with error <= 0.031 kept >= 0.99 in float16;
# with bits the default artifact keeps a mean 0.988, --target-error 0.02 keeps 0.992).
DEFAULT_TARGET_ERROR = 0.03


def check_clusters(K: int, n_adapters: int) -> None:
    """:class:`OptionError` unless ``1 <= K <= n_adapters`` (every cluster needs an adapter)."""
    if not 1 <= K <= n_adapters:
        raise OptionError(f"--clusters {K} must be between 1 and the number of adapters ({n_adapters})")


@dataclass(frozen=True)
class CompressOptions:
    """Every setting of a compression run, checked when made (:class:`~lorazip.errors.OptionError`
    naming the setting). Frozen and picklable: Ray tasks take it as it is.

    What to store
        ``rank`` (shared rank per module: the fixed-rank mode), ``budget`` (bytes of the file) or
        ``target_error`` (0..1, on the per-adapter statistic ``target_stat``, "mean" or "max"): the
        allocator chooses; with none of them a jd-full run aims at :data:`DEFAULT_TARGET_ERROR`.
        ``method`` ("jd-full", "jd-diag", "jd-clustered", "svd"); ``clusters`` (K groups with their
        own bases, or "auto"), ``per_module_clusters``, ``max_rounds``; ``uniform_rank`` (one rank
        for every module under a budget or target); ``max_rank`` (the largest the allocator tries);
        ``storage_dtype`` ("auto", "float32", "float16", "bfloat16", "int8"); ``bits`` (with "auto"
        under a budget or target: residual rows at 1-8 bits); ``keep_extras`` and ``extras_dtype``
        (``modules_to_save`` tensors); ``weighting`` ("relative": each adapter counts alike, or
        "absolute"); ``objective`` (how a budget or target weighs each adapter's modules: "energy",
        "sqrt" or "module", :data:`OBJECTIVES`); ``calibration_lambda`` (the regulariser of
        calibration statistics).
    How to compute
        ``device``, ``backend`` (array library of the jd-full solver), ``compute_dtype``, ``seed``,
        ``max_iters``, ``tol``, ``memory_limit`` (bytes for module factors: larger modules stream; and for
        the rows a budget or target run builds: past it they are held in temporary files),
        ``cache_bytes`` (factors kept between clustering rounds), ``hash_sources`` (record sha256).
    """

    rank: int | None = None
    budget: int | None = None
    target_error: float | None = None
    target_stat: str = "mean"
    method: str = "jd-full"
    clusters: int | str = 1
    per_module_clusters: bool = False
    max_rounds: int = 30
    uniform_rank: bool = False
    max_rank: int = 64
    storage_dtype: str = "auto"
    bits: bool = True
    keep_extras: bool = True
    extras_dtype: str = "auto"
    weighting: str = "relative"
    objective: str = "energy"
    calibration_lambda: float | None = None
    device: str = "auto"
    backend: str = "torch"
    compute_dtype: str = "float32"
    seed: int = 0
    max_iters: int = 500
    tol: float = 1e-4
    memory_limit: int | None = None
    cache_bytes: int = 2 << 30
    hash_sources: bool = True

    @classmethod
    def of(cls, options: "CompressOptions | None" = None, **settings: Any) -> "CompressOptions":
        """``options`` (or the defaults) with ``settings`` changed; an unknown setting is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise OptionError(f"unknown compression option(s): {', '.join(unknown)}")
        return dataclasses.replace(options, **settings) if options is not None else cls(**settings)

    def replace(self, **changes: Any) -> "CompressOptions":
        """A copy with ``changes`` (checked again)."""
        return CompressOptions.of(self, **changes)

    def __post_init__(self) -> None:
        if isinstance(self.clusters, str) and self.clusters != "auto":
            try:
                object.__setattr__(self, "clusters", int(self.clusters))
            except ValueError:
                raise OptionError(f"clusters must be a number or 'auto', got {self.clusters!r}") from None
        self._check_what()
        self._check_numbers()
        self._check_goal()
        self._check_how()

    # -- checks --------------------------------------------------------------------------------

    def _check_what(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise OptionError(f"rank must be a positive integer, got {self.rank!r}")
        if self.method not in METHODS:
            raise OptionError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.weighting not in WEIGHTINGS:
            raise OptionError(f"unknown weighting {self.weighting!r}; choose from {', '.join(WEIGHTINGS)}")
        if self.storage_dtype not in STORAGE_DTYPES and self.storage_dtype != "auto":
            raise OptionError(f"unknown dtype {self.storage_dtype!r}; choose from auto, {', '.join(STORAGE_DTYPES)} "
                              "(auto: bits of 1-8 per part under a budget or a target)")
        if self.extras_dtype not in EXTRAS_DTYPES:
            raise OptionError(f"unknown extras dtype {self.extras_dtype!r}; choose from {', '.join(EXTRAS_DTYPES)}")
        if self.objective not in OBJECTIVES:
            raise OptionError(f"unknown objective {self.objective!r}; choose from {', '.join(OBJECTIVES)}")
        if self.target_stat not in STATS:
            raise OptionError(f"target statistic must be mean or max, got {self.target_stat!r}")
        if self.clusters != "auto" and (isinstance(self.clusters, bool) or self.clusters < 1):
            raise OptionError(f"clusters must be a positive number or 'auto', got {self.clusters!r}")

    def _check_goal(self) -> None:
        if self.budget is not None and self.target_error is not None:
            raise OptionError("give a budget or a target error, not both")
        if self.target_error is not None and not 0 <= self.target_error <= 1:
            raise OptionError(f"--target-error must be between 0 and 1, got {self.target_error}")
        if self.allocates and self.clusters != "auto":
            if self.method not in ("jd-full", "jd-diag"):
                raise OptionError(f"a budget or a target error allocates jd-full or jd-diag parts, not {self.method}")
            if self.clusters != 1 and (self.method != "jd-full" or self.uniform_rank):
                raise OptionError("a budget or a target error with K clusters allocates jd-full parts with "
                                  "residuals: drop --method jd-diag and --uniform-rank")
        if self.objective != "energy" and (not self.allocates or self.method != "jd-full" or self.uniform_rank):
            raise OptionError(f"objective {self.objective} weighs the modules of a budget or target run of shared "
                              "and per-adapter parts (jd-full, without --rank or --uniform-rank)")
        if not self.allocates and self.clusters not in (1, "auto") and self.method not in ("jd-full", "jd-clustered"):
            raise OptionError(f"clusters need method jd-clustered (jd-full per cluster), not {self.method}")

    def _check_numbers(self) -> None:
        def whole(name: str, value, least: int, what: str) -> None:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise OptionError(f"{name} must be {what}, got {value!r}")

        for name in ("budget", "memory_limit"):  # bytes: a float (1.5e6) is taken as its whole part
            value = getattr(self, name)
            if isinstance(value, float) and value == value and value not in (float("inf"), -float("inf")):
                object.__setattr__(self, name, int(value))
        whole("budget", self.budget, 1, "a positive number of bytes")
        whole("memory limit", self.memory_limit, 1, "a positive number of bytes")
        whole("max_rank", self.max_rank, 1, "a positive integer")
        whole("max_rounds", self.max_rounds, 1, "a positive integer")
        whole("cache_bytes", self.cache_bytes, 0, "a number of bytes >= 0")
        lam = self.calibration_lambda
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0):
            raise OptionError(f"calibration lambda must be a number >= 0, got {lam!r}")

    def _check_how(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionError(f"unknown device {self.device!r}; choose auto, cpu or cuda")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise OptionError("device 'cuda' requested but CUDA is not available")
        if self.backend not in BACKENDS:
            raise OptionError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.backend != "torch" and self.method not in ("jd-full",):
            raise OptionError(f"--backend {self.backend} runs jd-full only; use the torch backend for {self.method}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise OptionError(f"unknown compute dtype {self.compute_dtype!r}; choose float64 or float32")
        if self.max_iters < 1 or not self.tol > 0:
            raise OptionError("max_iters must be >= 1 and tol > 0")

    def check_collection(self, n_adapters: int) -> None:
        """What the settings ask of a collection of ``n_adapters``, checked before any work: one
        :class:`OptionError` (a number of clusters above the adapters')."""
        if isinstance(self.clusters, int):
            check_clusters(self.clusters, n_adapters)

    # -- what the settings mean ----------------------------------------------------------------

    @property
    def is_default_run(self) -> bool:
        """None of rank, budget and target, jd-full, not a uniform rank: aims at the default target."""
        return (self.rank is None and self.budget is None and self.target_error is None
                and self.method == "jd-full" and not self.uniform_rank)

    @property
    def goal(self) -> float | None:
        """The target error the run aims at: the given one, or :data:`DEFAULT_TARGET_ERROR` for a default run."""
        return DEFAULT_TARGET_ERROR if self.is_default_run else self.target_error

    @property
    def allocates(self) -> bool:
        """A budget or a target (given or the default): the allocator chooses what is stored."""
        return self.budget is not None or self.goal is not None

    @property
    def shared_rank(self) -> int:
        """The rank of a fixed-rank run, and the rank at which clusters group the adapters."""
        return DEFAULT_RANK if self.rank is None else self.rank

    def stored_dtype(self, collection) -> str:
        """The storage dtype of a run on ``collection``: the one given, or for "auto" the adapters' own."""
        return collection.storage_dtype() if self.storage_dtype == "auto" else self.storage_dtype

    def fixed(self, **changes: Any) -> "CompressOptions":
        """These settings for a fixed-rank build (no budget or target, so no objective): what the module
        loop runs."""
        return self.replace(**{"rank": self.shared_rank, "budget": None, "target_error": None,
                               "objective": "energy", **changes})


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA where torch has it, else the CPU (:func:`lorazip.models.resolve_device`)."""
    return torch.device(models.resolve_device(device))
