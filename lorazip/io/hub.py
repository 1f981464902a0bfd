"""Resolve and download LoRA adapter collections from the Hugging Face Hub.

All Hub traffic goes through ``huggingface_hub`` (listing, collections, ``snapshot_download``);
this module adds what lorazip needs on top of it:

* parsing of repo specs (``org/name``, ``org/name@revision``), ref-list files, Hub search and
  collections, each resolved to a list of :class:`HubRef`;
* :func:`download_adapters`: many repos in parallel (bounded), only ``adapter_config.json`` and
  root-level ``*.safetensors`` files, into the standard Hugging Face cache (so a rerun fetches only
  what is missing), retries with exponential backoff on server errors and dropped connections,
  a completeness check of every returned adapter folder, and one-line :class:`SourceError`
  messages that name the repo and say what to do next.

Defaults follow the standard Hugging Face environment variables, read when a function is called
(not when ``huggingface_hub`` was imported): ``HF_ENDPOINT``, ``HF_HUB_CACHE`` / ``HF_HOME``,
``HF_HUB_OFFLINE`` and ``HF_TOKEN``.  Explicit ``endpoint=`` / ``cache_dir=`` / ``offline=`` /
``token=`` arguments win over the environment.

The library never draws progress bars: pass ``progress(done, total)`` to :func:`download_adapters`
to draw one yourself (the CLI does).
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from lorazip.errors import OptionError, SourceError

__all__ = [
    "ADAPTER_PATTERNS",
    "DownloadReport",
    "DownloadedAdapter",
    "HubRef",
    "collection_refs",
    "download_adapters",
    "looks_like_hub_ref",
    "parse_hub_ref",
    "read_ref_list",
    "search_hub",
]

#: Files fetched from each repo (root level only, see ``_IGNORE_PATTERNS``).
ADAPTER_PATTERNS = ("adapter_config.json", "*.safetensors")
# fnmatch's "*" also matches "/", so "*.safetensors" alone would pull checkpoints from sub-folders.
_IGNORE_PATTERNS = ("*/*",)
_CONFIG_NAME = "adapter_config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of one repo fetched concurrently (an adapter repo has ~2 files: repos are the parallel unit)

_FILES_PER_REPO = 2
_MAX_BACKOFF_S = 60.0
_MAX_RETRY_AFTER_S = 300.0
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})

_SHA_RE = re.compile(r"[0-9a-f]{40}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,96}", re.ASCII)
_URL_PREFIXES = (
    "hf://",
    "https://huggingface.co/",
    "http://huggingface.co/",
    "https://hf.co/",
    "http://hf.co/",
    "huggingface.co/",
    "hf.co/",
)


# ----------------------------------------------------------------------------------------------
# Repo references
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """One Hub model repo, as the user wrote it (``revision=None`` means the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def _valid_name(part: str) -> bool:
    return (
        _NAME_RE.fullmatch(part) is not None
        and "--" not in part
        and ".." not in part
        and part[0] not in "-."
        and part[-1] not in "-."
    )


def _valid_revision(rev: str) -> bool:
    return (
        0 < len(rev) <= 255
        and all(c.isprintable() and not c.isspace() for c in rev)
        and not rev.startswith("/")
        and not rev.endswith("/")
        and ".." not in rev
    )


def _split_ref(spec: str) -> HubRef | None:
    s = spec.strip()
    for prefix in _URL_PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    repo, sep, rev = s.partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(_valid_name(p) for p in parts):
        return None
    if sep and not _valid_revision(rev):
        return None
    return HubRef(repo, rev if sep else None)


def parse_hub_ref(spec: str) -> HubRef:
    """Parse ``org/name`` or ``org/name@revision`` (branch, tag or commit sha).

    ``hf://org/name`` and ``https://huggingface.co/org/name`` are accepted too.
    Raises :class:`SourceError` if ``spec`` is not of that form.
    """
    ref = _split_ref(spec) if isinstance(spec, str) else None
    if ref is None:
        raise SourceError(
            f"{spec!r} is not a Hub repo id: expected org/name or org/name@revision "
            "(branch, tag or commit sha)"
        )
    return ref


def looks_like_hub_ref(spec: str) -> bool:
    """Whether ``spec`` is syntactically a Hub repo spec (no network, no filesystem access).

    ``adapters/foo`` is both a valid repo id and a relative path: callers should test for an
    existing local path first.
    """
    return isinstance(spec, str) and _split_ref(spec) is not None


def read_ref_list(path: str | os.PathLike[str]) -> list[HubRef]:
    """Read a text file of repo specs: one ``org/name[@revision]`` per line.

    Blank lines are ignored; ``#`` starts a comment (whole line, or after whitespace).
    Duplicates are dropped (first occurrence wins).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SourceError(
            f"repo list {str(p)!r} does not exist: check the path given to --hub-list"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read repo list {str(p)!r}: {_one_line(e)}") from e
    refs: list[HubRef] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        ref = _split_ref(line)
        if ref is None:
            raise SourceError(
                f"{p}:{lineno}: {line!r} is not a Hub repo id: expected one org/name or "
                "org/name@revision per line ('#' starts a comment)"
            )
        refs.append(ref)
    refs = _dedupe(refs)
    if not refs:
        raise SourceError(
            f"repo list {str(p)!r} names no repos: put one org/name[@revision] per line"
        )
    return refs


def _dedupe(refs: Iterable[HubRef]) -> list[HubRef]:
    return list(dict.fromkeys(refs))


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------


def _hf():
    import huggingface_hub

    return huggingface_hub


def _hf_errors():
    """``huggingface_hub.errors`` (>= 0.24), else the same names from ``huggingface_hub.utils``."""
    try:
        from huggingface_hub import errors
    except ImportError:  # pragma: no cover - old huggingface_hub
        import huggingface_hub.utils as errors
    return errors


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _resolve_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    from huggingface_hub import constants

    if cache_dir is None:
        env = os.environ
        if env.get("HF_HUB_CACHE"):
            cache_dir = env["HF_HUB_CACHE"]
        elif env.get("HUGGINGFACE_HUB_CACHE"):
            cache_dir = env["HUGGINGFACE_HUB_CACHE"]
        elif env.get("HF_HOME"):
            cache_dir = os.path.join(env["HF_HOME"], "hub")
        else:
            cache_dir = constants.HF_HUB_CACHE
    return Path(os.path.expandvars(os.path.expanduser(os.fspath(cache_dir)))).resolve()


def _resolve_offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    if env is not None:
        return _truthy(env)
    return bool(constants.HF_HUB_OFFLINE)


def _resolve_token(token: str | None) -> str | None:
    if token:
        return token
    try:
        return _hf().get_token()  # HF_TOKEN, then the token saved by `hf auth login`
    except Exception:  # noqa: BLE001 - a broken token file must not break anonymous downloads
        return None


def _one_line(obj: object, limit: int = 300) -> str:
    text = " ".join(str(obj).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Listing: search and collections
# ----------------------------------------------------------------------------------------------


def _offline_listing_error(what: str) -> SourceError:
    return SourceError(
        f"cannot {what}: offline mode is on (HF_HUB_OFFLINE): list the repos in a file and pass "
        "--hub-list FILE (cached repos load offline), or unset HF_HUB_OFFLINE"
    )


def _listing_error(what: str, e: Exception, token: str | None, endpoint: str) -> SourceError:
    errors = _hf_errors()
    chain = _chain(e)
    if _find(chain, errors.OfflineModeIsEnabled) is not None:
        return _offline_listing_error(what)
    http = _find(chain, errors.HfHubHTTPError)
    status = _status(http) if http is not None else None
    if status == 404:
        return SourceError(f"cannot {what}: not found on {endpoint} (HTTP 404): check the name")
    if status in (401, 403):
        hint = (
            "the token was rejected or has no access: check HF_TOKEN / --token"
            if token
            else ("it needs a token: set HF_TOKEN or pass --token")
        )
        return SourceError(f"cannot {what}: HTTP {status}, {hint}")
    if status is not None:
        return SourceError(f"cannot {what}: the Hub answered HTTP {status}: try again later")
    if _find(chain, _network_error_types()) is not None:
        return SourceError(
            f"cannot {what}: {endpoint} is unreachable ({_one_line(e, 120)}): check the network, "
            "HF_ENDPOINT and proxy settings"
        )
    return SourceError(f"cannot {what}: {type(e).__name__}: {_one_line(e)}")


def search_hub(
    author: str | None,
    search: str | None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    limit: int | None = None,
) -> list[HubRef]:
    """Model repos on the Hub by ``author`` (user or org) and/or ``search`` (substring of the id).

    Pagination is handled by ``huggingface_hub``.  Results are sorted by repo id so that a
    collection built from a search is reproducible; ``limit`` caps how many the Hub returns (in
    the Hub's own order, before sorting).  Raises :class:`SourceError` when nothing matches.
    """
    if not author and not search:
        raise SourceError(
            "a Hub search needs an author and/or a search string (--hub-author, --hub-search)"
        )
    if limit is not None and limit < 1:
        raise OptionError(f"the Hub search limit must be >= 1, got {limit}")
    query = ", ".join(f"{k}={v!r}" for k, v in (("author", author), ("search", search)) if v)
    what = f"list Hub models ({query})"
    if _resolve_offline(None):
        raise _offline_listing_error(what)
    ep = _resolve_endpoint(endpoint)
    tok = _resolve_token(token)
    api = _hf().HfApi(endpoint=ep, token=tok)
    try:
        ids = [
            m.id for m in api.list_models(author=author or None, search=search or None, limit=limit)
        ]
    except Exception as e:  # boundary with huggingface_hub: every failure becomes one line
        raise _listing_error(what, e, tok, ep) from e
    refs = [HubRef(i) for i in sorted(set(ids)) if _split_ref(i) is not None]
    if not refs:
        raise SourceError(
            f"no model repos on {ep} match {query}: check the spelling (the author is the org or "
            "user name as in its URL)"
        )
    return refs


def collection_refs(
    slug: str, *, token: str | None = None, endpoint: str | None = None
) -> list[HubRef]:
    """The model repos of a Hub collection, in collection order (datasets, spaces, papers skipped).

    ``slug`` is ``owner/title-<id>`` as in the collection URL (the full URL is accepted too).
    """
    s = slug.strip().rstrip("/")
    for prefix in _URL_PREFIXES:
        if s.startswith(prefix):
            s = s[len(prefix) :]
            break
    s = s.removeprefix("collections/")
    parts = s.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in s):
        raise SourceError(
            f"{slug!r} is not a Hub collection slug: expected owner/title-id as in "
            "https://huggingface.co/collections/owner/title-id"
        )
    what = f"read Hub collection {s!r}"
    if _resolve_offline(None):
        raise _offline_listing_error(what)
    ep = _resolve_endpoint(endpoint)
    tok = _resolve_token(token)
    api = _hf().HfApi(endpoint=ep, token=tok)
    try:
        collection = api.get_collection(s)
    except Exception as e:
        raise _listing_error(what, e, tok, ep) from e
    items = sorted(collection.items, key=lambda it: getattr(it, "position", 0))
    refs = _dedupe(HubRef(it.item_id) for it in items if it.item_type == "model")
    if not refs:
        raise SourceError(f"Hub collection {s!r} contains no model repos")
    return refs


# ----------------------------------------------------------------------------------------------
# Download
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownloadedAdapter:
    """A verified local copy of one adapter repo."""

    ref: HubRef
    commit: str  # resolved commit sha, for reproducibility
    path: Path  # snapshot folder with adapter_config.json and the *.safetensors files


@dataclass
class DownloadReport:
    adapters: list[DownloadedAdapter] = field(default_factory=list)
    skipped: list[tuple[HubRef, str]] = field(default_factory=list)  # (ref, one-line reason)


@dataclass(frozen=True)
class _Job:
    endpoint: str
    cache_dir: Path
    token: str | None = field(repr=False)  # keep tokens out of tracebacks and logs
    offline: bool
    retries: int
    retry_delay: float
    skip_failed: bool
    cancel: threading.Event


class _Transient(Exception):
    """A failure worth retrying (5xx, 429, dropped connection, truncated file)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class _Cancelled(Exception):
    """Another repo failed and ``skip_failed`` is off: stop before the next attempt."""


def download_adapters(
    refs: Iterable[HubRef | str],
    *,
    token: str | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    max_workers: int = 8,
    skip_failed: bool = False,
    offline: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
    retries: int = 3,
    retry_delay: float = 1.0,
) -> DownloadReport:
    """Download (or find in the cache) the adapter files of every repo in ``refs``.

    Per repo only ``adapter_config.json`` and the root-level ``*.safetensors`` files are fetched,
    with ``huggingface_hub.snapshot_download`` into the standard cache, ``max_workers`` repos at a
    time.  Files already in the cache are not downloaded again, so an interrupted run resumes.
    ``offline=True`` (default: ``HF_HUB_OFFLINE``) uses the cache only.

    Server errors (5xx, 429), dropped connections and truncated files are retried ``retries``
    times with exponential backoff starting at ``retry_delay`` seconds (``Retry-After`` is
    honoured).  Every returned folder has been checked: ``adapter_config.json`` and each
    safetensors file are present with the size the Hub reports, and each safetensors header
    describes exactly the bytes on disk.

    The first failing repo raises :class:`SourceError`; with ``skip_failed=True`` failures are
    collected in ``DownloadReport.skipped`` and the other repos continue.  ``progress(done, total)``
    is called from the calling thread, once at the start and as each repo finishes.
    Adapters and skipped repos are reported in input order (duplicates removed).
    """
    ref_list = _dedupe(r if isinstance(r, HubRef) else parse_hub_ref(r) for r in refs)
    if max_workers < 1:
        raise OptionError(f"the number of parallel downloads must be >= 1, got {max_workers}")
    if retries < 0:
        raise OptionError(f"retries must be >= 0, got {retries}")
    if retry_delay < 0:
        raise OptionError(f"retry_delay must be >= 0, got {retry_delay}")
    if progress is not None:
        progress(0, len(ref_list))
    if not ref_list:
        return DownloadReport()
    job = _Job(
        endpoint=_resolve_endpoint(endpoint),
        cache_dir=_resolve_cache_dir(cache_dir),
        token=_resolve_token(token),
        offline=_resolve_offline(offline),
        retries=retries,
        retry_delay=float(retry_delay),
        skip_failed=skip_failed,
        cancel=threading.Event(),
    )
    results = _fetch_all(ref_list, job, max_workers, progress)
    report = DownloadReport()
    for ref, res in zip(ref_list, results):
        if isinstance(res, DownloadedAdapter):
            report.adapters.append(res)
        else:
            report.skipped.append((ref, str(res)))
    return report


def _fetch_all(ref_list: list[HubRef], job: _Job, max_workers: int,
               progress: Callable[[int, int], None] | None) -> list[DownloadedAdapter | str | None]:
    """Per ref, in order, its download or (``skip_failed``) the one-line reason it failed, with
    ``max_workers`` downloads at a time; progress as each finishes. The first failure otherwise
    raises, after stopping the others."""
    _silent_tqdm()  # create the class once, before the worker threads need it
    total = len(ref_list)
    results: list[DownloadedAdapter | str | None] = [None] * total
    pool = ThreadPoolExecutor(max_workers=min(max_workers, total), thread_name_prefix="lorazip-hub")
    futures: dict[Future, int] = {}
    try:
        futures = {pool.submit(_fetch_one, ref, job): i for i, ref in enumerate(ref_list)}
        pending = set(futures)
        done_count = 0
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(finished, key=futures.__getitem__):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except SourceError as e:
                    if not job.skip_failed:
                        raise
                    results[i] = _one_line(e)
                done_count += 1
                if progress is not None:
                    progress(done_count, total)
    finally:
        # On failure (or Ctrl-C): no new repo starts, running ones stop before their next retry.
        # Files already fetched stay in the cache for the next run.
        job.cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _fetch_one(ref: HubRef, job: _Job) -> DownloadedAdapter:
    reason = ""
    for attempt in range(job.retries + 1):
        if job.cancel.is_set():
            raise _Cancelled()
        try:
            return _attempt(ref, job)
        except _Transient as t:
            reason = t.reason
            if attempt == job.retries:
                break
            delay = min(job.retry_delay * (2**attempt), _MAX_BACKOFF_S)
            if t.retry_after is not None:
                delay = max(delay, min(t.retry_after, _MAX_RETRY_AFTER_S))
            if job.cancel.wait(delay):
                raise _Cancelled() from None
    if job.retries == 0:
        tries = "(retries disabled)"
    else:
        tries = f"after {job.retries} {'retry' if job.retries == 1 else 'retries'}"
    hint = "" if job.skip_failed else ", or pass --skip-failed to continue without it"
    raise SourceError(
        f"{ref}: {reason} {tries}: try again later (a rerun resumes from the cache){hint}"
    )


def _attempt(ref: HubRef, job: _Job) -> DownloadedAdapter:
    hf = _hf()
    try:
        folder = hf.snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=str(job.cache_dir),
            endpoint=job.endpoint,
            token=job.token,
            local_files_only=job.offline,
            allow_patterns=list(ADAPTER_PATTERNS),
            ignore_patterns=list(_IGNORE_PATTERNS),
            max_workers=_FILES_PER_REPO,
            tqdm_class=_silent_tqdm(),
        )
    except Exception as e:  # boundary with huggingface_hub
        raise _classify(ref, e, job) from e
    folder_path = Path(folder)
    commit = folder_path.name
    if _SHA_RE.fullmatch(commit) is None:  # cache layout is snapshots/<commit sha>
        raise SourceError(
            f"{ref}: unexpected snapshot folder {folder_path} (not named by a commit sha)"
        )
    expected = _expected_files(ref, commit, folder_path, job)
    _verify(ref, folder_path, expected, job)
    return DownloadedAdapter(ref=ref, commit=commit, path=folder_path)


def _root_listing(ref: HubRef, commit: str, job: _Job) -> dict[str, int] | None:
    """``{file name: size}`` of the repo root at ``commit``, from the cache if possible."""
    hf = _hf()
    get_cached = getattr(hf, "get_cached_repo_tree", None)  # huggingface_hub >= 1.x
    if get_cached is not None:
        try:
            files = get_cached(ref.repo_id, revision=commit, cache_dir=str(job.cache_dir))
            return {f.path: f.size for f in files if "/" not in f.path}
        except Exception:  # noqa: BLE001, S110 - not cached (e.g. made by an older huggingface_hub)
            pass
    if job.offline:
        return None
    api = hf.HfApi(endpoint=job.endpoint, token=job.token)
    try:
        entries = list(api.list_repo_tree(ref.repo_id, revision=commit))
    except Exception as e:
        raise _classify(ref, e, job) from e
    from huggingface_hub.hf_api import RepoFile

    return {f.path: f.size for f in entries if isinstance(f, RepoFile)}


def _expected_files(ref: HubRef, commit: str, folder: Path, job: _Job) -> dict[str, int | None]:
    listing = _root_listing(ref, commit, job)
    if listing is None:  # offline and no cached listing: judge from the cached folder alone
        if not (folder / _CONFIG_NAME).is_file():
            raise SourceError(
                f"{ref}: the cached copy has no {_CONFIG_NAME} and offline mode is on: "
                "download it online first, or unset HF_HUB_OFFLINE"
            )
        weights = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        if not weights:
            raise SourceError(
                f"{ref}: the cached copy has no .safetensors weights and offline mode is on: "
                "download it online first, or unset HF_HUB_OFFLINE"
            )
        return {_CONFIG_NAME: None, **{w: None for w in weights}}

    weights = sorted(n for n in listing if n.endswith(".safetensors"))
    if _CONFIG_NAME not in listing:
        raise SourceError(f"{ref}: no {_CONFIG_NAME} at the repo root: not a PEFT adapter repo")
    if not weights:
        pickles = sorted(n for n in listing if n.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise SourceError(
                f"{ref}: only pickled .bin weights ({', '.join(pickles)}); lorazip loads safetensors "
                "only: convert the adapter to safetensors, or leave this repo out"
            )
        raise SourceError(
            f"{ref}: no .safetensors weights at the repo root: not a PEFT adapter repo"
        )
    return {_CONFIG_NAME: listing[_CONFIG_NAME], **{w: listing[w] for w in weights}}


def _verify(ref: HubRef, folder: Path, expected: dict[str, int | None], job: _Job) -> None:
    """Every expected file is present and complete; otherwise evict it and retry (or fail offline)."""
    problems: list[tuple[str, str]] = []
    for name, size in expected.items():
        path = folder / name
        problem = None
        if not path.is_file():
            problem = "missing"
        elif size is not None and path.stat().st_size != size:
            problem = f"{path.stat().st_size} bytes, the Hub lists {size}"
        elif name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
        if problem:
            problems.append((name, problem))
    if not problems:
        return
    what = "; ".join(f"{n}: {p}" for n, p in problems)
    if job.offline:
        raise SourceError(
            f"{ref}: the cached copy is incomplete or corrupt ({what}) and offline mode is on: "
            "rerun online to repair it"
        )
    for name, _ in problems:
        _evict(folder / name, job.cache_dir)
    raise _Transient(f"downloaded files are incomplete or corrupt ({what})")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (header checked against the file size)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, too short for safetensors"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"{size} bytes, safetensors header cut off"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable safetensors header ({_one_line(e, 80)})"
    if not isinstance(header, dict):
        return "invalid safetensors header"
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (KeyError, TypeError, ValueError, IndexError):
        return "invalid safetensors header"
    if 8 + n + end != size:
        return f"{size} bytes, its safetensors header describes {8 + n + end}"
    return None


def _evict(path: Path, cache_dir: Path) -> None:
    """Remove a bad snapshot file (and the cache blob it links to) so the next try downloads it."""
    try:
        if path.is_symlink():
            blob = path.resolve()
            if cache_dir in blob.parents:
                blob.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Error classification
# ----------------------------------------------------------------------------------------------


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo.extend([x.__cause__, x.__context__])
    return out


def _find(chain: list[BaseException], types) -> BaseException | None:
    return next((x for x in chain if isinstance(x, types)), None)


def _status(http_error: BaseException) -> int | None:
    response = getattr(http_error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


_NETWORK_ERRORS: tuple[type[BaseException], ...] | None = None


def _network_error_types() -> tuple[type[BaseException], ...]:
    """Transport-level failures of whichever HTTP stack this huggingface_hub uses."""
    global _NETWORK_ERRORS
    if _NETWORK_ERRORS is None:
        import importlib

        types: list[type[BaseException]] = [TimeoutError]
        for module, names in (
            ("httpx2", ("TransportError", "StreamError")),
            ("httpx", ("TransportError", "StreamError")),
            ("requests.exceptions", ("ConnectionError", "Timeout", "ChunkedEncodingError")),
            ("urllib3.exceptions", ("ProtocolError", "TimeoutError")),
        ):
            try:
                mod = importlib.import_module(module)
            except ImportError:
                continue
            types.extend(t for t in (getattr(mod, n, None) for n in names) if isinstance(t, type))
        _NETWORK_ERRORS = tuple(types)
    return _NETWORK_ERRORS


def _retry_after(http_error: BaseException) -> float | None:
    headers = getattr(getattr(http_error, "response", None), "headers", None) or {}
    try:
        value = headers.get("Retry-After")
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None


def _classify(ref: HubRef, e: Exception, job: _Job) -> Exception:
    """Map an exception from huggingface_hub to a SourceError (final) or a _Transient (retry)."""
    errors = _hf_errors()
    chain = _chain(e)
    for kind in (_offline_error, _repo_error, _http_error):
        found = kind(ref, e, chain, errors, job)
        if found is not None:
            return found
    return _transport_error(ref, e, chain, errors, job)


def _offline_error(ref: HubRef, e: Exception, chain: list[BaseException], errors, job: _Job) -> Exception | None:
    """Offline mode and a repo (or part of one) missing from the cache."""
    offline_err = _find(chain, errors.OfflineModeIsEnabled)
    if offline_err is None and not (job.offline and isinstance(e, errors.LocalEntryNotFoundError)):
        return None
    why = (
        "offline mode is on"
        if job.offline
        else "HF_HUB_OFFLINE was set when huggingface_hub was imported"
    )
    incomplete = getattr(errors, "IncompleteSnapshotError", None)
    if incomplete is not None and _find(chain, incomplete) is not None:
        return SourceError(
            f"{ref}: the cached copy is incomplete and {why}: rerun online to complete it"
        )
    return SourceError(
        f"{ref}: not in the Hub cache ({job.cache_dir}) and {why}: download it online first "
        "(lorazip download ...), or unset HF_HUB_OFFLINE"
    )


def _repo_error(ref: HubRef, e: Exception, chain: list[BaseException], errors, job: _Job) -> Exception | None:
    """A revision, repo or file the Hub does not have, or a gated repo."""
    repo_url = f"{job.endpoint}/{ref.repo_id}"
    if _find(chain, errors.RevisionNotFoundError) is not None:
        return SourceError(
            f"{ref}: revision {ref.revision or 'main'!r} not found: check the branch, tag or commit sha "
            f"(see {repo_url}/tree/main)"
        )
    gated = _find(chain, errors.GatedRepoError)
    if gated is not None:
        if job.token:
            return SourceError(
                f"{ref}: gated repo and the token has no access (HTTP {_status(gated)}): "
                f"request access on {repo_url} with the token's account"
            )
        return SourceError(
            f"{ref}: gated repo needs a token: set HF_TOKEN or pass --token "
            f"(after accepting the access conditions on {repo_url})"
        )
    missing = _find(chain, errors.RepositoryNotFoundError)
    if missing is not None:
        if _status(missing) == 401 and not job.token:
            return SourceError(
                f"{ref}: repository not found, or private and needs a token: set HF_TOKEN or pass "
                "--token (and check the name)"
            )
        if job.token:
            return SourceError(
                f"{ref}: repository not found on {job.endpoint}, or the token has no access: "
                "check the name and the token's permissions"
            )
        return SourceError(f"{ref}: repository not found on {job.endpoint}: check the name")
    remote_entry = getattr(errors, "RemoteEntryNotFoundError", None)
    if remote_entry is not None and _find(chain, remote_entry) is not None:
        return SourceError(
            f"{ref}: a file listed by the Hub is missing (HTTP 404): the repo may be changing, try again later"
        )
    return None


def _http_error(ref: HubRef, e: Exception, chain: list[BaseException], errors, job: _Job) -> Exception | None:
    """Any other HTTP status: server errors and rate limits are retried."""
    http = _find(chain, errors.HfHubHTTPError)
    status = _status(http) if http is not None else None
    if status is None:
        return None
    if status in _RETRYABLE_STATUS or status >= 500:
        return _Transient(f"Hub server error (HTTP {status})", _retry_after(http))
    if status in (401, 403):
        if job.token:
            return SourceError(
                f"{ref}: access denied (HTTP {status}): the token was rejected or has no access; "
                "check HF_TOKEN / --token"
            )
        return SourceError(
            f"{ref}: access denied (HTTP {status}): needs a token: set HF_TOKEN or pass --token"
        )
    if status == 404:
        return SourceError(f"{ref}: not found on {job.endpoint} (HTTP 404): check the name")
    return SourceError(
        f"{ref}: the Hub refused the request (HTTP {status}): {_one_line(http, 160)}"
    )


def _transport_error(ref: HubRef, e: Exception, chain: list[BaseException], errors, job: _Job) -> Exception:
    """Dropped connections and cut-short downloads (retried), bad repo ids, anything else."""
    net = _find(chain, _network_error_types())
    if net is None:
        net = next(
            (
                x
                for x in chain
                if isinstance(x, ConnectionError) and not isinstance(x, errors.OfflineModeIsEnabled)
            ),
            None,
        )
    if net is not None:
        return _Transient(f"connection problem ({type(net).__name__}: {_one_line(net, 120)})")
    if any(isinstance(x, OSError) and "Consistency check failed" in str(x) for x in chain):
        return _Transient("a download was cut short (size mismatch)")
    if isinstance(e, errors.LocalEntryNotFoundError):
        return _Transient(f"{job.endpoint} could not be reached")
    if isinstance(e, errors.HFValidationError):
        return SourceError(f"{ref}: invalid repo id or revision: {_one_line(e, 160)}")
    return SourceError(f"{ref}: download failed: {type(e).__name__}: {_one_line(e, 200)}")


# ----------------------------------------------------------------------------------------------
# No progress bars from huggingface_hub
# ----------------------------------------------------------------------------------------------

_SILENT_TQDM = None


def _silent_tqdm():
    """A tqdm class that never draws: passed as ``tqdm_class`` so the library stays quiet."""
    global _SILENT_TQDM
    if _SILENT_TQDM is None:
        from tqdm.auto import tqdm

        class _SilentTqdm(tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                kwargs.pop("name", None)
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

        _SILENT_TQDM = _SilentTqdm
    return _SILENT_TQDM
