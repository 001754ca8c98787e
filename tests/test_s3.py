"""Sources and stores on S3 (a real SeaweedFS server): round trips, folders, wrong keys,
read-only identities, and proof that reading a tensor fetches only its byte range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith import ranged
from weightsmith.dev.seaweed import S3Server
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith.ranged import open_reader
from weightsmith.restore import restore
from weightsmith.sources import open_source
from weightsmith.sources.safetensors import parse_safetensors
from weightsmith.verify import verify

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("state_in_tmp")]

SHARDED = "safetensors/sharded_minicpm3"


def write_model(path: Path, tensors: int = 4, rows: int = 64) -> Path:
    rng = np.random.default_rng(11)
    values = {f"layer.{i}.weight": rng.standard_normal((rows, 1024)).astype(np.float32) for i in range(tensors)}
    values["norm.weight"] = rng.standard_normal(1024).astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(values, str(path))
    return path


def header_size(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def keys(server: S3Server, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix`, listed with the admin identity."""
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_user_error(run: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize(
    "rel", ["random", "gguf/ollama_llama-2-tiny-random.gguf", "gptq/llama_3_2_1b_int4.safetensors"]
)
def test_s3_source_into_s3_store_round_trips(
    s3_bucket: str, s3_env: S3Server, fixtures_dir: Path, tmp_path: Path, rel: str
) -> None:
    if rel == "random":
        local = write_model(tmp_path / "model.safetensors")
        key = "src/org/model.safetensors"
    else:
        local = fixtures_dir / rel
        key = f"src/org/{local.name}"
    s3_env.client().upload_file(str(local), s3_bucket, key)
    url = f"s3://{s3_bucket}/{key}"
    result = extract(url, ExtractOptions(store=f"s3://{s3_bucket}/store"))
    assert result.model_url == f"s3://{s3_bucket}/store/models/org/{result.revision}"
    assert f"store/models/org/{result.revision}/manifest.json" in keys(s3_env, s3_bucket, "store/")

    out = tmp_path / "out" / local.name
    assert restore(result.model_url, str(out)) == [str(out)]
    assert out.read_bytes() == local.read_bytes()
    report = verify(result.model_url)
    assert report.ok, report.problems
    assert parse_model_url(result.model_url).manifest()["source"]["url"] == url

    again = extract(url, ExtractOptions(store=f"s3://{s3_bucket}/store"))
    assert (again.status, again.written) == ("unchanged", 0)


def test_sharded_folder_on_s3(s3_bucket: str, s3_env: S3Server, fixtures_dir: Path, tmp_path: Path) -> None:
    client = s3_env.client()
    source = fixtures_dir / SHARDED
    for p in source.iterdir():
        client.upload_file(str(p), s3_bucket, f"hub/minicpm3/{p.name}")
    result = extract(f"s3://{s3_bucket}/hub/minicpm3/", ExtractOptions(store=str(tmp_path / "store")))
    assert result.slug == "minicpm3"
    manifest = parse_model_url(result.model_url).manifest()
    assert manifest["source"]["kind"] == "sharded"
    out = tmp_path / "out"
    assert len(restore(result.model_url, str(out))) == 5
    for p in source.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_cli_extract_into_s3_store(home: Path, s3_bucket: str, s3_env: S3Server, tmp_path: Path) -> None:
    local = write_model(tmp_path / "cli-model" / "model.safetensors", tensors=2)
    run = cli("extract", local, "--no-prefect", "--store", f"s3://{s3_bucket}/store")
    assert run.returncode == 0, run.stderr
    url = run.stdout.splitlines()[-1]
    assert url.startswith(f"s3://{s3_bucket}/store/models/cli-model/")
    assert verify(url).ok
    out = tmp_path / "restored.safetensors"
    restore(url, str(out))
    assert out.read_bytes() == local.read_bytes()


# ---------------------------------------------------------------------------------------------
# wrong keys and read-only identities


def test_wrong_secret_is_one_line_and_writes_nothing(
    home: Path, s3_bucket: str, s3_env: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = write_model(tmp_path / "m" / "model.safetensors", tensors=1)
    s3_env.client().upload_file(str(local), s3_bucket, "src/model.safetensors")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "garbage-garbage-garbage")
    src = f"s3://{s3_bucket}/src/model.safetensors"
    store = f"s3://{s3_bucket}/store"
    assert_user_error(cli("extract", src, "--store", str(tmp_path / "store")), src)
    assert_user_error(cli("extract", local, "--store", store), store)
    assert_user_error(cli("extract", src, "--store", store), src)
    assert keys(s3_env, s3_bucket) == ["src/model.safetensors"]  # admin view: nothing new
    assert not (tmp_path / "store" / "models").exists()


def test_read_only_identity_cannot_be_a_store(
    home: Path, s3_server: S3Server, s3_readonly_env: S3Server, tmp_path: Path
) -> None:
    bucket = "readonly-" + tmp_path.name.lower().replace("_", "-")[-30:]
    admin = s3_server.client()
    admin.create_bucket(Bucket=bucket)
    local = write_model(tmp_path / "ro" / "model.safetensors", tensors=1)
    admin.upload_file(str(local), bucket, "src/ro/model.safetensors")

    store = f"s3://{bucket}/store"
    assert_user_error(cli("extract", local, "--store", store), store, "not writable")
    assert keys(s3_server, bucket) == ["src/ro/model.safetensors"]

    # Reading is allowed: the read-only identity can extract *from* the bucket.
    result = extract(
        f"s3://{bucket}/src/ro/model.safetensors",
        ExtractOptions(store=str(tmp_path / "store"), images="none"),
    )
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == local.read_bytes()


def test_missing_bucket_is_one_line(home: Path, s3_env: S3Server, tmp_path: Path) -> None:
    local = write_model(tmp_path / "m" / "model.safetensors", tensors=1)
    store = "s3://no-such-bucket-weightsmith/store"
    assert_user_error(cli("extract", local, "--store", store), store)
    src = "s3://no-such-bucket-weightsmith/model.safetensors"
    assert_user_error(cli("extract", src, "--store", str(tmp_path / "store")), src)


# ---------------------------------------------------------------------------------------------
# only the ranges asked for


@pytest.fixture
def s3_gets(s3_env: S3Server) -> list[tuple[str | None, int]]:
    """Every GetObject the ranged reader sends (its botocore client's own events): the Range
    header asked for and the body length the server answered with."""
    gets: list[tuple[str | None, int]] = []
    client = ranged.s3_client()

    def asked(params: dict, context: dict, **_) -> None:
        context["range"] = params["headers"].get("Range")

    def answered(parsed: dict, context: dict, **_) -> None:
        gets.append((context.get("range"), int(parsed["ContentLength"])))

    client.meta.events.register("before-call.s3.GetObject", asked, unique_id="test-s3-gets-asked")
    client.meta.events.register("after-call.s3.GetObject", answered, unique_id="test-s3-gets-answered")
    yield gets
    client.meta.events.unregister("before-call.s3.GetObject", unique_id="test-s3-gets-asked")
    client.meta.events.unregister("after-call.s3.GetObject", unique_id="test-s3-gets-answered")


@pytest.fixture
def big_model(s3_bucket: str, s3_env: S3Server, tmp_path: Path) -> tuple[Path, str]:
    """An ~8 MB file of 8 tensors, uploaded: (local copy, s3 URL)."""
    local = write_model(tmp_path / "big" / "model.safetensors", tensors=8, rows=256)
    assert local.stat().st_size > 8_000_000
    s3_env.client().upload_file(str(local), s3_bucket, "big/model.safetensors")
    return local, f"s3://{s3_bucket}/big/model.safetensors"


def test_one_tensor_fetches_only_header_and_its_range(big_model: tuple[Path, str], s3_gets: list) -> None:
    local, url = big_model
    reader = open_reader(url)
    _, entries = parse_safetensors(reader, 0, "model.safetensors")
    entry = next(e for e in entries if e.name == "layer.3.weight")
    data = reader.read(entry.start, entry.end)
    assert data == local.read_bytes()[entry.start : entry.end]
    hdr = header_size(local)
    assert s3_gets == [
        ("bytes=0-7", 8),
        (f"bytes=8-{hdr - 1}", hdr - 8),
        (f"bytes={entry.start}-{entry.end - 1}", entry.nbytes),
    ]
    assert reader.bytes_read == hdr + entry.nbytes


def test_open_source_counts_header_then_one_tensor(big_model: tuple[Path, str]) -> None:
    local, url = big_model
    source = open_source(url)
    hdr = header_size(local)
    assert source.bytes_read == hdr
    entry = source.tensors["layer.6.weight"]
    assert source.read(entry.container, entry.start, entry.end) == local.read_bytes()[entry.start : entry.end]
    assert source.bytes_read == hdr + entry.nbytes


def test_include_extracts_only_the_selected_tensor_bytes(big_model: tuple[Path, str], tmp_path: Path) -> None:
    local, url = big_model
    result = extract(
        url,
        ExtractOptions(store=str(tmp_path / "store"), include=("layer.2.*",), revision="r1", images="none"),
    )
    source = open_source(url)
    entry = source.tensors["layer.2.weight"]
    # Headers (parse, files/, ...) and the one tensor: far less than the 8 MB file.
    assert entry.nbytes <= result.bytes_read <= entry.nbytes + 4 * header_size(local)


# ---------------------------------------------------------------------------------------------
# one read per byte, ranges in flight


def test_concurrent_ranges_give_the_bytes_of_one_get(
    big_model: tuple[Path, str], s3_env: S3Server, s3_bucket: str, s3_gets: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    local, url = big_model
    monkeypatch.setattr(ranged, "RANGE_BYTES", 1 << 20)
    reader = open_reader(url)
    whole = s3_env.client().get_object(Bucket=s3_bucket, Key="big/model.safetensors")["Body"].read()
    assert reader.read_array(0, reader.size).tobytes() == whole == local.read_bytes()
    assert len(s3_gets) == len(set(s3_gets)) == -(-reader.size // (1 << 20))  # one GET per range, none twice
    assert sum(n for _, n in s3_gets) == reader.bytes_read == reader.size
    entry = open_source(url).tensors["layer.4.weight"]
    assert reader.read(entry.start, entry.end) == whole[entry.start : entry.end]


@pytest.mark.parametrize("revision", [None, "r1"])
def test_extraction_into_s3_reads_each_byte_once(
    big_model: tuple[Path, str], s3_env: S3Server, s3_bucket: str, tmp_path: Path, revision: str | None
) -> None:
    """S3 to S3, with and without --revision: the header on open, then each byte once. A re-run
    keeps the revision; a forced one publishes a new generation; no staging folder is left."""
    local, url = big_model
    store = f"s3://{s3_bucket}/once-{revision}"
    opened = header_size(local)
    first = extract(url, ExtractOptions(store=store, revision=revision, images="preview"))
    assert first.bytes_read == opened + local.stat().st_size
    if revision is None:
        assert first.revision == extract(str(local), ExtractOptions(store=str(tmp_path / "local"))).revision
    again = extract(url, ExtractOptions(store=store, revision=revision, images="preview"))
    assert (again.revision, again.status, again.written) == (first.revision, "unchanged", 0)
    forced = extract(url, ExtractOptions(store=store, revision=revision, images="preview", force=True))
    assert (forced.revision, forced.status, forced.written) == (first.revision, "replaced", 9)
    manifest = parse_model_url(forced.model_url).manifest()
    assert manifest["generation"] == forced.run_id
    assert verify(forced.model_url).ok
    folders = {k.split("/")[3] for k in keys(s3_env, s3_bucket, f"once-{revision}/models/")}
    assert folders == {first.revision}  # no staging folder left behind
