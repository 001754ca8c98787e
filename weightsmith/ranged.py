"""One ranged reader for every source: local files, s3:// and http(s):// URLs.

Only the bytes asked for are fetched: `read(start, end)` is one ranged GET on S3 and HTTP (a
`cat_file(path, start, end)` on other filesystems), never a read-ahead cache. A remote read above
`RANGE_BYTES` is cut into ranges fetched at once on a shared pool, into one buffer; the remote
bytes in flight of the whole process stay under `READ_BUDGET_BYTES`, and a range that fails or
comes back short is fetched again (`RETRIES` times). Filesystems come from `fs_for(url)`, which
takes S3 endpoint, keys and region from the standard AWS variables.

Headers, listings and sizes go through fsspec. The range GETs on S3 and HTTP do not: they go
through a blocking botocore client (`s3_client`, made from the same variables) or a urllib3
pool, and the body is received straight into the caller's buffer. s3fs's `cat_file` (aiohttp:
a body gathered in small pieces, joined, then copied in) took about twice the client CPU in a
microbenchmark of 8 MB ranges here; inside the reader the streaming CPU fell by about a fifth
(bench/RESULTS.md), CPU that on 2 cores hashing and writing need.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlparse

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from weightsmith.errors import WeightsmithError

# A remote read above this many bytes is fetched as several ranges at once: one GET stream is
# slower than the link on S3 and HTTP servers alike, several in flight fill it.
RANGE_BYTES = 8 << 20
# Remote bytes being fetched at once in this process, every reader and thread together: a
# range waits for room before its GET starts, so memory stays bounded whatever the callers do.
READ_BUDGET_BYTES = 96 << 20
RETRIES = 3  # a failed or short range is fetched again this many times
RETRY_DELAY_S = 0.2  # doubled after each try
_budget = threading.BoundedSemaphore(READ_BUDGET_BYTES // RANGE_BYTES)  # one slot per range
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _range_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:  # the GETs wait on the network, not the CPU: more threads than cores
            _pool = ThreadPoolExecutor(READ_BUDGET_BYTES // RANGE_BYTES, thread_name_prefix="weightsmith-range")
        return _pool


class Getter(Protocol):
    """One ranged GET of [start, end) of its file into `out` (end - start bytes); returns the bytes
    the server sent (fewer is a short read). Missing: FileNotFoundError; denied: PermissionError."""

    def __call__(self, start: int, end: int, out: memoryview) -> int: ...


class HTTPStatusError(Exception):
    """A ranged GET answered with an error status (`status`: 503, ...); not an OSError, which
    extraction reads as a problem of the store."""

    def __init__(self, url: str, status: int, start: int, end: int):
        super().__init__(f"{url}: HTTP {status} for bytes {start}-{end - 1}")
        self.status = status


def s3_options() -> dict:
    """s3fs options from the standard AWS environment variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    # A hung request fails after these timeouts and the caller (a Prefect task) retries.
    config: dict = {"connect_timeout": 10, "read_timeout": 120}
    if endpoint:
        # Path-style addressing: MinIO and SeaweedFS on loopback have no per-bucket host names.
        config["s3"] = {"addressing_style": "path"}
    return {"client_kwargs": client_kwargs, "config_kwargs": config, "default_block_size": 1 << 20}


def split_url(url: str) -> tuple[str, str]:
    """(protocol, path) with `file` for plain paths; the path is what fsspec expects."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = parsed.path if parsed.scheme == "file" else url
        return "file", os.path.abspath(os.path.expanduser(path))
    if parsed.scheme in ("s3", "s3a"):
        return "s3", f"{parsed.netloc}{parsed.path}"
    if parsed.scheme in ("http", "https"):
        return parsed.scheme, url
    raise WeightsmithError(url, f"unsupported URL scheme {parsed.scheme!r} (use a path, s3:// or http(s)://)")


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for a URL and the path inside it."""
    protocol, path = split_url(url)
    if protocol == "s3":
        return fsspec.filesystem("s3", **s3_options()), path
    if protocol in ("http", "https"):
        # No block cache: every read is one ranged GET of exactly the bytes asked for.
        return fsspec.filesystem(protocol, block_size=0), path
    return fsspec.filesystem("file"), path


