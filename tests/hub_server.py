"""A loopback fake of the Hugging Face Hub, for testing lorazip.io.hub over real HTTP.

Two ``ThreadingHTTPServer``s on 127.0.0.1 (ephemeral ports) share one :class:`FakeHub` state:

* the *Hub* (``hub.url``) serves the API and ``/resolve`` URLs:

  - ``GET /api/models?author=&search=&limit=``: listing, paginated with ``Link: <...>; rel="next"``
  - ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: ``sha`` + ``siblings``
  - ``GET /api/models/{repo}/tree/{rev}[/{path}]``: file listing with sizes (paginated too)
  - ``GET /api/collections/{owner}/{slug}``
  - ``HEAD|GET /{repo}/resolve/{rev}/{file}``: small files are served directly with ``ETag`` and
    ``X-Repo-Commit``; LFS files (``*.safetensors``, ``*.bin``) answer ``302`` to the CDN with
    ``X-Linked-Etag`` (sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, like huggingface.co;

* the *CDN* (``hub.cdn_url``, another port so another origin: huggingface_hub does not follow the
  redirect on HEAD and drops the token, as with the real CDN) serves LFS bodies, with ``Range``.

Errors carry the ``X-Error-Code`` header huggingface_hub maps to exceptions (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``).  Private repos answer 401 without a valid
token; gated repos show their metadata but answer 401/403 ``GatedRepo`` on files.

Faults are injected per repo / route / file with :meth:`FakeHub.add_fault`; every request is
recorded in :attr:`FakeHub.log` (with the number of file-body bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")

#: Routes a fault can target.
ROUTES = ("list", "info", "tree", "collection", "resolve", "cdn")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


@dataclass
class Fault:
    """One injected failure.

    kind:
      * an ``int`` HTTP status (404, 401, 403, 500, 503, ...), with optional ``error_code`` header;
      * ``"slow"``: sleep ``delay`` seconds, then answer normally;
      * ``"drop"``: send the headers with the full ``Content-Length``, half the body, close;
      * ``"short"``: serve only half the file, with headers consistent with that (on ``resolve``
        HEAD the advertised size is halved too: a Hub that lies).
    ``times=None`` means forever; otherwise the fault fires that many times, then disappears.
    """

    kind: int | str
    repo_id: str | None = None
    route: str | None = None
    filename: str | None = None
    method: str | None = None
    times: int | None = None
    delay: float = 0.0
    error_code: str | None = None
    message: str = "injected fault"
    fired: int = 0

    def matches(self, route: str, repo_id: str | None, filename: str | None, method: str) -> bool:
        return (
            (self.times is None or self.fired < self.times)
            and (self.repo_id is None or self.repo_id == repo_id)
            and (self.route is None or self.route == route)
            and (self.filename is None or self.filename == filename)
            and (self.method is None or self.method == method)
        )


@dataclass
class LogEntry:
    method: str
    route: str
    repo_id: str | None
    filename: str | None
    status: int
    body_bytes: int
    path: str
    authorized: bool
    range: str | None = None


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    private: bool = False
    gated: bool = False


class FakeHub:
    """State + servers.  Use as a context manager, or call :meth:`start` / :meth:`stop`."""

    def __init__(
        self, *, page_size: int = 2, valid_tokens: tuple[str, ...] = ("hf_valid",)
    ) -> None:
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, list[tuple[str, str]]] = {}
        self.faults: list[Fault] = []
        self.log: list[LogEntry] = []
        self.page_size = page_size
        self.valid_tokens = set(valid_tokens)
        self.gated_access: dict[str, set[str]] = {}  # repo -> tokens granted access
        self._lock = threading.Lock()
        self.in_flight: dict[str, int] = {}  # route -> requests being served now
        self.max_in_flight: dict[str, int] = {}  # route -> most served at once
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""

    # ------------------------------------------------------------------ content

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        ref: str = "main",
        private: bool = False,
        gated: bool = False,
    ) -> str:
        """Add a commit with ``files`` (the whole tree) to ``repo_id`` and point ``ref`` at it."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id))
        repo.private = repo.private or private
        repo.gated = repo.gated or gated
        h = hashlib.sha1(repo_id.encode() + len(repo.commits).to_bytes(4, "little"))
        for name in sorted(files):
            h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
        sha = h.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha

    def add_tag(self, repo_id: str, tag: str, commit: str) -> None:
        self.repos[repo_id].refs[tag] = commit

    def add_collection(self, slug: str, items: list[tuple[str, str]]) -> None:
        """``items``: ``(type, id)`` pairs, type in model/dataset/space/paper."""
        self.collections[slug] = list(items)

    def add_fault(self, kind: int | str, **kwargs) -> Fault:
        route = kwargs.get("route")
        if route is not None and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}")
        fault = Fault(kind=kind, **kwargs)
        with self._lock:
            self.faults.append(fault)
        return fault

    # ------------------------------------------------------------------ log helpers

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def body_downloads(self, repo_id: str | None = None) -> list[LogEntry]:
        """Requests that sent file bytes (resolve GET of small files, CDN GET of LFS files)."""
        return [
            e
            for e in list(self.log)
            if e.body_bytes > 0
            and e.route in ("resolve", "cdn")
            and (repo_id is None or e.repo_id == repo_id)
        ]

    def requests(self, route: str | None = None, repo_id: str | None = None) -> list[LogEntry]:
        return [
            e
            for e in list(self.log)
            if (route is None or e.route == route) and (repo_id is None or e.repo_id == repo_id)
        ]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        for role in ("hub", "cdn"):
            server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
            server.daemon_threads = True
            server.block_on_close = False
            server.fake_hub = self  # type: ignore[attr-defined]
            server.role = role  # type: ignore[attr-defined]
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _take_faults(
        self, route: str, repo_id: str | None, filename: str | None, method: str
    ) -> list[Fault]:
        with self._lock:
            hit = [f for f in self.faults if f.matches(route, repo_id, filename, method)]
            for f in hit:
                f.fired += 1
            return hit

    def _record(self, entry: LogEntry) -> None:
        with self._lock:
            self.log.append(entry)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format, *args):
        pass

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> FakeHub:
        return self.server.fake_hub  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

    def _dispatch(self, method: str) -> None:
        self._route, self._repo_id, self._filename = "unknown", None, None
        self._status, self._body_bytes = 0, 0
        split = urlsplit(self.path)
        raw_parts = split.path.split("/")[1:]
        query = parse_qs(split.query)
        hub = self.hub
        hub_role = self.server.role == "hub"  # type: ignore[attr-defined]
        if not hub_role:
            self._route = "cdn"
        elif raw_parts[:2] == ["api", "models"]:
            self._route = (
                "list"
                if raw_parts[2:] in ([], [""])
                else ("tree" if raw_parts[4:5] == ["tree"] else "info")
            )
        elif raw_parts[:2] == ["api", "collections"]:
            self._route = "collection"
        elif len(raw_parts) >= 5 and raw_parts[2] == "resolve":
            self._route = "resolve"
        route = self._route
        with hub._lock:
            hub.in_flight[route] = hub.in_flight.get(route, 0) + 1
            hub.max_in_flight[route] = max(hub.max_in_flight.get(route, 0), hub.in_flight[route])
        try:
            if route == "cdn":
                self._serve_cdn(method, raw_parts)
            elif route in ("list", "info", "tree"):
                self._serve_models_api(method, raw_parts[2:], query)
            elif route == "collection":
                self._serve_collection(method, raw_parts[2:])
            elif route == "resolve":
                self._serve_resolve(method, raw_parts)
            else:
                self._error(404, "not found", None)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with hub._lock:
                hub.in_flight[route] -= 1
            hub._record(
                LogEntry(
                    method=method,
                    route=self._route,
                    repo_id=self._repo_id,
                    filename=self._filename,
                    status=self._status,
                    body_bytes=self._body_bytes,
                    path=self.path,
                    authorized=self._token() is not None,
                    range=self.headers.get("Range"),
                )
            )

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        head: bool = False,
    ) -> None:
        self._status = status
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _json(self, obj, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(200, json.dumps(obj).encode(), headers, head)

    def _error(
        self, status: int, message: str, code: str | None, extra: dict[str, str] | None = None
    ) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _apply_faults(self, method: str) -> set[str] | None:
        """Apply status/slow faults; return the body-level fault kinds to honour, None if answered."""
        body_faults: set[str] = set()
        for fault in self.hub._take_faults(self._route, self._repo_id, self._filename, method):
            if isinstance(fault.kind, int):
                self._error(fault.kind, fault.message, fault.error_code)
                return None
            if fault.kind == "slow":
                time.sleep(fault.delay)
            else:
                body_faults.add(fault.kind)
        return body_faults

    def _access(self, repo: Repo | None, *, files: bool) -> bool:
        """Enforce private/gated/unknown-repo rules; False if an error was sent."""
        token = self._token()
        if token is not None and token not in self.hub.valid_tokens:
            self._error(401, "Invalid credentials in Authorization header", None)
            return False
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
            return False
        if repo.private and token is None:  # what huggingface.co answers anonymous users
            self._error(401, "Invalid username or password.", "RepoNotFound")
            return False
        if repo.gated and files and token not in self.hub.gated_access.get(repo.repo_id, set()):
            if token is None:
                self._error(
                    401,
                    f"Access to model {repo.repo_id} is restricted. You must be authenticated.",
                    "GatedRepo",
                )
            else:
                self._error(
                    403,
                    f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
                    "GatedRepo",
                )
            return False
        return True

    def _commit(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        return None

    def _paginate(
        self, items: list, base: str, params: dict[str, str], query: dict
    ) -> tuple[list, dict[str, str]]:
        start = int(query.get("cursor", ["0"])[0])
        size = self.hub.page_size
        if "limit" in query:
            size = min(size, int(query["limit"][0]))
        page = items[start : start + size]
        headers: dict[str, str] = {}
        if start + size < len(items):
            nxt = urlencode({**params, "cursor": str(start + size)})
            headers["Link"] = f'<{self.hub.url}{base}?{nxt}>; rel="next"'
        return page, headers

    # ------------------------------------------------------------------ API routes

    def _serve_models_api(self, method: str, parts: list[str], query: dict) -> None:
        hub = self.hub
        if not parts or parts == [""]:
            self._route = "list"
            if self._apply_faults(method) is None:
                return
            token = self._token()
            author = query.get("author", [None])[0]
            search = query.get("search", [None])[0]
            ids = sorted(
                r.repo_id
                for r in hub.repos.values()
                if (author is None or r.repo_id.split("/")[0] == author)
                and (search is None or search.lower() in r.repo_id.lower())
                and (not r.private or token in hub.valid_tokens)
            )
            params = {k: v[0] for k, v in query.items() if k != "cursor"}
            page, headers = self._paginate(ids, "/api/models", params, query)
            self._json(
                [{"_id": i, "id": i, "modelId": i, "private": False, "tags": []} for i in page],
                headers,
            )
            return
        if len(parts) < 2:
            self._error(404, "not found", None)
            return
        repo_id = f"{unquote(parts[0])}/{unquote(parts[1])}"
        rest = parts[2:]
        self._repo_id = repo_id
        repo = hub.repos.get(repo_id)
        if rest and rest[0] == "tree":
            self._route = "tree"
        elif not rest or rest[0] == "revision":
            self._route = "info"
        else:
            self._error(404, "not found", None)
            return
        if self._apply_faults(method) is None or not self._access(repo, files=False):
            return
        assert repo is not None
        rev = unquote(rest[1]) if len(rest) >= 2 else "main"
        sha = self._commit(repo, rev)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        files = repo.commits[sha]
        if self._route == "info":
            siblings = [{"rfilename": n} for n in sorted(files)]
            if "blobs" in query:
                for s in siblings:
                    s["size"] = len(files[s["rfilename"]])
            self._json(
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": repo.private,
                    "gated": "manual" if repo.gated else False,
                    "disabled": False,
                    "tags": ["peft"],
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": siblings,
                }
            )
            return
        prefix = "/".join(unquote(p) for p in rest[2:])
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        entries: list[dict] = []
        folders: set[str] = set()
        for name in sorted(files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rel = name[len(prefix) + 1 :] if prefix else name
            if "/" in rel and not recursive:
                folders.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                continue
            data = files[name]
            entry = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": name}
            if is_lfs(name):
                entry["lfs"] = {
                    "oid": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            entries.append(entry)
        entries += [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)
        ]
        base = urlsplit(self.path).path
        params = {k: v[0] for k, v in query.items() if k != "cursor"}
        page, headers = self._paginate(entries, base, params, query)
        self._json(page, headers)

    def _serve_collection(self, method: str, parts: list[str]) -> None:
        self._route = "collection"
        slug = "/".join(unquote(p) for p in parts)
        self._repo_id = slug
        if self._apply_faults(method) is None:
            return
        items = self.hub.collections.get(slug)
        if items is None:
            self._error(404, "Collection not found", None)
            return
        self._json(
            {
                "slug": slug,
                "title": slug.split("/")[-1],
                "owner": {"name": slug.split("/")[0], "type": "org"},
                "items": [
                    {"_id": f"item{i}", "id": item_id, "type": kind, "position": i}
                    for i, (kind, item_id) in enumerate(items)
                ],
                "lastUpdated": "2024-01-01T00:00:00.000Z",
                "position": 0,
                "private": False,
                "theme": "blue",
                "upvotes": 0,
            }
        )

    # ------------------------------------------------------------------ files

    def _serve_resolve(self, method: str, raw_parts: list[str]) -> None:
        self._route = "resolve"
        repo_id = f"{unquote(raw_parts[0])}/{unquote(raw_parts[1])}"
        rev = unquote(raw_parts[3])
        filename = unquote("/".join(raw_parts[4:]))
        self._repo_id, self._filename = repo_id, filename
        body_faults = self._apply_faults(method)
        if body_faults is None:
            return
        repo = self.hub.repos.get(repo_id)
        if not self._access(repo, files=True):
            return
        assert repo is not None
        sha = self._commit(repo, rev)
        if sha is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        files = repo.commits[sha]
        if filename not in files:
            self._error(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
            return
        data = files[filename]
        if is_lfs(filename):
            sha256 = hashlib.sha256(data).hexdigest()
            size = len(data) // 2 if "short" in body_faults else len(data)
            location = f"{self.hub.cdn_url}/cdn/{quote(repo_id)}/{sha256}/{quote(filename)}"
            self._send(
                302,
                b"",
                {
                    "Location": location,
                    "X-Repo-Commit": sha,
                    "ETag": f'"{git_blob_sha1(data)}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(size),
                    "Content-Type": "text/plain",
                },
            )
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"'}
        self._send_file(method, data, headers, body_faults)

    def _serve_cdn(self, method: str, raw_parts: list[str]) -> None:
        self._route = "cdn"
        if len(raw_parts) < 5 or raw_parts[0] != "cdn":
            self._error(404, "not found", None)
            return
        repo_id = f"{unquote(raw_parts[1])}/{unquote(raw_parts[2])}"
        sha256 = raw_parts[3]
        filename = unquote("/".join(raw_parts[4:]))
        self._repo_id, self._filename = repo_id, filename
        body_faults = self._apply_faults(method)
        if body_faults is None:
            return
        repo = self.hub.repos.get(repo_id)
        data = None
        if repo is not None:
            for files in repo.commits.values():
                blob = files.get(filename)
                if blob is not None and hashlib.sha256(blob).hexdigest() == sha256:
                    data = blob
                    break
        if data is None:
            self._error(404, "NoSuchKey", None)
            return
        self._send_file(method, data, {"ETag": f'"{sha256}"'}, body_faults)

    def _send_file(
        self, method: str, data: bytes, headers: dict[str, str], body_faults: set[str]
    ) -> None:
        if "short" in body_faults:
            data = data[: len(data) // 2]
        total = len(data)
        start, end = 0, total - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            lo, _, hi = rng[len("bytes=") :].partition("-")
            start = int(lo) if lo else 0
            end = min(int(hi), total - 1) if hi else total - 1
            if start >= total:
                self._send(416, b"", {"Content-Range": f"bytes */{total}"})
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{total}"}
        body = data[start : end + 1]
        headers = {**headers, "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if method == "HEAD":
            self._send(status, body, headers, head=True)
            return
        if "drop" in body_faults:
            # Full Content-Length, half the body, then the connection goes away.
            self._status = status
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            half = body[: len(body) // 2]
            self.wfile.write(half)
            self.wfile.flush()
            self._body_bytes = len(half)
            self.close_connection = True
            return
        self._send(status, body, headers)
        self._body_bytes = len(body)
