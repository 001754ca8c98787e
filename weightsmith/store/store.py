"""A key-value view of a store URL (a local folder or s3://bucket/prefix) on fsspec.

Keys are '/'-separated paths below the store root. Whole-object writes are atomic on both
back ends (S3 PUTs are; local writes go to a temporary name and are renamed), and
`create_if_absent` / `replace_if_match` are conditional writes, used for manifests so that two
writers never both believe they published a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from collections.abc import Iterator

import zarr

from weightsmith.errors import WeightsmithError
from weightsmith.ranged import fs_for, s3_options, split_url


class Store:
    """The artifact store at `url` (a path, file:// or s3:// URL)."""

    def __init__(self, url: str):
        self.protocol, self.root = split_url(str(url))
        if self.protocol not in ("file", "s3"):
            raise WeightsmithError(str(url), "a store must be a local folder or an s3:// URL")
        self.root = self.root.rstrip("/")
        self.url = self.root if self.protocol == "file" else f"s3://{self.root}"
        self.fs, _ = fs_for(self.url)
        self._s3_client = None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # -- addressing ------------------------------------------------------------------------
    def path(self, key: str) -> str:
        """The fsspec path of `key`."""
        parts = key.split("/")
        if key.startswith("/") or ".." in parts or "\\" in key or "\x00" in key:
            raise WeightsmithError(self.url, f"key {key!r} is not a key inside the store")
        return f"{self.root}/{key}" if key else self.root

    def url_of(self, key: str) -> str:
        return f"s3://{self.path(key)}" if self.protocol == "s3" else self.path(key)

    # -- whole objects ---------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def read_bytes(self, key: str) -> bytes:
        return self.fs.cat_file(self.path(key))

    def read_json(self, key: str):
        return json.loads(self.read_bytes(key))

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object atomically (a reader sees the old object or the new one)."""
        path = self.path(key)
        if self.protocol == "s3":
            self.fs.pipe_file(path, data)
            return
        with self._local_tmp(path) as tmp:
            with _create(tmp) as f:
                f.write(data)
            os.replace(tmp, path)

    def write_json(self, key: str, value) -> None:
        self.write_bytes(key, dumps(value))

    def put_file(self, local_path: str, key: str) -> None:
        """Upload (or move, on a local store) a finished local file to `key`, atomically."""
        path = self.path(key)
        if self.protocol == "s3":
            self.fs.put_file(local_path, path)
            os.unlink(local_path)
            return
        try:
            os.replace(local_path, path)
        except FileNotFoundError:  # the folder is new (or `local_path` is gone: raised again)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(local_path, path)

    def local_tmp_dir(self) -> str | None:
        """A folder on the store's file system for staging files (None for S3)."""
        if self.protocol != "file":
            return None
        d = os.path.join(self.root, ".tmp")
        os.makedirs(d, exist_ok=True)
        return d

    def create_if_absent(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False when it already did."""
        path = self.path(key)
        if self.protocol == "s3":
            bucket, _, obj = path.partition("/")
            try:
                self._client().put_object(Bucket=bucket, Key=obj, Body=data, IfNoneMatch="*")
            except Exception as e:  # botocore ClientError; imported lazily
                if _status(e) in (409, 412):
                    return False
                raise
            return True
        with self._local_tmp(path) as tmp:
            with _create(tmp) as f:
                f.write(data)
            try:
                os.link(tmp, path)  # atomic: fails if `path` exists
            except FileExistsError:
                return False
        return True

    def replace_if_match(self, key: str, data: bytes, expected: bytes) -> bool:
        """Replace `key` only if it still holds `expected`; False when someone changed it."""
        path = self.path(key)
        if self.protocol == "s3":
            bucket, _, obj = path.partition("/")
            client = self._client()
            try:
                head = client.get_object(Bucket=bucket, Key=obj)
                if head["Body"].read() != expected:
                    return False
                client.put_object(Bucket=bucket, Key=obj, Body=data, IfMatch=head["ETag"])
            except Exception as e:
                if _status(e) in (404, 409, 412):
                    return False
                raise
            return True
        lock_path = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    if f.read() != expected:
                        return False
            except FileNotFoundError:
                return False
            self.write_bytes(key, data)
        return True

    # -- listings --------------------------------------------------------------------------
    def list(self, prefix: str) -> list[str]:
        """Keys of every object below `prefix` (recursive), relative to the store root."""
        base = self.path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        start = len(self.root) + 1
        return sorted(p[start:] for p in found)

    def delete(self, prefix: str) -> None:
        """Delete one object or everything below a prefix."""
        path = self.path(prefix)
        # s3fs lists from its cache: objects written since the last listing would be left behind.
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def size(self, prefix: str) -> int:
        try:
            return int(self.fs.du(self.path(prefix), total=True))
        except FileNotFoundError:
            return 0

    # -- zarr ------------------------------------------------------------------------------
    def zarr_store(self, key: str, read_only: bool = False):
        """A zarr store rooted at `key` (a `.zarr` folder of arrays)."""
        if self.protocol == "file":
            return zarr.storage.LocalStore(self.path(key), read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url_of(key), storage_options=s3_options(), read_only=read_only)

    # -- checks ----------------------------------------------------------------------------
    def check_writable(self) -> None:
        """Write and delete a probe object; raise a one-line error when that fails."""
        key = f".probe/{uuid.uuid4().hex}"
        try:
            if self.protocol == "file":
                os.makedirs(self.root, exist_ok=True)
            elif not self.fs.exists(self.root.split("/")[0]):
                raise WeightsmithError(self.url, "bucket does not exist or is not visible with these credentials")
            self.write_bytes(key, b"probe")
            self.delete(key)
        except WeightsmithError:
            raise
        except Exception as e:
            raise WeightsmithError(self.url, f"store is not writable ({_reason(e)})") from None

    def presign(self, key: str, expires: int = 7 * 24 * 3600) -> str:
        """A URL a browser can open: presigned on S3, file:// locally."""
        if self.protocol == "s3":
            bucket, _, obj = self.path(key).partition("/")
            return self._client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": obj}, ExpiresIn=expires
            )
        return "file://" + self.path(key)

    # -- private ---------------------------------------------------------------------------
    def _client(self):
        if self._s3_client is None:
            import boto3
            from botocore.config import Config

            opts = s3_options()
            # A session of its own: boto3's default session keeps the first credentials it found,
            # so a later change of the AWS variables (another identity, rotated keys) was ignored.
            self._s3_client = boto3.session.Session().client(
                "s3",
                endpoint_url=opts["client_kwargs"].get("endpoint_url"),
                region_name=opts["client_kwargs"].get("region_name"),
                config=Config(signature_version="s3v4", **opts["config_kwargs"]),
            )
        return self._s3_client

    @contextlib.contextmanager
    def _local_tmp(self, path: str) -> Iterator[str]:
        """A temporary name beside `path`, removed if still there at the end (`_create` makes the folder)."""
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _create(path: str):
    """Open a new file for writing, making its folder only when it is missing.

    Trying the open first spares a failing mkdir for every object written into a folder that
    is already there (most of them).
    """
    try:
        return open(path, "wb")
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")


def dumps(value) -> bytes:
    """Canonical JSON bytes: sorted keys, fixed separators, so equal content is equal bytes."""
    return (json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode(
        "utf-8", "surrogatepass"
    )


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]
