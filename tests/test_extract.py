"""End to end on a local store: extract -> restore is byte for byte for every third-party
fixture, GPTQ weights match GPTQModel's goldens, runs resume and are idempotent, images are
what they claim, big tensors stream in blocks, and slugs/revisions are derived as documented.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import fixture_paths
import ml_dtypes
import numpy as np
import pytest
import tifffile
from PIL import Image
from safetensors.numpy import load_file, save_file

from weightsmith import images
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, ExtractResult, checksum_unit, extract, extract_unit, model_ref, prepare
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.restore import restore
from weightsmith.store import Store, arrays
from weightsmith.store.store import dumps
from weightsmith.verify import verify

pytestmark = pytest.mark.usefixtures("state_in_tmp")

FIXTURES = fixture_paths.FIXTURES
ROUND_TRIP = sorted(
    [str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("safetensors/*.safetensors")]
    + [str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("gptq/*.safetensors")]
    + [str(p.relative_to(FIXTURES)) for p in FIXTURES.glob("gguf/*.gguf")]
    + ["safetensors/sharded_minicpm3"]
)
GPTQ_REAL = [
    "llama_3_2_1b_int4",
    "llama_3_2_1b_gptqmodel_int8",
]
GPTQ_PREFIX = "model.layers.0.mlp.gate_proj"
GPTQ_GOLDEN = f"{GPTQ_PREFIX}.weight_dequant_in_out"
MINICPM = "safetensors/ollama_minicpm3_4b_model.safetensors"
HEX16 = re.compile(r"[0-9a-f]{16}")


# ---------------------------------------------------------------------------------------------
# helpers


def model_of(result: ExtractResult) -> ModelRef:
    return parse_model_url(result.model_url)


def manifest_bytes(result: ExtractResult) -> bytes:
    model = model_of(result)
    return model.store.read_bytes(model.key(MANIFEST))


def local(model: ModelRef, key: str) -> Path:
    return Path(model.store.path(key))


def runs(model: ModelRef) -> list[dict]:
    folder = local(model, model.key("runs"))
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def copy_fixture(fixtures_dir: Path, rel: str, folder: Path, name: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or Path(rel).name)
    shutil.copyfile(fixtures_dir / rel, target)
    return target


def assert_no_leftovers(store: Path) -> None:
    """Staged TIFFs are moved or deleted, the writability probe is deleted."""
    for folder in (".tmp", ".probe"):
        if (store / folder).exists():
            assert list((store / folder).iterdir()) == [], folder
    assert not list(store.rglob("*.partial"))


# ---------------------------------------------------------------------------------------------
# 1. every fixture round-trips


def test_round_trip_list_covers_every_fixture(fixtures_dir: Path) -> None:
    weights = {
        str(p.relative_to(fixtures_dir))
        for p in fixtures_dir.rglob("*")
        if p.is_file()
        and p.suffix in (".safetensors", ".gguf")
        and p.parts[-2] != "bad"
        and p.parent.name != "sharded_minicpm3"
    }
    assert weights | {"safetensors/sharded_minicpm3"} == set(ROUND_TRIP)
    assert len(ROUND_TRIP) >= 21


@pytest.mark.parametrize("rel", ROUND_TRIP)
def test_fixture_round_trips_byte_for_byte(fixtures_dir: Path, tmp_path: Path, rel: str) -> None:
    source = fixtures_dir / rel
    store = tmp_path / "store"
    result = extract(str(source), ExtractOptions(store=str(store)))
    assert result.status == "created"
    assert result.written == result.tensors > 0
    assert result.model_url == f"{store}/models/{result.slug}/{result.revision}"

    out = tmp_path / "out"
    if source.is_dir():
        written = restore(result.model_url, str(out))
        names = sorted(p.name for p in source.iterdir())
        assert len(names) == 5  # 4 shards + model.safetensors.index.json
        assert sorted(Path(p).name for p in written) == names
        for name in names:
            assert (out / name).read_bytes() == (source / name).read_bytes(), name
    else:
        target = out / source.name
        assert restore(result.model_url, str(target)) == [str(target)]
        assert target.read_bytes() == source.read_bytes()

    report = verify(result.model_url)
    assert report.ok, report.problems
    manifest = model_of(result).manifest()
    assert manifest["selection"]["complete"] is True
    assert report.checked >= len(manifest["tensors"]) + len(manifest["files"])
    assert_no_leftovers(store)


def test_restore_into_an_existing_folder_uses_the_container_name(fixtures_dir: Path, tmp_path: Path) -> None:
    source = fixtures_dir / MINICPM
    result = extract(str(source), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    out = tmp_path / "out"
    out.mkdir()
    assert restore(result.model_url, str(out)) == [str(out / source.name)]
    assert (out / source.name).read_bytes() == source.read_bytes()


# ---------------------------------------------------------------------------------------------
# 2. GPTQ


@pytest.mark.parametrize("model_name", GPTQ_REAL)
def test_gptq_weight_matches_golden(fixtures_dir: Path, tmp_path: Path, model_name: str) -> None:
    source = fixtures_dir / "gptq" / f"{model_name}.safetensors"
    result = extract(str(source), ExtractOptions(store=str(tmp_path / "store")))
    model = model_of(result)
    manifest = model.manifest()
    components = [f"{GPTQ_PREFIX}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx")]
    weight_name = f"{GPTQ_PREFIX}.weight"
    assert {n: r["role"] for n, r in manifest["tensors"].items()} == {
        **{c: "gptq-component" for c in components},
        weight_name: "gptq-weight",
    }
    weight = manifest["tensors"][weight_name]
    assert (weight["dtype"], weight["shape"]) == ("F32", [256, 256])
    assert weight["quant"]["bits"] == (4 if "int4" in model_name else 8)
    assert weight["components"] == {c: manifest["tensors"][c]["sha256"] for c in components}
    # Components keep only their exact array; the logical weight gets the images.
    for c in components:
        assert set(manifest["tensors"][c]["artifacts"]) == {"zarr"}
    assert {"zarr", "tiff", "png"} <= set(weight["artifacts"])

    golden = load_file(str(fixtures_dir / "gptq" / f"{model_name}.expected.safetensors"))[GPTQ_GOLDEN]
    stored = arrays.read_exact(model.store, weight["artifacts"]["zarr"])
    assert stored.dtype == np.float32 and stored.shape == (256, 256)
    np.testing.assert_allclose(stored, golden.T, rtol=2**-7, atol=1e-6)
    # "BF16-rounded": rounding ours to BF16 gives the golden for almost every value.
    same = stored.astype(ml_dtypes.bfloat16).astype(np.float32) == golden.T
    assert same.mean() > 0.99

    out = tmp_path / "dequantized.safetensors"
    assert restore(result.model_url, str(out), dequantize=True) == [str(out)]
    dequantized = load_file(str(out))
    assert set(dequantized) == {weight_name}
    assert dequantized[weight_name].dtype == np.float32
    assert np.array_equal(dequantized[weight_name], stored)

    tiff, meta = images.read_tiff(local(model, weight["artifacts"]["tiff"]))
    assert np.array_equal(tiff, stored)
    assert meta == {"name": weight_name, "shape": [256, 256], "dtype": "F32"}


# ---------------------------------------------------------------------------------------------
# 5. resume and idempotence


def test_second_run_writes_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    options = ExtractOptions(store=str(tmp_path / "store"))
    first = extract(str(fixtures_dir / MINICPM), options)
    manifest = manifest_bytes(first)
    second = extract(str(fixtures_dir / MINICPM), options)
    assert (second.model_url, second.status) == (first.model_url, "unchanged")
    assert (second.written, second.skipped, second.tensors) == (0, 15, 15)
    assert manifest_bytes(second) == manifest
    outcomes = sorted(r["outcome"] for r in runs(model_of(first)))
    assert outcomes == ["created", "unchanged"]


def delete_record(model: ModelRef, record: dict) -> None:
    """Make a finished array unfinished: drop the record attribute from its zarr.json."""
    path = local(model, record["artifacts"]["zarr"]) / "zarr.json"
    meta = json.loads(path.read_text())
    del meta["attributes"][arrays.RECORD]
    path.write_text(json.dumps(meta))


def test_deleted_artifacts_are_rewritten_and_nothing_else(fixtures_dir: Path, tmp_path: Path) -> None:
    options = ExtractOptions(store=str(tmp_path / "store"))
    first = extract(str(fixtures_dir / MINICPM), options)
    manifest = manifest_bytes(first)
    model = model_of(first)
    tensors = model.manifest()["tensors"]
    shutil.rmtree(local(model, tensors["lm_head.weight"]["artifacts"]["zarr"]))
    local(model, tensors["model.norm.weight"]["artifacts"]["tiff"]).unlink()
    local(model, tensors["model.embed_tokens.weight"]["artifacts"]["png"]).unlink()
    delete_record(model, tensors["model.layers.0.mlp.up_proj.weight"])
    before = {p: p.stat().st_mtime_ns for p in local(model, model.key("tensors")).rglob("*") if p.is_file()}

    assert not verify(first.model_url).ok
    second = extract(str(fixtures_dir / MINICPM), options)
    assert (second.written, second.skipped, second.status) == (4, 11, "unchanged")
    assert manifest_bytes(second) == manifest
    assert verify(second.model_url).ok
    # The other tensors' arrays were not touched.
    rewritten = {
        tensors[n]["artifacts"]["zarr"]
        for n in (
            "lm_head.weight",
            "model.norm.weight",
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
        )
    }
    for path, mtime in before.items():
        if not any(str(path).startswith(str(local(model, k))) for k in rewritten):
            assert path.stat().st_mtime_ns == mtime, path


def random_model(path: Path) -> Path:
    rng = np.random.default_rng(5)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "a": rng.standard_normal((32, 16)).astype(np.float32),
            "b": rng.standard_normal(16).astype(np.float32),
        },
        str(path),
    )
    return path


def chunk_files(model: ModelRef, record: dict) -> list[Path]:
    """The chunk files of an array: every file in its folder but zarr.json (keys c.<i>.<j>)."""
    return [p for p in local(model, record["artifacts"]["zarr"]).rglob("*") if p.is_file() and p.name != "zarr.json"]


def test_verify_notices_a_lost_chunk(tmp_path: Path) -> None:
    """Zarr reads a missing chunk as the fill value; the checksum must still catch it."""
    result = extract(
        str(random_model(tmp_path / "m" / "model.safetensors")),
        ExtractOptions(store=str(tmp_path / "store"), images="none"),
    )
    model = model_of(result)
    (chunk,) = chunk_files(model, model.manifest()["tensors"]["a"])
    chunk.unlink()
    report = verify(result.model_url)
    assert [p for p in report.problems if "'a'" in p] == report.problems != []
    with pytest.raises(WeightsmithError, match="tensor 'a'"):
        restore(result.model_url, str(tmp_path / "out.safetensors"))
    assert not (tmp_path / "out.safetensors").exists()


def test_restore_of_a_corrupt_chunk_is_a_user_error(tmp_path: Path) -> None:
    result = extract(
        str(random_model(tmp_path / "m" / "model.safetensors")),
        ExtractOptions(store=str(tmp_path / "store"), images="none"),
    )
    model = model_of(result)
    (chunk,) = chunk_files(model, model.manifest()["tensors"]["a"])
    chunk.write_bytes(b"not a blosc frame" * 4)
    assert any("'a'" in p for p in verify(result.model_url).problems)
    with pytest.raises(WeightsmithError, match="tensor 'a'"):
        restore(result.model_url, str(tmp_path / "out.safetensors"))


class Interrupted(Exception):
    pass


def test_failure_midway_keeps_finished_tensors_and_resumes(fixtures_dir: Path, tmp_path: Path) -> None:
    source = str(fixtures_dir / MINICPM)
    reference = extract(source, ExtractOptions(store=str(tmp_path / "reference")))
    store = tmp_path / "store"
    options = ExtractOptions(store=str(store))
    done = {"bytes": 0}

    def progress(n: int, name: str) -> None:
        if name == "checksums":
            return
        done["bytes"] += n
        if done["bytes"] > 200_000:  # about half of the 406 kB of tensors
            raise Interrupted

    with pytest.raises(Interrupted):
        extract(source, options, progress=progress)
    model = ModelRef(Store(str(store)), reference.slug, reference.revision)
    assert not model.is_complete()
    assert not local(model, model.key(MANIFEST)).exists()
    finished = [
        n
        for n, r in model_of(reference).manifest()["tensors"].items()
        if arrays.read_record(model.store, r["artifacts"]["zarr"]) is not None
    ]
    assert 0 < len(finished) < 15
    (failed,) = runs(model)
    assert (failed["outcome"], failed["error"]) == ("failed", "Interrupted")
    assert_no_leftovers(store)
    with pytest.raises(WeightsmithError, match="no manifest.json"):
        verify(model.url)

    resumed = extract(source, options)
    assert resumed.status == "created"
    assert resumed.written == 15 - len(finished)
    assert manifest_bytes(resumed) == manifest_bytes(reference)
    assert verify(resumed.model_url).ok


def test_force_rewrites_everything_into_a_new_generation(fixtures_dir: Path, tmp_path: Path) -> None:
    """--force on a published model rebuilds it beside the published one (generations/<run>/)
    and then switches the manifest: the same content, only the artifact keys moved."""
    store = str(tmp_path / "store")
    first = extract(str(fixtures_dir / MINICPM), ExtractOptions(store=store))
    manifest = manifest_bytes(first)
    forced = extract(str(fixtures_dir / MINICPM), ExtractOptions(store=store, force=True))
    assert (forced.written, forced.skipped, forced.status) == (15, 0, "replaced")
    moved = json.loads(manifest_bytes(forced))
    assert moved.pop("generation") == forced.run_id
    assert dumps(moved).replace(f"/generations/{forced.run_id}/".encode(), b"/") == manifest
    assert verify(forced.model_url).ok


def test_changed_manifest_needs_force(fixtures_dir: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    source = str(fixtures_dir / MINICPM)
    first = extract(source, ExtractOptions(store=store, images="none"))
    manifest = manifest_bytes(first)
    with pytest.raises(WeightsmithError, match="use --force"):
        extract(source, ExtractOptions(store=store, images="preview"))
    assert manifest_bytes(first) == manifest
    replaced = extract(source, ExtractOptions(store=store, images="preview", force=True))
    assert replaced.status == "replaced"
    assert model_of(replaced).manifest()["selection"]["images"] == "preview"


def test_second_run_with_known_revision_writes_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    options = ExtractOptions(store=str(tmp_path / "store"), revision="abc")
    first = extract(str(fixtures_dir / MINICPM), options)
    second = extract(str(fixtures_dir / MINICPM), options)
    assert manifest_bytes(second) == manifest_bytes(first)
    assert second.written == 0


# ---------------------------------------------------------------------------------------------
# 6. images


def image_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "big": rng.standard_normal((3000, 700)).astype(np.float32),
        "wide": rng.standard_normal((2, 2500)).astype(np.float32),
        "vec": np.array([-1.0, -0.5, 0.0, 0.5, 1.0], np.float32),
        "cube": np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 30,
        "ints": np.arange(24, dtype=np.int16).reshape(4, 6) * -7,
        "scalar": np.array(4.0, np.float32),
    }


@pytest.fixture
def images_source(tmp_path: Path) -> Path:
    path = tmp_path / "images" / "model.safetensors"
    path.parent.mkdir()
    save_file(image_tensors(), str(path))
    return path


def test_images_all_writes_float_tiff_and_gray_png(images_source: Path, tmp_path: Path) -> None:
    result = extract(str(images_source), ExtractOptions(store=str(tmp_path / "store")))
    model = model_of(result)
    manifest = model.manifest()
    assert manifest["selection"]["images"] == "all"
    for name, values in image_tensors().items():
        record = manifest["tensors"][name]
        arts = record["artifacts"]
        assert set(arts) == {"zarr", "tiff", "png", "png_sha256"}  # verify rebuilds the TIFF
        shape2d = (
            (1, 1) if values.ndim == 0 else (1, values.size) if values.ndim == 1 else (values.shape[0], values[0].size)
        )
        with tifffile.TiffFile(local(model, arts["tiff"])) as tif:
            (page,) = tif.pages
            assert page.is_tiled
            assert page.samplesperpixel == 1
            assert page.dtype == np.float32
            assert page.tilewidth % 16 == 0 and page.tilelength % 16 == 0
        tiff, meta = images.read_tiff(local(model, arts["tiff"]))
        assert meta == {"name": name, "shape": list(values.shape), "dtype": record["dtype"]}
        assert tiff.dtype == np.float32 and tiff.shape == shape2d
        assert np.array_equal(tiff, values.astype(np.float32).reshape(shape2d)), name

        png = Image.open(local(model, arts["png"]))
        assert png.mode == "L"
        assert png.width <= 1024 and png.height <= 1024
        if max(shape2d) <= 1024:
            assert (png.height, png.width) == shape2d
    assert Image.open(local(model, manifest["tensors"]["big"]["artifacts"]["png"])).size == (
        700,
        1000,
    )
    assert Image.open(local(model, manifest["tensors"]["wide"]["artifacts"]["png"])).size == (
        834,
        2,
    )
    # Symmetric scaling: -p..+p (p = 99.5th percentile of |x|, here 1) maps to 0..255.
    vec = np.asarray(Image.open(local(model, manifest["tensors"]["vec"]["artifacts"]["png"])))
    assert np.abs(vec.astype(int) - [[0, 64, 128, 191, 255]]).max() <= 1
    stats = manifest["tensors"]["cube"]["stats"]
    assert (stats["min"], stats["max"], stats["mean"], stats["nan"]) == (-30.0, 29.0, -0.5, 0)
    assert verify(result.model_url).ok


@pytest.mark.parametrize(
    "damage",
    ["flip a pixel byte", "flip a header byte", "truncate", "append a byte", "delete"],
)
def test_verify_rebuilds_the_tiff_and_notices_damage(images_source: Path, tmp_path: Path, damage: str) -> None:
    """An uncompressed TIFF has no checksum in the manifest: verify compares it, byte for byte,
    with the TIFF the array's values make, so any change to the file is caught."""
    result = extract(str(images_source), ExtractOptions(store=str(tmp_path / "store")))
    model = model_of(result)
    path = local(model, model.manifest()["tensors"]["big"]["artifacts"]["tiff"])
    data = bytearray(path.read_bytes())
    if damage == "flip a pixel byte":
        data[len(data) // 2] ^= 1
    elif damage == "flip a header byte":
        data[data.index(b'"big"') + 1] ^= 1  # the name in the image description
    elif damage == "truncate":
        data = data[:-1]
    else:
        data.append(0)
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(bytes(data))
    problems = verify(result.model_url).problems
    assert len(problems) == 1 and problems[0].startswith("tiff of 'big'"), problems


def test_a_compressed_tiff_keeps_its_checksum(
    images_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(images, "TIFF_COMPRESSION", "zlib")
    result = extract(str(images_source), ExtractOptions(store=str(tmp_path / "store")))
    model = model_of(result)
    arts = model.manifest()["tensors"]["big"]["artifacts"]
    assert "tiff_sha256" in arts
    tiff, _ = images.read_tiff(local(model, arts["tiff"]))
    assert np.array_equal(tiff, image_tensors()["big"])
    assert verify(result.model_url).ok
    path = local(model, arts["tiff"])
    path.write_bytes(path.read_bytes()[:-1])
    assert verify(result.model_url).problems == [f"tiff of 'big': {arts['tiff']} does not match its checksum"]


def test_images_preview_writes_png_only(images_source: Path, tmp_path: Path) -> None:
    result = extract(str(images_source), ExtractOptions(store=str(tmp_path / "store"), images="preview"))
    model = model_of(result)
    for record in model.manifest()["tensors"].values():
        assert set(record["artifacts"]) == {"zarr", "png", "png_sha256"}
        assert Image.open(local(model, record["artifacts"]["png"])).mode == "L"
    assert not local(model, model.key("images")).exists()
    assert verify(result.model_url).ok


def test_images_none_writes_arrays_only(images_source: Path, tmp_path: Path) -> None:
    result = extract(str(images_source), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    model = model_of(result)
    for record in model.manifest()["tensors"].values():
        assert set(record["artifacts"]) == {"zarr"}
        assert record["stats"]["max"] is not None  # statistics are computed all the same
    assert not local(model, model.key("images")).exists()
    assert not local(model, model.key("previews")).exists()
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == images_source.read_bytes()


# ---------------------------------------------------------------------------------------------
# 7. streaming in row blocks


def test_big_tensor_streams_in_row_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    big = rng.standard_normal((4100, 1024)).astype(np.float32)  # 16.8 MB, 2+ chunks of 8 MB
    path = tmp_path / "stream" / "model.safetensors"
    path.parent.mkdir()
    save_file({"big": big, "small": np.ones(3, np.float32)}, str(path))

    reads: list[int] = []
    result = extract(
        str(path),
        ExtractOptions(store=str(tmp_path / "store"), block_bytes=1 << 16),
        progress=lambda n, name: reads.append(n) if name == "big" else None,
    )
    assert sum(reads) == big.nbytes
    assert len(reads) >= 3
    assert max(reads) <= arrays.CHUNK_BYTES  # never the whole tensor at once
    model = model_of(result)
    record = model.manifest()["tensors"]["big"]
    stored = arrays.open_array(model.store, record["artifacts"]["zarr"])
    assert stored.chunks[0] < big.shape[0]

    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()
    tiff, _ = images.read_tiff(local(model, record["artifacts"]["tiff"]))
    assert np.array_equal(tiff, big)
    assert verify(result.model_url).ok
    # The block size changes how the bytes travel, never what is stored.
    whole = extract(str(path), ExtractOptions(store=str(tmp_path / "store2")))
    assert manifest_bytes(whole) == manifest_bytes(result)


def test_reused_read_buffers_never_mix_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read buffer is reused once its block is hashed, in Zarr and imaged: many 1 MB blocks of
    several tensors (checksum pass included) must still land where they belong, bit for bit."""
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 1 << 20)
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.standard_normal((700 + 37 * i, 1024)).astype(np.float32) for i in range(4)}
    path = tmp_path / "pool" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    result = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), block_bytes=1 << 20))
    model = model_of(result)
    for name, values in tensors.items():
        tiff, _ = images.read_tiff(local(model, model.manifest()["tensors"][name]["artifacts"]["tiff"]))
        assert np.array_equal(tiff, values), name
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == path.read_bytes()
    assert verify(result.model_url).ok


# ---------------------------------------------------------------------------------------------
# 8. slug and revision


def test_name_sets_the_slug(fixtures_dir: Path, tmp_path: Path) -> None:
    result = extract(
        str(fixtures_dir / MINICPM),
        ExtractOptions(store=str(tmp_path / "store"), name="org/My Model", images="none"),
    )
    assert result.slug == "org--My%20Model"
    assert result.model_url == f"{tmp_path / 'store'}/models/org--My%20Model/{result.revision}"


def test_default_slug_is_the_parent_folder(fixtures_dir: Path, tmp_path: Path) -> None:
    path = copy_fixture(fixtures_dir, MINICPM, tmp_path / "minicpm-tiny", "weights.safetensors")
    result = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    assert result.slug == "minicpm-tiny"
    folder = extract(str(path.parent), ExtractOptions(store=str(tmp_path / "store"), images="none"))
    assert (folder.slug, folder.revision, folder.status) == (
        "minicpm-tiny",
        result.revision,
        "unchanged",
    )


def test_revision_is_a_content_hash(fixtures_dir: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    a = copy_fixture(fixtures_dir, MINICPM, tmp_path / "a")
    b = copy_fixture(fixtures_dir, MINICPM, tmp_path / "b")
    rev_a = extract(str(a), ExtractOptions(store=store, images="none")).revision
    rev_b = extract(str(b), ExtractOptions(store=store, images="none")).revision
    assert HEX16.fullmatch(rev_a)
    assert rev_a == rev_b  # same bytes, other folder: same revision

    # Flip one bit of one value of the last tensor: another revision.
    data = bytearray(b.read_bytes())
    data[-1] ^= 0x01
    b.write_bytes(bytes(data))
    changed = extract(str(b), ExtractOptions(store=store, images="none"))
    assert HEX16.fullmatch(changed.revision) and changed.revision != rev_a
    # ... and flipping it back gives the first revision again.
    data[-1] ^= 0x01
    b.write_bytes(bytes(data))
    assert extract(str(b), ExtractOptions(store=store, images="none")).revision == rev_a


@pytest.mark.parametrize("when", ["after the checksum pass", "while extracting", "replaced"])
def test_a_source_that_changes_during_the_run_is_an_error(tmp_path: Path, when: str) -> None:
    """The checksum pass names the revision; the extraction then trusts those checksums only
    while the file is unchanged (a local file is not hashed twice). Any change, same size
    included, is an error, and no manifest is written."""
    path = random_model(tmp_path / "m" / "model.safetensors")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last value of the last tensor
    trigger = "checksums" if when == "after the checksum pass" else "a"  # "a" is read, "b" not yet
    time.sleep(0.02)  # a later clock tick than the file's creation (coarse timestamps, older kernels)

    def progress(nbytes: int, name: str) -> None:
        if name != trigger:
            return
        if when == "replaced":
            (tmp_path / "new").write_bytes(bytes(data))
            os.replace(tmp_path / "new", path)
        else:
            with open(path, "r+b") as f:  # in place, same size
                f.seek(len(data) - 1)
                f.write(data[-1:])

    with pytest.raises(WeightsmithError, match="changed while it was being extracted"):
        extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images="none"), progress=progress)
    assert not list((tmp_path / "store").rglob(MANIFEST))


def test_fingerprints_that_do_not_match_mean_hashing_again(tmp_path: Path) -> None:
    """Fingerprints taken elsewhere (another machine, or before a change that was undone) are not
    trusted: the unit hashes the bytes itself, and equal bytes are no error."""
    path = random_model(tmp_path / "m" / "model.safetensors")
    options = ExtractOptions(store=str(tmp_path / "store"), images="none")
    source, the_plan = prepare(str(path), options)
    checksums = {n: v for u in the_plan.checksum_units for n, v in checksum_unit(source, u, 1 << 20).items()}
    model = model_ref(source, options, checksums)
    foreign = [("other-machine", 1, 2, 3, 4)] * len(source.containers)
    results = [extract_unit(source, model, u, options, checksums, fingerprints=foreign) for u in the_plan.units]
    assert {r["name"]: r["sha256"] for res in results for r in res.records} == checksums


def test_revision_covers_the_header(tmp_path: Path) -> None:
    """Same tensor bytes, other metadata: another revision (restore must give other bytes)."""
    values = {"w": np.arange(6, dtype=np.float32)}
    save_file(values, str(tmp_path / "a.safetensors"), metadata={"v": "1"})
    save_file(values, str(tmp_path / "b.safetensors"), metadata={"v": "2"})
    store = str(tmp_path / "store")
    rev_a = extract(str(tmp_path / "a.safetensors"), ExtractOptions(store=store, images="none")).revision
    rev_b = extract(str(tmp_path / "b.safetensors"), ExtractOptions(store=store, images="none")).revision
    assert rev_a != rev_b


def test_revision_option_is_used_as_given(fixtures_dir: Path, tmp_path: Path) -> None:
    result = extract(
        str(fixtures_dir / MINICPM),
        ExtractOptions(store=str(tmp_path / "store"), revision="abc", images="none"),
    )
    assert result.revision == "abc"
    assert result.model_url.endswith("/abc")
    assert result.bytes_read < (fixtures_dir / MINICPM).stat().st_size * 1.1  # no checksum pass


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hugging_face_cache_path_gives_id_and_commit(fixtures_dir: Path, tmp_path: Path) -> None:
    """The cache layout: snapshots/<commit>/<file> are symlinks into blobs/."""
    repo = tmp_path / "hub" / "models--org--name"
    blob = copy_fixture(fixtures_dir, MINICPM, repo / "blobs", "9f2c0ffee")
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    (repo / "blobs" / "cfg").write_text('{"model_type": "minicpm3"}')
    (snapshot / "config.json").symlink_to(os.path.relpath(repo / "blobs" / "cfg", snapshot))

    result = extract(str(snapshot / "model.safetensors"), ExtractOptions(store=str(tmp_path / "store")))
    assert (result.slug, result.revision) == ("org--name", COMMIT)
    manifest = model_of(result).manifest()
    assert manifest["model"]["hf_id"] == "org/name"
    assert manifest["files"]["config.json"]["size"] == len('{"model_type": "minicpm3"}')
    out = tmp_path / "out.safetensors"
    restore(result.model_url, str(out))
    assert out.read_bytes() == blob.read_bytes()
    folder = extract(str(snapshot), ExtractOptions(store=str(tmp_path / "store")))
    assert (folder.slug, folder.revision) == ("org--name", COMMIT)


@pytest.mark.parametrize("arg", ["model.safetensors", "./model.safetensors", "."])
def test_relative_path_slug_is_the_folder_name(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arg: str
) -> None:
    copy_fixture(fixtures_dir, MINICPM, tmp_path / "my-model", "model.safetensors")
    monkeypatch.chdir(tmp_path / "my-model")
    result = extract(arg, ExtractOptions(store=str(tmp_path / "store"), images="none"))
    assert result.slug == "my-model"


# ---------------------------------------------------------------------------------------------
# include / exclude


def test_partial_selection(fixtures_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = extract(
        str(fixtures_dir / MINICPM),
        ExtractOptions(store=str(store), include=("*layernorm*",), exclude=("*kv_a*",), images="none"),
    )
    manifest = model_of(result).manifest()
    assert sorted(manifest["tensors"]) == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
    ]
    assert manifest["selection"]["complete"] is False
    with pytest.raises(WeightsmithError, match="only some tensors"):
        restore(result.model_url, str(tmp_path / "out.safetensors"))
    out = tmp_path / "partial.safetensors"
    restore(result.model_url, str(out), dequantize=True)
    original = load_file(str(fixtures_dir / MINICPM))
    partial = load_file(str(out))
    assert sorted(partial) == sorted(manifest["tensors"])
    for name, values in partial.items():
        assert np.array_equal(values, original[name])


def test_no_matching_tensor_writes_nothing(fixtures_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    with pytest.raises(WeightsmithError, match="no tensor matches"):
        extract(str(fixtures_dir / MINICPM), ExtractOptions(store=str(store), include=("nope*",)))
    assert not store.exists()


def test_map_ahead_keeps_order_and_its_byte_budget() -> None:
    """Remote read-ahead: results in order, several computed at once, never more bytes started
    and not yet given back than the budget; an error comes out in its turn."""
    import threading

    from weightsmith.overlap import map_ahead

    sizes = [30, 10, 10, 10, 50, 5, 5, 5, 40, 20]
    lock, live, peak, most = threading.Lock(), [0], [0], [0]
    running = [0]

    def fn(i: int) -> int:
        with lock:
            live[0] += sizes[i]
            peak[0] = max(peak[0], live[0])
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if i == 99:
            raise ValueError("bad item")
        return i

    got = []
    for i in map_ahead(fn, range(len(sizes)), lambda i: sizes[i], budget=60, workers=4):
        got.append(i)
        time.sleep(0.01)
        with lock:
            live[0] -= sizes[i]
    assert got == list(range(len(sizes)))
    assert peak[0] <= 60 and most[0] >= 2  # bounded, and reads did overlap
    sizes.extend([0] * 100)
    with pytest.raises(ValueError, match="bad item"):
        list(map_ahead(fn, [0, 1, 99, 2], lambda i: sizes[i], budget=60, workers=2))
