"""Shared fixtures: the fixture files, a real S3 server (SeaweedFS) and a ranged HTTP server.

Both servers are real network servers on 127.0.0.1, so readers are tested through the same
code paths as in production (fsspec/s3fs/aiohttp for headers, listings and stores; botocore and
urllib3 for the ranged reads), and the HTTP server counts the body bytes it sends so tests can
prove that only the ranges asked for were fetched.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import fixture_paths
import pytest

from weightsmith.dev.seaweed import S3Server, start_s3_server

if TYPE_CHECKING:
    from weightsmith.dev.stack import DevStack

# Nothing a test run writes lands outside a temporary folder: the state folder (default store,
# PREFECT_HOME) of every test that does not pick its own is a fresh one per session.
_SESSION_HOME = tempfile.mkdtemp(prefix="weightsmith-tests-")
os.environ["WEIGHTSMITH_HOME"] = _SESSION_HOME
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_HOME, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch on shared 2-core machines (see cli.py)
os.environ.setdefault("WEIGHTSMITH_TASK_RETRIES", "1")  # failure tests need not wait for backoff
os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)

FIXTURES_DIR = fixture_paths.FIXTURES  # inside the repository: tests/fixtures

# Variables that would override or spoil the keys of the test identities.
AWS_NOISE = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The third-party fixture files; their absence is a broken checkout, so it fails, not skips."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"fixture directory {FIXTURES_DIR} is missing: the checkout is incomplete", pytrace=False)
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server (temporary SQLite database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session", autouse=True)
def _stop_temporary_prefect_servers() -> Iterator[None]:
    """Stop, at the end of the session, the temporary Prefect servers that in-process flows
    started without a server (ephemeral mode). Left to Prefect's atexit hook, each logged
    "Stopping temporary server" into a stream pytest had closed: a "--- Logging error ---"
    traceback after every full run's summary."""
    yield
    if "prefect.server.api.server" not in sys.modules:
        return
    from prefect.server.api.server import SubprocessASGIServer

    logger = logging.getLogger("prefect")
    level = logger.level
    logger.setLevel(logging.WARNING)  # its INFO line goes nowhere useful now
    try:
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    finally:
        logger.setLevel(level)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread for a module of tiny models: they gain nothing from more, and OpenMP
    threads that wait on each other stall badly on a busy shared CPU (measured: 20x slower fits)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def state_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the state folder (staged TIFFs of S3 stores, caches) out of the working directory."""
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path_factory.mktemp("weightsmith-home")))


# --- S3 -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS server for the whole session (starting one takes about a second)."""
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


def _use_s3_env(monkeypatch: pytest.MonkeyPatch, server: S3Server, readonly: bool) -> None:
    for name in AWS_NOISE:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env(readonly=readonly).items():
        monkeypatch.setenv(name, value)
    _clear_s3fs_cache()


def _clear_s3fs_cache() -> None:
    # fsspec caches filesystems by their arguments, and s3_options() gives the same arguments
    # whatever the keys in the environment are: a cached instance would keep stale keys.
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> Iterator[S3Server]:
    """The AWS variables of the admin identity are set; yields the server."""
    _use_s3_env(monkeypatch, s3_server, readonly=False)
    yield s3_server
    _clear_s3fs_cache()


@pytest.fixture
def s3_readonly_env(monkeypatch: pytest.MonkeyPatch, s3_server: S3Server) -> Iterator[S3Server]:
    """The AWS variables of the read-only identity are set; yields the server."""
    _use_s3_env(monkeypatch, s3_server, readonly=True)
    yield s3_server
    _clear_s3fs_cache()


