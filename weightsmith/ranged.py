"""One ranged reader for every source: local files, s3:// and http(s):// URLs.

Only the bytes asked for are fetched: `read(start, end)` is a `cat_file(path, start, end)` (a
ranged GET on S3 and HTTP), never a read-ahead cache. A remote read above `RANGE_BYTES` is cut
into ranges fetched at once on a shared pool, into one buffer; the remote bytes in flight of
the whole process stay under `READ_BUDGET_BYTES`, and a range that fails or comes back short is
fetched again (`RETRIES` times). Filesystems come from `fs_for(url)`, which takes S3 endpoint,
keys and region from the standard AWS variables.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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

    @property
    def local(self) -> bool:
        """Whether the file is on this machine's file system (read into arrays, fingerprinted)."""
        return isinstance(self.fs, LocalFileSystem)

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the file; a short read is an error naming the file."""
        if start == end:
            return b""
        self._check(start, end)
        if not self.local and end - start > RANGE_BYTES:
            return self.read_array(start, end).tobytes()
        if not self.local:
            return self._fetch(start, end)
        data = self.fs.cat_file(self.path, start=start, end=end)
        self._count(start, end, len(data))
        return data

    def read_array(self, start: int, end: int, out: np.ndarray | None = None) -> np.ndarray:
        """Bytes [start, end) as a uint8 array: `out` (that many bytes) when given, else a new one.

        A local file is read straight into the array, without a bytes object in between; a
        remote one in ranges of `RANGE_BYTES` fetched at once, each copied in as it arrives.
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

        def one(s: int, e: int) -> None:
            with _budget:
                out[s - start : e - start] = np.frombuffer(self._fetch(s, e), np.uint8)

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

    def _fetch(self, start: int, end: int) -> bytes:
        """One ranged GET of [start, end), again after a failure or a short body (`RETRIES` times)."""
        for attempt in range(RETRIES + 1):
            try:
                data = self.fs.cat_file(self.path, start=start, end=end)
            except (FileNotFoundError, PermissionError):
                raise  # the object went away or access was revoked: trying again will not help
            except Exception:  # a dropped connection, a timeout, a server error
                if attempt == RETRIES:
                    raise
            else:
                with self._lock:
                    self.bytes_read += len(data)
                if len(data) == end - start:
                    return data
                if attempt == RETRIES:
                    raise WeightsmithError(
                        self.url, f"short read: wanted {end - start} bytes at {start}, got {len(data)}"
                    )
            with self._lock:
                self.retries += 1
            time.sleep(RETRY_DELAY_S * 2**attempt)
        raise AssertionError("unreachable")

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