def join_url(base: str, *parts: str) -> str:
    """Join URL or path components with '/' (no normalisation of '..': callers never pass it)."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def s3_client(fs: fsspec.AbstractFileSystem | None = None):
    """This process's botocore S3 client for the current AWS variables (thread-safe, one per setting).

    The same endpoint, region, addressing and timeouts as the s3fs of `fs_for`, with a
    connection for every range the read budget lets run at once. Given an s3fs that has
    connected, the client reads botocore's S3 model from that session's loader, which has it
    parsed already (about 0.1-0.2 CPU s here otherwise).
    """
    options = s3_options()
    key = (repr(options), tuple(os.environ.get(k) for k in _CREDENTIALS))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import botocore.session
            from botocore.config import Config

            config = Config(**options["config_kwargs"], max_pool_connections=_budget_slots() + 4)
            session = botocore.session.get_session()
            loader = getattr(getattr(fs, "session", None), "get_component", None)
            if loader is not None:
                session.register_component("data_loader", loader("data_loader"))
            client = session.create_client("s3", **options["client_kwargs"], config=config)
            _clients[key] = client
        return client


def _budget_slots() -> int:
    return READ_BUDGET_BYTES // RANGE_BYTES


def _http_pool():
    """This process's urllib3 pool for ranged HTTP GETs: redirects followed, no retries of its
    own (the reader retries a failed range), the timeouts of the S3 client."""
    import urllib3

    with _clients_lock:
        pool = _clients.get(("http",))
        if pool is None:
            retries = urllib3.Retry(total=10, connect=0, read=0, status=0, other=0, redirect=10)
            timeout = urllib3.Timeout(connect=10, read=120)
            pool = _clients[("http",)] = urllib3.PoolManager(
                maxsize=_budget_slots() + 4, retries=retries, timeout=timeout
            )
        return pool


def _receive(raw, out: memoryview) -> int:
    """Read a urllib3 response body into `out` until it is full or the body ends; the bytes read.

    The body goes from the socket into `out` (http.client's `readinto`), not through urllib3's
    `read`, which copies every piece once more; a body with a content encoding goes through
    urllib3 (our requests ask for none).
    """
    fp = getattr(raw, "_fp", None)
    plain = fp is not None and not raw.headers.get("Content-Encoding") and hasattr(fp, "readinto")
    got = 0
    while got < len(out):
        n = fp.readinto(out[got:]) if plain else raw.readinto(out[got:])
        if not n:
            break
        got += n
    if got == len(out) and (fp.read(1) if plain else raw.read(1)):
        got += 1  # more than the range: the caller sees a count it did not ask for
    return got


def _body_into(raw, out: memoryview) -> int:
    """`_receive`, then the connection back to the pool after a whole body; after anything else
    (an error, a short or long body) it is dropped: unread bytes would be taken for the next reply."""
    try:
        got = _receive(raw, out)
    except BaseException:
        raw.close()
        raise
    if got == len(out):
        raw.release_conn()
    else:
        raw.close()
    return got


def _status_error(url: str, status: int, start: int, end: int) -> Exception:
    if status == 404:
        return FileNotFoundError(f"{url}: HTTP 404")
    if status in (401, 403):
        return PermissionError(f"{url}: HTTP {status}")
    if status == 200:
        return WeightsmithError(url, "the server ignores byte ranges (HTTP 200 for a Range request)")
    return HTTPStatusError(url, status, start, end)


def s3_getter(path: str, fs: fsspec.AbstractFileSystem | None = None) -> Getter:
    """Ranged GETs of objects of `s3_client(fs)`; `path` is bucket/key."""
    from botocore.exceptions import ClientError

    bucket, _, key = path.partition("/")
    client = s3_client(fs)

    def get(start: int, end: int, out: memoryview) -> int:
        try:
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise FileNotFoundError(f"s3://{path}: {code}") from e
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise PermissionError(f"s3://{path}: {code}") from e
            raise
        return _body_into(response["Body"]._raw_stream, out)  # urllib3's response, read into `out`

    return get


def http_getter(url: str) -> Getter:
    """Ranged GETs of `url` through `_http_pool()`."""
    pool = _http_pool()

    def get(start: int, end: int, out: memoryview) -> int:
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        raw = pool.request("GET", url, headers=headers, preload_content=False, decode_content=False)
        whole_file = raw.status == 200 and start == 0 and raw.headers.get("Content-Length") == str(end)
        if raw.status != 206 and not whole_file:
            raw.close()
            raise _status_error(url, raw.status, start, end)
        return _body_into(raw, out)

    return get


def getter_for(fs: fsspec.AbstractFileSystem, path: str) -> Getter | None:
    """The direct ranged GET for an S3 or HTTP filesystem; None for others (they use cat_file)."""
    from fsspec.implementations.http import HTTPFileSystem

    if any(c.__name__ == "S3FileSystem" for c in type(fs).__mro__):  # s3fs, without importing it
        return s3_getter(path, fs)
    if isinstance(fs, HTTPFileSystem):
        return http_getter(path)
    return None


@dataclass
class RangedReader:
    """Reads byte ranges of one file; counts what it fetched (tests and benchmarks read it)."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str
    size: int
    bytes_read: int = field(default=0)
    retries: int = field(default=0)  # short ranges fetched again (tests read it)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # bytes_read
    _get: Getter | None = field(default=None, init=False, repr=False, compare=False)  # S3 and HTTP ranges

    @property
    def local(self) -> bool:
        """Whether the file is on this machine's file system (read into arrays, fingerprinted)."""
        return isinstance(self.fs, LocalFileSystem)

    def __post_init__(self) -> None:
        self._get = None if self.local else getter_for(self.fs, self.path)

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file; a short read is an error naming the file."""
        if start == end:
            return b""
        self._check(start, end)
        if not self.local and end - start > RANGE_BYTES:
            return self.read_array(start, end).tobytes()
        if not self.local:
            out = bytearray(end - start)
            self._fetch(start, end, memoryview(out))
            return bytes(out)
        data = self.fs.cat_file(self.path, start=start, end=end)
        self._count(start, end, len(data))
        return data

    def read_array(self, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes [start, end) as a uint8 array: `out` (that many bytes) when given, else a new one.

        A local file is read straight into the array, without a bytes object in between; a
        remote one in ranges of `RANGE_BYTES` fetched at once, each received into its place.
        """
        if start == end:
            return np.empty(0, np.uint8) if out is None else out
        self._check(start, end)
        out = np.empty(end - start, np.uint8) if out is None else out
        if not self.local:
            self._fetch_into(start, end, out)
            return out
        got = 0
        with open(self.path, "rb", buffering=0) as f:
            f.seek(start)
            while got < out.size and (n := f.readinto(memoryview(out)[got:])):
                got += n
        self._count(start, end, got)
        return out

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.size:
            raise WeightsmithError(self.url, f"range [{start}, {end}) is outside the file ({self.size} bytes)")

    def _fetch_into(self, start: int, end: int, out: np.ndarray) -> None:
        """Fetch [start, end) into `out` as ranges in flight at once (within the process budget)."""
        bounds = [(s, min(end, s + RANGE_BYTES)) for s in range(start, end, RANGE_BYTES)]
        view = memoryview(out).cast("B")

        def one(s: int, e: int) -> None:
            with _budget:
                self._fetch(s, e, view[s - start : e - start])

        if len(bounds) == 1:
            one(*bounds[0])
            return
        futures = [_range_pool().submit(one, s, e) for s, e in bounds]
        try:
            for f in futures:
                f.result()
        finally:  # on an error, nothing writes into `out` after this returns
            for f in futures:
                f.cancel()
            for f in futures:
                if not f.cancelled():
                    f.exception()

    def _fetch(self, start: int, end: int, out: memoryview) -> None:
        """One ranged GET of [start, end) into `out`, again after a failure or a short body (`RETRIES` times)."""
        for attempt in range(RETRIES + 1):
            try:
                got = self._get_into(start, end, out)
            except (FileNotFoundError, PermissionError, WeightsmithError):
                raise  # the object went away, access was revoked, the server ignores ranges
            except Exception:  # a dropped connection, a timeout, a server error
                if attempt == RETRIES:
                    raise
            else:
                with self._lock:
                    self.bytes_read += got
                if got == end - start:
                    return
                if attempt == RETRIES:
                    raise WeightsmithError(self.url, f"short read: wanted {end - start} bytes at {start}, got {got}")
            with self._lock:
                self.retries += 1
            time.sleep(RETRY_DELAY_S * 2**attempt)
        raise AssertionError("unreachable")

    def _get_into(self, start: int, end: int, out: memoryview) -> int:
        if self._get is not None:
            return self._get(start, end, out)
        data = self.fs.cat_file(self.path, start=start, end=end)
        n = min(len(data), len(out))
        out[:n] = data[:n]
        return len(data)

    def fingerprint(self) -> tuple | None:
        """(device, inode, size, mtime, ctime) of a local file; None for remote files.

        Writing a file changes its mtime and ctime (ctime cannot be set back) and replacing it
        its inode, so an unchanged fingerprint means the bytes are those read before.
        """
        if not self.local:
            return None
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _count(self, start: int, end: int, got: int) -> None:
        with self._lock:  # reads of several threads
            self.bytes_read += got
        if got != end - start:
            raise WeightsmithError(self.url, f"short read: wanted {end - start} bytes at {start}, got {got}")


def open_reader(url: str, fs: fsspec.AbstractFileSystem | None = None) -> RangedReader:
    """A ranged reader on `url`; a missing or unreadable file is a one-line error."""
    if fs is None:
        fs, path = fs_for(url)
    else:
        path = split_url(url)[1]
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise WeightsmithError(url, "no such file") from None
    except PermissionError as e:
        raise WeightsmithError(url, f"access denied ({_reason(e)})") from None
    except OSError as e:
        raise WeightsmithError(url, f"cannot open ({_reason(e)})") from None
    if info.get("type") == "directory":
        raise WeightsmithError(url, "is a directory, not a file")
    size = info.get("size")
    if size is None:
        raise WeightsmithError(url, "the server does not report the file size")
    return RangedReader(url=url, fs=fs, path=path, size=int(size))


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