@pytest.fixture
def use_stack_s3(monkeypatch: pytest.MonkeyPatch) -> Callable[[DevStack], None]:
    """Called with a dev stack: this process's S3 clients (the library's) use its server."""

    def use(stack: DevStack) -> None:
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in stack.env().items():
            if name.startswith("AWS_"):
                monkeypatch.setenv(name, value)
        _clear_s3fs_cache()

    return use


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """A fresh, empty bucket (unique name, so tests never see each other's objects); the admin
    identity's AWS variables are set, as with `s3_env`."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_env.client().create_bucket(Bucket=name)
    return name


# --- HTTP ---------------------------------------------------------------------------------

RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class RangeHTTPServer:
    """A threaded static file server with byte ranges that counts body bytes per path."""

    server: ThreadingHTTPServer
    root: Path
    bytes_sent: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        """Base URL without a trailing slash."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url_for(self, relative: str) -> str:
        """URL of a file given by its path relative to `root`."""
        return f"{self.url}/{relative.lstrip('/')}"

    def reset(self) -> None:
        """Forget the counted bytes and requests."""
        with self.lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def record(self, method: str, path: str, range_header: str | None, sent: int) -> None:
        """Count one request; `path` is relative to `root`, `sent` the body bytes."""
        with self.lock:
            self.requests.append((method, path, range_header))
            self.bytes_sent[path] = self.bytes_sent.get(path, 0) + sent


class RangeRequestHandler(BaseHTTPRequestHandler):
    """GET and HEAD of files under the owner's root, with single `bytes=` ranges."""

    # HTTP/1.1 keeps the clients' connections alive, as real servers do; every reply has a length.
    protocol_version = "HTTP/1.1"
    owner: RangeHTTPServer  # set on the subclass made per server

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep pytest output clean; `owner.requests` records what happened

    def _serve(self, send_body: bool) -> None:
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        status, headers, body = self._response(relative, range_header)
        if not send_body:
            body = b""
        # Count before sending: the client may check the counters as soon as the last byte
        # arrives, before this thread would get to count after the write.
        self.owner.record(self.command, relative, range_header, len(body))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _response(self, relative: str, range_header: str | None) -> tuple[int, dict, bytes]:
        """(status, headers, body) for a GET; HEAD sends the same without the body."""
        file = self._resolve(relative)
        if file is None:
            return HTTPStatus.NOT_FOUND, {"Content-Length": "0"}, b""
        size = file.stat().st_size
        if range_header is None:
            return HTTPStatus.OK, _file_headers(0, size), file.read_bytes()
        parsed = parse_range(range_header, size)
        if parsed is None:
            headers = {"Content-Length": "0", "Content-Range": f"bytes */{size}"}
            return HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, headers, b""
        start, end = parsed
        headers = _file_headers(start, end) | {"Content-Range": f"bytes {start}-{end - 1}/{size}"}
        with open(file, "rb") as f:
            f.seek(start)
            return HTTPStatus.PARTIAL_CONTENT, headers, f.read(end - start)

    def _resolve(self, relative: str) -> Path | None:
        """The file for a request path, or None if missing, a directory or outside the root."""
        root = self.owner.root.resolve()
        file = (root / relative).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return None
        return file


def _file_headers(start: int, end: int) -> dict[str, str]:
    return {
        "Content-Type": "application/octet-stream",
        "Content-Length": str(end - start),
        "Accept-Ranges": "bytes",
    }


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range; None if invalid.

    Stricter than RFC 9110, which says to ignore a malformed Range and send the whole file:
    here it is a 416, so a client bug shows up as a failure instead of a silent full download.
    """
    match = RANGE_RE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if first == "" and last == "":
        return None
    if first == "":  # suffix range: the last n bytes
        count = int(last)
        return (max(size - count, 0), size) if count > 0 and size > 0 else None
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if start >= size or start >= end:
        return None
    return start, end


@pytest.fixture(scope="session")
def _http_server_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeHTTPServer]:
    root = tmp_path_factory.mktemp("http-root")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    httpd.daemon_threads = True
    owner = RangeHTTPServer(server=httpd, root=root)
    # A handler subclass per server, so the handler finds its counters without globals.
    httpd.RequestHandlerClass = type("Handler", (RangeRequestHandler,), {"owner": owner})
    thread = threading.Thread(target=httpd.serve_forever, name="range-http", daemon=True)
    thread.start()
    try:
        yield owner
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http_server(_http_server_session: RangeHTTPServer, tmp_path: Path) -> Iterator[RangeHTTPServer]:
    """The HTTP server with an empty root of this test's own and zeroed counters."""
    server = _http_server_session
    root = tmp_path / "http-root"
    root.mkdir()
    server.root = root
    server.reset()
    yield server
    server.reset()
