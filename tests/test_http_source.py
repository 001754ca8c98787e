"""Sources over http(s): headers only on open, one exact ranged GET per tensor read, and a
full extract -> restore round trip, checked against the bytes the real server sent."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import threading
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith import ranged
from weightsmith.errors import WeightsmithError
from weightsmith.extract import STAGING, ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith.restore import restore
from weightsmith.sources import open_source
from weightsmith.verify import verify

if TYPE_CHECKING:
    from conftest import RangeHTTPServer

pytestmark = pytest.mark.usefixtures("state_in_tmp")

SHARDED = "safetensors/sharded_minicpm3"


def header_size(path: Path) -> int:
    with path.open("rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def write_model(path: Path) -> dict[str, np.ndarray]:
    """About 1 MB in several tensors of random values."""
    rng = np.random.default_rng(3)
    tensors = {f"layer.{i}.weight": rng.standard_normal((128, 256)).astype(np.float32) for i in range(8)}
    tensors["norm.bias"] = rng.standard_normal(256).astype(np.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


@pytest.fixture
def served(http_server: RangeHTTPServer) -> tuple[Path, str]:
    """(local file, its URL) of a random model in the server's root."""
    path = http_server.root / "org" / "model.safetensors"
    write_model(path)
    http_server.reset()
    return path, http_server.url_for("org/model.safetensors")


def gets(server: RangeHTTPServer, path: str) -> list[str | None]:
    return [r for m, p, r in server.requests if m == "GET" and p == path]


def test_open_reads_only_the_header(http_server: RangeHTTPServer, served: tuple[Path, str]) -> None:
    path, url = served
    source = open_source(url)
    assert len(source.tensors) == 9
    assert http_server.bytes_sent["org/model.safetensors"] == header_size(path)
    assert source.bytes_read == header_size(path)
    assert None not in gets(http_server, "org/model.safetensors")  # every GET is ranged


def test_reading_one_tensor_fetches_exactly_its_range(http_server: RangeHTTPServer, served: tuple[Path, str]) -> None:
    path, url = served
    source = open_source(url)
    entry = source.tensors["layer.5.weight"]
    http_server.reset()
    data = source.read(entry.container, entry.start, entry.end)
    assert data == path.read_bytes()[entry.start : entry.end]
    assert http_server.bytes_sent == {"org/model.safetensors": entry.nbytes}
    assert gets(http_server, "org/model.safetensors") == [f"bytes={entry.start}-{entry.end - 1}"]


