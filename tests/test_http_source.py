"""Sources over http(s): headers only on open, one exact ranged GET per tensor read, and a
full extract -> restore round trip, checked against the bytes the real server sent."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
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
    # A checksum pass and a write pass over the data, plus a few header reads; never more.
    assert sent <= 2 * path.stat().st_size + 3 * header_size(path)
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()
    assert verify(result.model_url).ok
    manifest = parse_model_url(result.model_url).manifest()
    assert manifest["source"]["url"] == url

    # With a known revision there is no checksum pass: each tensor byte travels once.
    http_server.reset()
    known = extract(url, ExtractOptions(store=str(tmp_path / "store2"), revision="r1", images="none"))
    data = path.stat().st_size - header_size(path)
    assert data <= http_server.bytes_sent["org/model.safetensors"] <= data + 3 * header_size(path)
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
