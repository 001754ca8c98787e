"""The test servers themselves: SeaweedFS S3 (keys, rights, ranges, conditional writes) and
the ranged HTTP server (ranges, byte counting, 404), checked before other tests rely on them.
"""

from __future__ import annotations

import http.client
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec
import pytest
from botocore.exceptions import ClientError

from weightsmith.dev.seaweed import S3Server, grpc_socket_paths, s3_client, start_s3_server
from weightsmith.ranged import s3_options

if TYPE_CHECKING:
    from conftest import RangeHTTPServer

PAYLOAD = bytes(range(256)) * 4


def error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def test_fixtures_dir_exists(fixtures_dir: Path) -> None:
    assert (fixtures_dir / "README.md").is_file()


# --- S3 -----------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_server_put_get_list(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="dir/blob.bin", Body=PAYLOAD)
    assert client.get_object(Bucket=s3_bucket, Key="dir/blob.bin")["Body"].read() == PAYLOAD
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    assert s3_bucket in names
    assert s3_server.startup_seconds < 60


@pytest.mark.s3
def test_s3fs_ranged_read_from_env(s3_env: S3Server, s3_bucket: str) -> None:
    s3_env.client().put_object(Bucket=s3_bucket, Key="blob.bin", Body=PAYLOAD)
    fs = fsspec.filesystem("s3", **s3_options())
    assert fs.cat_file(f"{s3_bucket}/blob.bin", start=10, end=20) == PAYLOAD[10:20]
    assert fs.info(f"{s3_bucket}/blob.bin")["size"] == len(PAYLOAD)


@pytest.mark.s3
def test_s3_wrong_secret_is_denied(s3_server: S3Server) -> None:
    client = s3_client(s3_server.endpoint, s3_server.access_key, "wrong", s3_server.region)
    with pytest.raises(ClientError) as excinfo:
        client.list_buckets()
    assert error_code(excinfo) in {"SignatureDoesNotMatch", "AccessDenied"}


@pytest.mark.s3
def test_s3_unknown_key_is_denied(s3_server: S3Server) -> None:
    client = s3_client(s3_server.endpoint, "NOSUCHKEY", "whatever", s3_server.region)
    with pytest.raises(ClientError) as excinfo:
        client.list_buckets()
    assert error_code(excinfo) in {"InvalidAccessKeyId", "AccessDenied"}


@pytest.mark.s3
def test_s3_readonly_identity_reads_but_cannot_write(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="blob.bin", Body=PAYLOAD)
    readonly = s3_server.client(readonly=True)
    assert readonly.get_object(Bucket=s3_bucket, Key="blob.bin")["Body"].read() == PAYLOAD
    with pytest.raises(ClientError) as excinfo:
        readonly.put_object(Bucket=s3_bucket, Key="other.bin", Body=b"x")
    assert error_code(excinfo) == "AccessDenied"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


@pytest.mark.s3
def test_s3fs_readonly_env_gets_permission_error(
    s3_server: S3Server, s3_bucket: str, s3_readonly_env: S3Server
) -> None:
    # s3_readonly_env comes after s3_bucket in the arguments, so its variables win.
    fs = fsspec.filesystem("s3", **s3_options())
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{s3_bucket}/denied.bin", b"x")


@pytest.mark.s3
def test_s3_conditional_put_if_none_match(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="once", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as excinfo:
        client.put_object(Bucket=s3_bucket, Key="once", Body=b"second", IfNoneMatch="*")
    assert error_code(excinfo) == "PreconditionFailed"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=s3_bucket, Key="once")["Body"].read() == b"first"


