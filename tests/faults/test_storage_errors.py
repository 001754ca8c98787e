"""Storage that refuses writes: a full disk, a file-size limit, a read-only mount and an S3
identity with read-only rights. Each time an earlier model in the same store stays intact
(byte for byte, and `verify` passes), nothing of the new model is published, and the error is
one line `error: ...` with exit status 2 (no traceback).

Tests run as root, where file permissions do not stop writes: a tiny tmpfs (`mount -t tmpfs`),
`remount,ro`, RLIMIT_FSIZE (`ulimit -f`, with SIGXFSZ ignored so write() fails with EFBIG) and
the server's read-only S3 identity do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_helpers import count_whole_tensors, write_model

from weightsmith.dev.seaweed import S3Server
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith.store import Store, arrays
from weightsmith.verify import verify

BIG_TENSORS = 12


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """(small: 2 KB of tensors, big: 12 MB in 12 tensors of 1 MB)."""
    small = write_model(tmp_path / "src" / "small" / "model.safetensors", 2, 16, 16, seed=1)
    big = write_model(tmp_path / "src" / "big" / "model.safetensors", BIG_TENSORS, 256, 1024, seed=2)
    return small, big


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(folder))
    monkeypatch.setenv("COLUMNS", "200")
    return folder


def cli(*args: object, preexec_fn=None) -> subprocess.CompletedProcess[str]:
    """`python -m weightsmith.cli ARGS` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec_fn,
    )


def extract_cli(source: Path | str, store: Path | str, *more: str, preexec_fn=None):
    return cli("extract", source, "--store", store, "--no-prefect", *more, preexec_fn=preexec_fn)