def test_inspect_cli_reads_only_the_header(
    http_server: RangeHTTPServer,
    served: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, url = served
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    run = subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", "inspect", "--json", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert {r["name"] for r in rows} == {f"layer.{i}.weight" for i in range(8)} | {"norm.bias"}
    assert http_server.bytes_sent["org/model.safetensors"] == header_size(path)


def test_extract_over_http_round_trips(http_server: RangeHTTPServer, served: tuple[Path, str], tmp_path: Path) -> None:
    path, url = served
    result = extract(url, ExtractOptions(store=str(tmp_path / "store")))
    assert result.slug == "org"  # the parent "folder" of the URL
    sent = http_server.bytes_sent["org/model.safetensors"]
    assert result.bytes_read == sent
    # The header when the source is opened, then every byte of the file once (no checksum pass).
    assert sent == header_size(path) + path.stat().st_size
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()
    assert verify(result.model_url).ok
    manifest = parse_model_url(result.model_url).manifest()
    assert manifest["source"]["url"] == url

    # With a known revision there is no checksum pass: each tensor byte travels once.
    http_server.reset()
    known = extract(url, ExtractOptions(store=str(tmp_path / "store2"), revision="r1", images="none"))
    assert http_server.bytes_sent["org/model.safetensors"] == header_size(path) + path.stat().st_size
    assert known.revision == "r1"


def test_sharded_folder_over_http(http_server: RangeHTTPServer, fixtures_dir: Path, tmp_path: Path) -> None:
    (http_server.root / "mc3").mkdir()
    for p in (fixtures_dir / SHARDED).iterdir():  # copyfile: writable copies of read-only files
        shutil.copyfile(p, http_server.root / "mc3" / p.name)
    http_server.reset()
    url = http_server.url_for("mc3")
    source = open_source(url)
    assert source.kind == "sharded"
    assert len(source.containers) == 4
    for shard in sorted((http_server.root / "mc3").glob("*.safetensors")):
        assert http_server.bytes_sent[f"mc3/{shard.name}"] == header_size(shard)
    # The index is read whole (fsspec's HTTP `exists` probe is an unranged GET, so it travels
    # twice); it is small, unlike the shards.
    index = http_server.root / "mc3" / "model.safetensors.index.json"
    assert http_server.bytes_sent["mc3/model.safetensors.index.json"] <= 2 * index.stat().st_size

    result = extract(url, ExtractOptions(store=str(tmp_path / "store"), images="none"))
    assert result.slug == "mc3"
    out = tmp_path / "out"
    restore(result.model_url, str(out))
    for p in (fixtures_dir / SHARDED).iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_gguf_over_http_round_trips(http_server: RangeHTTPServer, fixtures_dir: Path, tmp_path: Path) -> None:
    name = "ollama_llama-2-tiny-random.gguf"
    shutil.copyfile(fixtures_dir / "gguf" / name, http_server.root / name)
    http_server.reset()
    source = open_source(http_server.url_for(name))
    # The GGUF header (a 32k-token vocabulary here) is fetched in doubling windows: at most
    # twice its length, never the whole file.
    data_start = source.containers[0].segments[1].start
    assert data_start <= http_server.bytes_sent[name] <= 2 * data_start
    assert http_server.bytes_sent[name] < (fixtures_dir / "gguf" / name).stat().st_size
    assert None not in gets(http_server, name)
    result = extract(http_server.url_for(name), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    out = tmp_path / name
    restore(result.model_url, str(out))
    assert out.read_bytes() == (fixtures_dir / "gguf" / name).read_bytes()


def test_missing_url_is_a_one_line_error(http_server: RangeHTTPServer) -> None:
    url = http_server.url_for("nope/model.safetensors")
    with pytest.raises(WeightsmithError) as excinfo:
        open_source(url)
    assert str(excinfo.value).startswith(f"{url}: ")
    assert "\n" not in str(excinfo.value)


def test_url_with_query_reads_only_the_header(http_server: RangeHTTPServer, served: tuple[Path, str]) -> None:
    path, url = served
    open_source(url + "?X-Amz-Signature=SECRET")
    assert http_server.bytes_sent["org/model.safetensors"] == header_size(path)


def test_url_query_is_not_written_to_the_store(
    http_server: RangeHTTPServer, served: tuple[Path, str], tmp_path: Path
) -> None:
    path, url = served
    result = extract(
        url + "?X-Amz-Signature=SECRET",
        ExtractOptions(store=str(tmp_path / "store"), images="none"),
    )
    manifest = (Path(result.model_url) / "manifest.json").read_text()
    assert "SECRET" not in manifest
    assert not [p for p in (tmp_path / "store").rglob("*") if "SECRET" in p.name]


# ---------------------------------------------------------------------------------------------
# one read per byte, ranges in flight, retries


def test_remote_extraction_reads_each_byte_once_and_names_the_local_revision(
    http_server: RangeHTTPServer, served: tuple[Path, str], tmp_path: Path
) -> None:
    """Without --revision, from HTTP: the header on open, then each byte once; the revision is
    the one the same bytes get from a local file; a re-run keeps it and writes nothing."""
    path, url = served
    opened = header_size(path)
    store = tmp_path / "store"
    result = extract(url, ExtractOptions(store=str(store), images="none"))
    assert result.bytes_read == http_server.bytes_sent["org/model.safetensors"] == opened + path.stat().st_size
    local = extract(str(path), ExtractOptions(store=str(tmp_path / "local"), images="none"))
    assert result.revision == local.revision
    assert [p.name for p in (store / "models" / "org").iterdir()] == [result.revision]  # staging gone
    assert verify(result.model_url).ok

    http_server.reset()
    again = extract(url, ExtractOptions(store=str(store), images="none"))
    assert (again.revision, again.status, again.written) == (result.revision, "unchanged", 0)
    assert http_server.bytes_sent["org/model.safetensors"] == opened + path.stat().st_size
    assert not any(p.name.startswith(STAGING) for p in (store / "models" / "org").iterdir())


def test_include_hashes_the_rest_once_and_keeps_the_revision(
    http_server: RangeHTTPServer, served: tuple[Path, str], tmp_path: Path
) -> None:
    path, url = served
    whole = extract(url, ExtractOptions(store=str(tmp_path / "a"), images="none"))
    http_server.reset()
    some = extract(url, ExtractOptions(store=str(tmp_path / "b"), images="none", include=("layer.3.*",)))
    assert some.revision == whole.revision and some.tensors == 1
    assert http_server.bytes_sent["org/model.safetensors"] == header_size(path) + path.stat().st_size


def test_concurrent_ranges_give_the_bytes_of_one_read(
    http_server: RangeHTTPServer, served: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, url = served
    monkeypatch.setattr(ranged, "RANGE_BYTES", 50_000)  # ~1 MB file: about 20 ranges
    reader = ranged.open_reader(url)
    http_server.reset()
    data = reader.read_array(0, reader.size)
    assert data.tobytes() == path.read_bytes()
    ranges = gets(http_server, "org/model.safetensors")
    assert len(ranges) == -(-reader.size // 50_000)
    assert reader.bytes_read == http_server.bytes_sent["org/model.safetensors"] == reader.size
    assert reader.read(100, 170_000) == path.read_bytes()[100:170_000]  # bytes(), several ranges too


class FlakyHandler:
    """Serves each range badly the first `bad` times: a short body, then a 503 (a real server)."""

    bad = 2
    from_byte = 0  # ranges that start before this byte are served well
    seen: dict
    lock: threading.Lock

    def _response(self, relative: str, range_header: str | None) -> tuple[int, dict, bytes]:
        status, headers, body = super()._response(relative, range_header)  # type: ignore[misc]
        with self.lock:
            tries = self.seen[range_header] = self.seen.get(range_header, 0) + 1
        if range_header is None or tries > self.bad or int(range_header[6:].split("-")[0]) < self.from_byte:
            return status, headers, body
        if tries == 1:  # an honest but short reply: fewer bytes than the range asked for
            body = body[: len(body) // 2]
            return status, {**headers, "Content-Length": str(len(body))}, body
        return HTTPStatus.SERVICE_UNAVAILABLE, {"Content-Length": "0"}, b""


@pytest.fixture
def flaky(tmp_path: Path) -> tuple[RangeHTTPServer, dict]:
    from conftest import RangeHTTPServer, RangeRequestHandler

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    httpd.daemon_threads = True
    owner = RangeHTTPServer(server=httpd, root=tmp_path / "flaky-root")
    seen: dict = {}
    httpd.RequestHandlerClass = type(
        "Flaky", (FlakyHandler, RangeRequestHandler), {"owner": owner, "seen": seen, "lock": threading.Lock()}
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield owner, seen
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_a_short_or_failed_range_is_fetched_again(
    flaky: tuple[RangeHTTPServer, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, seen = flaky
    path = server.root / "org" / "model.safetensors"
    write_model(path)
    monkeypatch.setattr(ranged, "RETRY_DELAY_S", 0.01)
    monkeypatch.setattr(ranged, "RANGE_BYTES", 100_000)
    reader = ranged.open_reader(server.url_for("org/model.safetensors"))
    assert reader.read_array(0, reader.size).tobytes() == path.read_bytes()
    ranges = -(-reader.size // 100_000)
    assert reader.retries == 2 * ranges  # each range: short once, 503 once, then whole
    assert all(n == 3 for r, n in seen.items() if r is not None)

    # More bad replies than retries: the error comes out, and nothing is published.
    url = server.url_for("org/model.safetensors")
    layer5 = open_source(url).tensors["layer.5.weight"].start
    monkeypatch.setattr(FlakyHandler, "bad", ranged.RETRIES + 1)
    monkeypatch.setattr(FlakyHandler, "from_byte", layer5)
    seen.clear()
    with pytest.raises(Exception) as failed:  # the server's error, left for the task's retries
        extract(url, ExtractOptions(store=str(tmp_path / "store"), images="none"))
    assert getattr(failed.value, "status", None) == HTTPStatus.SERVICE_UNAVAILABLE
    assert max(n for r, n in seen.items() if r is not None) == ranged.RETRIES + 1
    assert not list((tmp_path / "store").rglob("manifest.json"))
    (staged,) = (tmp_path / "store" / "models" / "org").iterdir()  # left to gc, with its failed run
    assert staged.name.startswith(STAGING)
    (run,) = (staged / "runs").iterdir()
    assert json.loads(run.read_text())["outcome"] == "failed"

    # The re-run against a healthy server names the same revision as a clean run.
    monkeypatch.setattr(FlakyHandler, "bad", 0)
    again = extract(url, ExtractOptions(store=str(tmp_path / "store"), images="none"))
    clean = extract(str(path), ExtractOptions(store=str(tmp_path / "clean"), images="none"))
    assert again.revision == clean.revision and again.status == "created"


class NoRangesHandler:
    """Answers every GET with the whole file (HTTP 200), as a server without range support does."""

    def _response(self, relative: str, range_header: str | None) -> tuple[int, dict, bytes]:
        return super()._response(relative, None)  # type: ignore[misc]


def test_a_server_that_ignores_ranges_is_a_one_line_error(tmp_path: Path) -> None:
    """Not read whole behind the user's back, not retried: an error naming the URL before anything is written."""
    from conftest import RangeHTTPServer, RangeRequestHandler

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeRequestHandler)
    httpd.daemon_threads = True
    owner = RangeHTTPServer(server=httpd, root=tmp_path / "root")
    httpd.RequestHandlerClass = type("NoRanges", (NoRangesHandler, RangeRequestHandler), {"owner": owner})
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        write_model(owner.root / "org" / "model.safetensors")
        url = owner.url_for("org/model.safetensors")
        with pytest.raises(WeightsmithError) as failed:
            extract(url, ExtractOptions(store=str(tmp_path / "store"), images="none"))
        message = str(failed.value)
        assert "\n" not in message and url in message and "ignores byte ranges" in message
        assert len([r for m, _, r in owner.requests if m == "GET"]) == 1  # no retries of a server that cannot do it
        assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.zarr"))
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_a_publish_that_failed_half_way_finishes_on_its_retry(
    http_server: RangeHTTPServer, served: tuple[Path, str], tmp_path: Path
) -> None:
    """The move from the staging folder stops at a tensor it cannot move; the retry (a task
    retry) moves the rest into the same revision and publishes."""
    from weightsmith import extract as lib
    from weightsmith.store import encode_key

    path, url = served
    revision = extract(str(path), ExtractOptions(store=str(tmp_path / "local"), images="all")).revision
    options = ExtractOptions(store=str(tmp_path / "store"), images="all")
    source, the_plan = lib.prepare(url, options)
    assert the_plan.staged and the_plan.checksum_units == ()
    staging = lib.staging_ref(source, options, "run1")
    for unit in the_plan.units:
        lib.extract_unit(source, staging, unit, options)
    obstacle = tmp_path / "store" / "models" / "org" / revision / "tensors" / f"{encode_key('layer.5.weight')}.zarr"
    obstacle.parent.mkdir(parents=True)
    obstacle.write_bytes(b"not an array")  # a file where the array goes: the move fails there
    with pytest.raises(OSError):
        lib.publish_staged(source, staging, the_plan, options, None, "run1")
    assert not (tmp_path / "store" / "models" / "org" / revision / "manifest.json").exists()
    obstacle.unlink()
    done = lib.publish_staged(source, staging, the_plan, options, None, "run1")
    assert (done.model.revision, done.status) == (revision, "created")
    assert [p.name for p in (tmp_path / "store" / "models" / "org").iterdir()] == [revision]
    assert verify(done.model.url).ok
    out = tmp_path / "out.safetensors"
    restore(done.model.url, str(out))
    assert out.read_bytes() == path.read_bytes()