@pytest.mark.s3
def test_s3_conditional_put_if_match(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    etag = client.put_object(Bucket=s3_bucket, Key="doc", Body=b"v1")["ETag"]
    new_etag = client.put_object(Bucket=s3_bucket, Key="doc", Body=b"v2", IfMatch=etag)["ETag"]
    assert new_etag != etag
    # The old ETag no longer matches: a writer that read v1 must not overwrite v2.
    with pytest.raises(ClientError) as excinfo:
        client.put_object(Bucket=s3_bucket, Key="doc", Body=b"v3", IfMatch=etag)
    assert error_code(excinfo) == "PreconditionFailed"
    with pytest.raises(ClientError) as excinfo:
        client.put_object(Bucket=s3_bucket, Key="missing", Body=b"x", IfMatch=etag)
    assert error_code(excinfo) in {"PreconditionFailed", "NoSuchKey"}
    assert client.get_object(Bucket=s3_bucket, Key="doc")["Body"].read() == b"v2"


@pytest.mark.s3
@pytest.mark.slow
def test_stop_leaves_no_weed_process(tmp_path: Path) -> None:
    server = start_s3_server(tmp_path / "second")
    try:
        assert server.running()
        assert server.client().list_buckets()["Buckets"] == []
    finally:
        server.stop()
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    found = subprocess.run(["pgrep", "-f", str(server.data_dir)], capture_output=True, text=True)
    assert found.returncode == 1, f"processes left behind: {found.stdout}"
    assert not [p for p in grpc_socket_paths(server.ports) if p.exists()]


# --- HTTP ---------------------------------------------------------------------------------


def test_http_ranged_read_counts_only_the_range(http_server: RangeHTTPServer) -> None:
    (http_server.root / "blob.bin").write_bytes(PAYLOAD)
    fs = fsspec.filesystem("http", block_size=0)
    data = fs.cat_file(http_server.url_for("blob.bin"), start=10, end=20)
    assert data == PAYLOAD[10:20]
    assert http_server.bytes_sent == {"blob.bin": 10}
    ranged = [r for r in http_server.requests if r[0] == "GET"]
    assert ranged == [("GET", "blob.bin", "bytes=10-19")]


def test_http_head_reports_size(http_server: RangeHTTPServer) -> None:
    (http_server.root / "blob.bin").write_bytes(PAYLOAD)
    fs = fsspec.filesystem("http", block_size=0)
    assert fs.info(http_server.url_for("blob.bin"))["size"] == len(PAYLOAD)
    assert http_server.bytes_sent.get("blob.bin", 0) == 0


def test_http_missing_file_is_file_not_found(http_server: RangeHTTPServer) -> None:
    fs = fsspec.filesystem("http", block_size=0)
    with pytest.raises(FileNotFoundError):
        fs.cat_file(http_server.url_for("missing.bin"), start=0, end=4)


@pytest.mark.parametrize(
    ("header", "status", "body"),
    [
        ("bytes=0-3", 206, PAYLOAD[:4]),
        ("bytes=1020-", 206, PAYLOAD[1020:]),
        ("bytes=-4", 206, PAYLOAD[-4:]),
        ("bytes=1000-5000", 206, PAYLOAD[1000:]),
        ("bytes=2000-2001", 416, b""),
        ("bytes=5-2", 416, b""),
        ("bytes=0-1,4-5", 416, b""),
        ("lines=1-2", 416, b""),
    ],
)
def test_http_range_header_forms(http_server: RangeHTTPServer, header: str, status: int, body: bytes) -> None:
    (http_server.root / "blob.bin").write_bytes(PAYLOAD)
    # http.client, not urllib: urllib would honour proxy variables set on a CI machine.
    host, port = http_server.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", "/blob.bin", headers={"Range": header})
        response = connection.getresponse()
        got_status, got_body = response.status, response.read()
        content_range = response.headers["Content-Range"]
    finally:
        connection.close()
    assert (got_status, got_body) == (status, body)
    if status == 416:
        assert content_range == f"bytes */{len(PAYLOAD)}"
    else:
        assert content_range.endswith(f"/{len(PAYLOAD)}")
    assert http_server.bytes_sent["blob.bin"] == len(body)