def model_url_of(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, (run.stdout, run.stderr)
    return run.stdout.strip().splitlines()[-1]


def assert_one_line_error(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, exactly one stderr line `error: ...` holding every fragment, no traceback."""
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (the runs/ records of later runs aside)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_unpublished_and_whole(model_url: str) -> int:
    """No manifest; every tensor with a record holds the values its record names.
    Returns how many tensors are finished."""
    model = parse_model_url(model_url)
    assert not model.is_complete()
    return count_whole_tensors(model, (f"layer.{i}.weight" for i in range(BIG_TENSORS)), images=True)


# --- mounts ---------------------------------------------------------------------------------


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted on `where` (root with CAP_SYS_ADMIN; else the test skips)."""
    where.mkdir(parents=True)
    mounted = _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, options: str) -> None:
    result = _mount("-o", f"remount,{options}", str(where))
    assert result.returncode == 0, result.stderr


def file_size_limit(limit: int):
    """preexec_fn: RLIMIT_FSIZE of `limit` bytes; SIGXFSZ ignored, so writes fail with EFBIG."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def fill_up(folder: Path) -> Path:
    """Take every free byte of the file system of `folder` with one file; returns it."""
    filler = folder / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        free = shutil.disk_usage(folder).free
        for _ in range(200):  # halving on ENOSPC ends within a few dozen tries
            if free <= 0:
                break
            try:
                os.posix_fallocate(fd, os.fstat(fd).st_size, free)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                free //= 2
                continue
            free = shutil.disk_usage(folder).free
        assert shutil.disk_usage(folder).free < 64 * 1024, "the disk did not fill up"
    finally:
        os.close(fd)
    return filler


def big_model_url(store: Path, big: Path, tmp_path: Path) -> str:
    """Where the big model goes: its content revision, from a scratch extraction."""
    scratch = tmp_path / f"scratch-{uuid.uuid4().hex[:8]}"
    revision = extract(str(big), ExtractOptions(store=str(scratch), images="none")).revision
    return f"{store}/models/big/{revision}"


# --- a full disk ------------------------------------------------------------------------------


def test_full_disk_is_refused_up_front(home: Path, models, tmp_path: Path) -> None:
    small, big = models
    with mounted_tmpfs(tmp_path / "tmpfs", "3m") as disk:
        store = disk / "store"
        first = model_url_of(extract_cli(small, store))
        before = snapshot(store)
        assert_one_line_error(extract_cli(big, store), str(store), "free")
        assert snapshot(store) == before  # nothing of the big model, the small one untouched
        report = verify(first)
        assert report.ok, report.problems


def extract_until_full(big: Path, store: Path, model_url: str, disk: Path):
    """Start extracting `big`; once its first tensor is finished, fill the disk. Returns the
    finished process."""
    model = parse_model_url(model_url)
    tensors = Path(model.store.path(model.key("tensors")))
    command = [sys.executable, "-m", "weightsmith.cli", "extract", str(big), "--store", str(store)]
    process = subprocess.Popen([*command, "--no-prefect"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if any(f'"{arrays.RECORD}"' in _text(m) for m in tensors.glob("*.zarr/zarr.json")):
                break
            time.sleep(0.005)
        assert process.poll() is None, "the extraction ended before the disk was full"
        fill_up(disk)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def test_disk_full_mid_run_keeps_earlier_artifacts_and_resumes(home: Path, models, tmp_path: Path) -> None:
    small, big = models
    with mounted_tmpfs(tmp_path / "tmpfs", "48m") as disk:
        store = disk / "store"
        big_url = big_model_url(store, big, tmp_path)
        first = model_url_of(extract_cli(small, store))
        first_folder = store / "models" / "small"
        before = snapshot(first_folder)

        failed = extract_until_full(big, store, big_url, disk)
        assert failed.returncode != 0, failed.stderr
        assert "No space left on device" in failed.stderr, failed.stderr[-2000:]
        assert snapshot(first_folder) == before  # byte for byte
        report = verify(first)
        assert report.ok, report.problems
        finished = assert_unpublished_and_whole(big_url)
        assert 1 <= finished < BIG_TENSORS

        # Room again: the same command finishes only what is missing, and publishes.
        (disk / "filler.bin").unlink()
        resumed = extract_cli(big, store, "--json")
        assert resumed.returncode == 0, resumed.stderr
        result = json.loads(resumed.stdout)
        assert result["model_url"] == big_url
        assert (result["written"], result["skipped"]) == (BIG_TENSORS - finished, finished)
        report = verify(big_url)
        assert report.ok, report.problems
        assert snapshot(first_folder) == before


def test_file_size_limit_keeps_earlier_artifacts_and_resumes(home: Path, models, tmp_path: Path) -> None:
    small, big = models
    store = tmp_path / "store"
    big_url = big_model_url(store, big, tmp_path)
    first = model_url_of(extract_cli(small, store))
    first_folder = store / "models" / "small"
    before = snapshot(first_folder)

    failed = extract_cli(big, store, preexec_fn=file_size_limit(200_000))
    assert failed.returncode != 0, failed.stdout
    assert "File too large" in failed.stderr, failed.stderr[-2000:]
    assert snapshot(first_folder) == before
    report = verify(first)
    assert report.ok, report.problems
    finished = assert_unpublished_and_whole(big_url)
    assert finished < BIG_TENSORS

    resumed = extract_cli(big, store, "--json")  # no limit now
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert (result["written"], result["skipped"]) == (BIG_TENSORS - finished, finished)
    report = verify(big_url)
    assert report.ok, report.problems


@pytest.mark.parametrize("kind", ["disk-full-mid-run", "file-size-limit"])
def test_refused_writes_mid_run_are_a_one_line_error(kind: str, home: Path, models, tmp_path: Path) -> None:
    small, big = models
    if kind == "file-size-limit":
        store = tmp_path / "store"
        model_url_of(extract_cli(small, store))
        assert_one_line_error(extract_cli(big, store, preexec_fn=file_size_limit(200_000)))
        return
    with mounted_tmpfs(tmp_path / "tmpfs", "48m") as disk:
        store = disk / "store"
        big_url = big_model_url(store, big, tmp_path)
        model_url_of(extract_cli(small, store))
        assert_one_line_error(extract_until_full(big, store, big_url, disk), str(store))


def test_failed_forced_rerun_keeps_the_published_model_whole(home: Path, models, tmp_path: Path) -> None:
    """A forced re-extraction of a published model that cannot write (a file-size limit here;
    a full disk or a kill does the same) must leave the published model as it was."""
    _, big = models
    store = tmp_path / "store"
    published = model_url_of(extract_cli(big, store))
    before = snapshot(store / "models")
    failed = extract_cli(big, store, "--force", preexec_fn=file_size_limit(200_000))
    assert failed.returncode != 0
    model = parse_model_url(published)
    assert model.is_complete()  # still listed as complete ...
    report = verify(published)
    assert report.ok, report.problems  # ... so it must still be whole
    changed = {k for k in before if snapshot(store / "models").get(k) != before[k]}
    assert not {k for k in changed if "/runs/" not in k}, sorted(changed)


# --- read-only storage ------------------------------------------------------------------------


def test_read_only_mount_is_a_one_line_error(home: Path, models, tmp_path: Path) -> None:
    small, big = models
    with mounted_tmpfs(tmp_path / "tmpfs", "3m") as disk:
        store = disk / "store"
        first = model_url_of(extract_cli(small, store))
        before = snapshot(store)
        remount(disk, "ro")
        try:
            assert_one_line_error(extract_cli(big, store), str(store), "not writable")
            # A complete model is no exception: the store is probed before anything else.
            assert_one_line_error(extract_cli(small, store), str(store), "not writable")
            assert snapshot(store) == before
            report = verify(first)  # reading a read-only store works
            assert report.ok, report.problems
        finally:
            remount(disk, "rw")


# --- S3: an identity with read-only rights ------------------------------------------------------


def s3_keys(server: S3Server, bucket: str, prefix: str = "") -> dict[str, str]:
    """ETag of every object under `prefix`, seen by the admin identity."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


def _use_identity(monkeypatch: pytest.MonkeyPatch, server: S3Server, readonly: bool) -> None:
    import s3fs

    for name, value in server.env(readonly=readonly).items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.s3
def test_s3_read_only_identity_is_a_one_line_error(
    home: Path,
    models: tuple[Path, Path],
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    small, big = models
    store = f"s3://{s3_bucket}/store"
    _use_identity(monkeypatch, s3_server, readonly=False)
    first = model_url_of(extract_cli(small, store))
    before = s3_keys(s3_server, s3_bucket)

    _use_identity(monkeypatch, s3_server, readonly=True)
    assert_one_line_error(extract_cli(big, store), store, "not writable")
    assert_one_line_error(extract_cli(small, store), store, "not writable")
    assert s3_keys(s3_server, s3_bucket) == before  # nothing written, nothing removed
    report = verify(first)  # the read-only identity may read
    assert report.ok, report.problems


@pytest.mark.s3
def test_manifest_writes_follow_the_identity_in_the_environment(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Conditional manifest writes (boto3, not s3fs) use the keys in the environment now, not
    the first ones the process saw (a regression test: they once came from boto3's default
    session, which resolves its credentials once per process)."""
    import boto3
    from botocore.exceptions import ClientError

    boto3.DEFAULT_SESSION = None  # as in a process that has not used boto3 yet
    _use_identity(monkeypatch, s3_server, readonly=False)
    admin_store = Store(f"s3://{s3_bucket}/store")
    assert admin_store.create_if_absent("models/a/1/manifest.json", b"{}\n")

    # Now the read-only identity: its s3fs writes are refused ...
    _use_identity(monkeypatch, s3_server, readonly=True)
    readonly_store = Store(f"s3://{s3_bucket}/store")
    with pytest.raises(PermissionError):
        readonly_store.write_bytes("models/b/1/runs/x.json", b"{}\n")
    # ... and so are its conditional manifest writes.
    with pytest.raises(ClientError) as denied:
        readonly_store.create_if_absent("models/b/1/manifest.json", b"{}\n")
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(ClientError):
        readonly_store.replace_if_match("models/a/1/manifest.json", b"[]\n", b"{}\n")
    assert sorted(s3_keys(s3_server, s3_bucket)) == ["store/models/a/1/manifest.json"]
    assert admin_store.read_bytes("models/a/1/manifest.json") == b"{}\n"
