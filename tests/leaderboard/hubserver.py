"""A small Hugging Face Hub on 127.0.0.1: the endpoints `huggingface_hub` and weightsmith call.

- `GET /api/models?filter=&sort=&direction=&limit=`: the listing (no pagination: one page);
- `GET /api/models/<id>` and `/api/models/<id>/revision/<rev>`: model info, with file sizes
  and blob ids when `blobs=true` (what `model_info(files_metadata=True)` asks for);
- `GET|HEAD /<id>/resolve/<rev>/<file>`: real files, with single `bytes=` ranges (206), the
  `ETag` and `X-Repo-Commit` headers of the real hub, and 401 for a gated or private model
  without `Authorization: Bearer <token>`.

Errors carry the hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, GatedRepo,
EntryNotFound), which huggingface_hub turns into its typed errors. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

SORT_KEYS = {
    "downloads": "downloads",
    "likes": "likes",
    "trendingScore": "trending",
    "lastModified": "last_modified",
    "createdAt": "last_modified",
}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class HubModel:
    """A repository: its files (repo name -> local file) and the metadata the API reports."""

    id: str
    files: dict[str, Path]
    downloads: int = 0
    likes: int = 0
    trending: int = 0
    tags: list[str] = field(default_factory=list)
    license: str | None = None
    gated: bool | str = False  # False, "auto" or "manual"
    private: bool = False
    last_modified: str = "2025-01-01T00:00:00.000Z"
    base_model: str | list[str] | None = None  # the model card's base_model

    @property
    def sha(self) -> str:
        """The head commit: 40 hex digits, stable per id."""
        return hashlib.sha1(self.id.encode()).hexdigest()

    def summary(self) -> dict:
        return {
            "_id": self.sha[:24],
            "id": self.id,
            "modelId": self.id,
            "sha": self.sha,
            "downloads": self.downloads,
            "likes": self.likes,
            "trendingScore": self.trending,
            "lastModified": self.last_modified,
            "createdAt": self.last_modified,
            "tags": self.tags,
            "gated": self.gated,
            "private": self.private,
            "library_name": "transformers",
        }

    def info(self, blobs: bool) -> dict:
        siblings = [
            {"rfilename": name}
            | ({"size": path.stat().st_size, "blobId": hashlib.sha1(path.read_bytes()).hexdigest()} if blobs else {})
            for name, path in sorted(self.files.items())
        ]
        card = {"license": self.license} if self.license else {}
        if self.base_model:
            card["base_model"] = self.base_model
        return self.summary() | {"disabled": False, "cardData": card, "siblings": siblings}


@dataclass
class FakeHub:
    """The running server; `url` is the endpoint to give HfApi and weightsmith."""

    models: dict[str, HubModel]
    token: str = "hf_test_token"
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, model: HubModel) -> None:
        self.models[model.id] = model

    def file_requests(self, model_id: str) -> list[tuple[str, str, str | None]]:
        """(method, file, Range header) of the resolve requests of one model."""
        prefix = f"/{model_id}/resolve/"
        with self.lock:
            return [(m, p[len(prefix) :].split("/", 1)[1], r) for m, p, r in self.requests if p.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real hub; every reply has a length
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range")))
        query = parse_qs(parts.query)
        if path == "/api/models":
            status, headers, body = self._list(query)
        elif path.startswith("/api/models/"):
            status, headers, body = self._info(path.removeprefix("/api/models/"), query)
        elif "/resolve/" in path:
            status, headers, body = self._resolve(path.lstrip("/"))
        else:
            status, headers, body = _error(404, "EntryNotFound", f"no route {path}")
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _authorised(self, model: HubModel) -> bool:
        public = not model.gated and not model.private
        return public or self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _list(self, query: dict) -> tuple[int, dict, bytes]:
        wanted = query.get("filter", [])
        models = [m for m in self.hub.models.values() if all(f in m.tags for f in wanted)]
        models = [m for m in models if not m.private or self.headers.get("Authorization") == f"Bearer {self.hub.token}"]
        key = SORT_KEYS.get(query.get("sort", ["downloads"])[0], "downloads")
        descending = query.get("direction", ["-1"])[0] == "-1"
        models.sort(key=lambda m: getattr(m, key), reverse=descending)
        if "limit" in query:
            models = models[: int(query["limit"][0])]
        return _json(200, [m.summary() for m in models])

    def _info(self, rest: str, query: dict) -> tuple[int, dict, bytes]:
        model_id, _, revision = rest.partition("/revision/")
        model = self.hub.models.get(model_id)
        if model is None or (model.private and not self._authorised(model)):
            return _error(401, "RepoNotFound", "Repository not found")
        if revision and revision not in (model.sha, "main"):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return _json(200, model.info(blobs=query.get("blobs", ["false"])[0].lower() == "true"))

    def _resolve(self, rest: str) -> tuple[int, dict, bytes]:
        model_id, _, tail = rest.partition("/resolve/")
        revision, _, filename = tail.partition("/")
        model = self.hub.models.get(model_id)
        if model is None:
            return _error(401, "RepoNotFound", "Repository not found")
        if revision not in (model.sha, "main"):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        if not self._authorised(model):
            return _error(401, "GatedRepo", "Access to this model is restricted")
        file = model.files.get(filename)
        if file is None:
            return _error(404, "EntryNotFound", f"{filename} does not exist")
        data = file.read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": model.sha,
        }
        header = self.headers.get("Range")
        if header is None:
            return 200, headers, data
        span = _span(header, len(data))
        if span is None:
            return 416, headers | {"Content-Range": f"bytes */{len(data)}"}, b""
        start, end = span
        return (
            206,
            headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"},
            data[start:end],
        )


def _span(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range, else None."""
    m = _RANGE.fullmatch(header.strip())
    if m is None or m.groups() == ("", ""):
        return None
    first, last = m.groups()
    if first == "":
        return (max(size - int(last), 0), size) if int(last) > 0 and size else None
    start, end = int(first), size if last == "" else min(int(last) + 1, size)
    return (start, end) if start < end else None


def _json(status: int, value) -> tuple[int, dict, bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict, bytes]:
    status, headers, body = _json(status, {"error": message})
    return status, headers | {"X-Error-Code": code, "X-Error-Message": message}, body


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # A client closing a kept-alive connection is not an error of the hub; the rest is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def start_hub(models: list[HubModel]) -> FakeHub:
    """Serve `models` on a free port of 127.0.0.1 in a daemon thread; `stop_hub` ends it."""
    hub = FakeHub(models={m.id: m for m in models})
    hub.server = _Server(("127.0.0.1", 0), type("Handler", (_Handler,), {"hub": hub}))
    threading.Thread(target=hub.server.serve_forever, name="fake-hub", daemon=True).start()
    return hub


def stop_hub(hub: FakeHub) -> None:
    hub.server.shutdown()
    hub.server.server_close()
