"""Store upkeep: `ls` shows models with status and sizes, `gc` removes leftovers of unfinished
runs and artifacts no manifest names but never a complete model's data, and the free-space
check refuses an extraction that cannot fit (on a real 1 MB tmpfs where mounting is allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import namedtuple
from dataclasses import asdict
from pathlib import Path

import fixture_paths
import pytest
import typer
from typer.testing import CliRunner

from weightsmith import space, upkeep
from weightsmith.cli import upkeep as cli_upkeep
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, ExtractResult, extract
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.restore import restore
from weightsmith.space import check_free_space, estimate_output_bytes
from weightsmith.store import Store
from weightsmith.upkeep import gc, list_models
from weightsmith.verify import verify

FIXTURES = fixture_paths.FIXTURES
SMALL = FIXTURES / "safetensors" / "hf_samples_overall.safetensors"  # 9 tensors, 702 bytes
MINICPM = FIXTURES / "safetensors" / "ollama_minicpm3_4b_model.safetensors"  # 15 tensors, 400 KB
LORA = FIXTURES / "safetensors" / "diffusers_sd_pokemon_lora.safetensors"  # 3.2 MB
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(autouse=True)
def _state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below root -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_dir(model: ModelRef) -> Path:
    return Path(model.store.path(model.prefix))


def interrupted(store: Path, name: str, source: Path = MINICPM) -> ModelRef:
    """An extraction stopped by an error after its first block: a failed run, no manifest."""

    def progress(nbytes: int, tensor: str) -> None:
        raise RuntimeError("stopped by the test")

    options = ExtractOptions(store=str(store), name=name, revision="r1", images="preview")
    with pytest.raises(RuntimeError, match="stopped by the test"):
        extract(str(source), options, progress=progress)
    model = ModelRef(Store(str(store)), name, "r1")
    assert not model.is_complete() and model_dir(model).is_dir()
    return model


def killed(store: Path, name: str) -> ModelRef:
    """An extraction killed outright: arrays written, no run file, no manifest."""
    model = interrupted(store, name)
    shutil.rmtree(model_dir(model) / "runs")
    return model


def complete(store: Path, source: Path = SMALL, name: str = "good", images: str = "all") -> ExtractResult:
    return extract(str(source), ExtractOptions(store=str(store), name=name, images=images))


def age(path: Path, seconds: float) -> None:
    """Make everything below (and at) path look `seconds` old."""
    when = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (when, when))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("ls")(cli_upkeep.ls)
    app.command("gc")(cli_upkeep.gc)
    return app


# ---------------------------------------------------------------------------------------------
# ls


def test_ls_shows_status_sizes_and_runs(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = parse_model_url(complete(store).model_url)
    broken = interrupted(store, "broken")
    dead = killed(store, "dead")

    infos = {m.slug: m for m in list_models(Store(str(store)))}
    assert sorted(infos) == ["broken", "dead", "good"]
    assert (infos["good"].status, infos["good"].tensors, infos["good"].last_outcome) == (
        "complete",
        9,
        "created",
    )
    assert (infos["broken"].status, infos["broken"].last_outcome) == ("failed", "failed")
    assert (infos["dead"].status, infos["dead"].last_run, infos["dead"].last_outcome) == (
        "incomplete",
        None,
        None,
    )
    for slug, model in (("good", good), ("broken", broken), ("dead", dead)):
        assert infos[slug].stored_bytes == du(model_dir(model)) > 0
        assert infos[slug].revision == model.revision and infos[slug].url == model.url
    assert infos["broken"].tensors == 1  # the array it had started
    assert infos["good"].last_run is not None and abs(infos["good"].last_run - time.time()) < 600

    result = CliRunner().invoke(cli(), ["ls", "--store", str(store)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for word in ("good", "broken", "dead", "complete", "failed", "incomplete", "3 models"):
        assert word in result.output
    result = CliRunner().invoke(cli(), ["ls", "--store", str(store), "--json"])
    assert json.loads(result.stdout) == [asdict(m) for m in list_models(Store(str(store)))]


def test_ls_counts_finished_predictions_candidates_and_reports(tmp_path: Path) -> None:
    model = parse_model_url(complete(tmp_path / "store").model_url)
    for key in (
        "predictions/p1/prediction.json",
        "predictions/p2/tensors/x",
        "candidates/c1/candidate.json",
        "reports/r1/report.json",
        "reports/r2/report.json",
    ):
        model.store.write_bytes(model.key(key), b"{}")
    (info,) = list_models(model.store)
    assert (info.predictions, info.candidates, info.reports) == (1, 1, 2)


def test_ls_of_an_empty_or_missing_store(tmp_path: Path) -> None:
    assert list_models(Store(str(tmp_path / "nothing-here"))) == []
    result = CliRunner().invoke(cli(), ["ls", "--store", str(tmp_path / "nothing-here")])
    assert result.exit_code == 0 and "no models" in result.output


# ---------------------------------------------------------------------------------------------
# gc


def test_gc_dry_run_lists_but_deletes_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    complete(store)
    broken = interrupted(store, "broken")
    dead = killed(store, "dead")
    before = snapshot(tmp_path)

    report = gc(Store(str(store)), dry_run=True, older_than_s=0)

    assert snapshot(tmp_path) == before
    assert {(i.key, i.reason) for i in report.items} == {
        (broken.prefix, "incomplete model (last run failed)"),
        (dead.prefix, "incomplete model (no run finished)"),
    }
    assert report.bytes == du(model_dir(broken)) + du(model_dir(dead))

    result = CliRunner().invoke(cli(), ["gc", "--store", str(store), "--dry-run", "--older-than", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["items"] == [asdict(i) for i in report.items]
    assert snapshot(tmp_path) == before


def test_gc_deletes_interrupted_runs_but_never_a_complete_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    good = complete(store, MINICPM)
    broken = interrupted(store, "broken")
    dead = killed(store, "dead")
    kept = snapshot(model_dir(parse_model_url(good.model_url)))

    report = gc(Store(str(store)), dry_run=False, older_than_s=0)

    assert sorted(i.key for i in report.items) == [broken.prefix, dead.prefix]
    assert not model_dir(broken).exists() and not model_dir(dead).exists()
    assert not (store / "models" / "broken").exists()  # empty slug folders go too
    assert snapshot(model_dir(parse_model_url(good.model_url))) == kept
    assert verify(good.model_url).ok
    restore(good.model_url, str(tmp_path / "out.safetensors"))
    assert (tmp_path / "out.safetensors").read_bytes() == MINICPM.read_bytes()
    assert gc(Store(str(store)), dry_run=False, older_than_s=0).items == []


def test_gc_leaves_recent_leftovers_alone(tmp_path: Path) -> None:
    store = tmp_path / "store"
    broken = interrupted(store, "broken")
    dead = killed(store, "dead")
    assert gc(Store(str(store)), dry_run=False, older_than_s=3600).items == []
    assert model_dir(broken).is_dir() and model_dir(dead).is_dir()

    age(model_dir(broken), 7200)
    report = gc(Store(str(store)), dry_run=False, older_than_s=3600)
    assert [i.key for i in report.items] == [broken.prefix]
    assert not model_dir(broken).exists() and model_dir(dead).is_dir()


def test_gc_removes_stale_artifacts_inside_a_complete_model(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = complete(store, MINICPM, name="m", images="all")
    model = parse_model_url(first.model_url)
    # A forced re-run with other options writes a new generation and switches the manifest to
    # it: every array, TIFF and PNG of the first run is now stale.
    again = extract(str(MINICPM), ExtractOptions(store=str(store), name="m", images="none", force=True))
    assert again.status == "replaced"
    root = model_dir(model)
    generation = root / "generations" / again.run_id
    referenced = snapshot(generation / "tensors")
    shutil.copytree(next((generation / "tensors").iterdir()), generation / "tensors" / "stale.zarr")
    stale = {
        d: sorted(f"{model.prefix}/{d}/{p.name}" for p in (root / d).iterdir())
        for d in ("tensors", "images", "previews")
    }
    extra = {
        "files/.config.json.0123456789ab.tmp": "staging leftover",
        "files/unknown.bin": "not in the manifest",
        "tensors/x.safetensors.partial": "staging leftover",
        "predictions/unfinished/tensors/a.zarr/zarr.json": "unfinished prediction",
        "predictions/done/prediction.json": None,
        "predictions/done/tensors/a.zarr/zarr.json": None,
        "predictions/done/.prediction.json.abc.tmp": "staging leftover",
        "candidates/unfinished/model.safetensors": "unfinished candidate",
        "candidates/done/candidate.json": None,
        "generators/gaussian/fp/state.npz": None,
        "reports/r1/report.json": None,
        ".manifest.json.lock": None,
    }
    for key in extra:
        model.store.write_bytes(model.key(key), b"x")
    for key in (
        ".tmp/tmpabc.tiff",
        ".tmp/candidate-xyz/model.safetensors",
        ".probe/0123",
        "catalog.json",
    ):
        model.store.write_bytes(key, b"x")

    report = gc(model.store, dry_run=False, older_than_s=0)

    expected = {k: "not in the manifest" for k in stale["tensors"] + stale["images"] + stale["previews"]}
    expected[f"{model.prefix}/generations/{again.run_id}/tensors/stale.zarr"] = "not in the manifest"
    for key, reason in extra.items():
        if reason == "unfinished prediction":
            expected[model.key("predictions/unfinished")] = reason
        elif reason == "unfinished candidate":
            expected[model.key("candidates/unfinished")] = reason
        elif reason:
            expected[model.key(key)] = reason
    expected |= {
        ".tmp/tmpabc.tiff": "staging leftover",
        ".tmp/candidate-xyz": "staging leftover",
        ".probe/0123": "write probe",
    }
    assert {i.key: i.reason for i in report.items} == expected
    for key, reason in extra.items():
        assert model.store.exists(model.key(key)) == (reason is None), key
    assert model.store.exists("catalog.json") and model.store.exists(model.key("runs"))
    assert snapshot(generation / "tensors") == referenced
    assert not any((root / d).exists() for d in ("tensors", "images", "previews"))
    assert verify(first.model_url).ok
    restore(first.model_url, str(tmp_path / "out.safetensors"))
    assert (tmp_path / "out.safetensors").read_bytes() == MINICPM.read_bytes()


def test_gc_leaves_a_model_with_an_unreadable_manifest_alone(tmp_path: Path) -> None:
    store = tmp_path / "store"
    model = parse_model_url(complete(store).model_url)
    Path(model.store.path(model.key(MANIFEST))).write_text("{ hand-edited")
    model.store.write_bytes(model.key("images/stale.tiff"), b"x")
    before = snapshot(tmp_path)

    report = gc(model.store, dry_run=False, older_than_s=0)

    assert report.items == [] and report.skipped == [f"{model.prefix}: manifest.json is unreadable (JSONDecodeError)"]
    assert snapshot(tmp_path) == before
    assert [m.status for m in list_models(model.store)] == ["damaged"]


def test_gc_keeps_what_a_run_touched_while_gc_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    broken = interrupted(store, "broken")
    age(model_dir(broken), 7200)
    original = upkeep._find

    def resumed_meanwhile(the_store: Store, prefix: str):
        if prefix == broken.prefix:  # the look just before deleting: a resumed run wrote a file
            (model_dir(broken) / "runs" / "new.json").write_text("{}")
        return original(the_store, prefix)

    monkeypatch.setattr(upkeep, "_find", resumed_meanwhile)
    report = gc(Store(str(store)), dry_run=False, older_than_s=3600)
    assert report.items == [] and report.skipped == [f"{broken.prefix}: changed while gc ran"]
    assert model_dir(broken).is_dir()


def test_gc_cli_reports_and_refuses_a_bad_duration(tmp_path: Path) -> None:
    store = tmp_path / "store"
    broken = interrupted(store, "broken")
    result = CliRunner().invoke(cli(), ["gc", "--store", str(store), "--older-than", "0"])
    assert result.exit_code == 0, result.output
    assert f"deleted {broken.prefix}" in result.output and "deleted 1 items" in result.output
    result = CliRunner().invoke(cli(), ["gc", "--store", str(store), "--older-than", "soon"])
    assert result.exit_code == 2
    assert "error: --older-than: 'soon' is not a duration" in result.output


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("0", 0),
        ("90s", 90),
        ("30m", 1800),
        ("1h", 3600),
        ("2d", 172800),
        ("1.5h", 5400),
        ("1w", 604800),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert cli_upkeep.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "1y", "1h30m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(WeightsmithError, match="--older-than"):
        cli_upkeep.parse_duration(text)


# ---------------------------------------------------------------------------------------------
# free space


def test_free_space_check_uses_the_nearest_existing_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []

    def disk_usage(path: str) -> Usage:
        asked.append(path)
        return Usage(100 * 10**9, 99 * 10**9, 10**9)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    store = Store(str(tmp_path / "not" / "yet" / "store"))
    check_free_space(store, 10**9)  # exactly enough
    assert asked == [str(tmp_path)]
    with pytest.raises(WeightsmithError) as e:
        check_free_space(store, 2 * 10**9)
    assert str(e.value).startswith(f"{store.url}: needs about 2.0 GB free, has 1.0 GB")
    assert "\n" not in str(e.value)


def test_free_space_is_not_checked_on_s3(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: pytest.fail("asked the local disk"))
    check_free_space(Store("s3://bucket/prefix"), 10**15)


def test_estimate_output_bytes() -> None:
    mb, gb = 1 << 20, 10**9

    def slack(n: int) -> int:
        return n + n // 20 + mb

    assert estimate_output_bytes(gb, "none") == slack(gb)  # Zarr only
    assert estimate_output_bytes(gb, "preview") == slack(gb + gb // 2)  # + a byte per 16-bit value
    assert estimate_output_bytes(gb, "all") == slack(gb + 2 * gb + gb // 2)  # + a float32 TIFF
    assert estimate_output_bytes(gb, "all", float32_bytes=4 * gb, tensors=2) == slack(
        gb + 2 * 32 * 1024 + 4 * gb + 2 * mb  # previews capped at 1024 x 1024 each
    )


@pytest.mark.parametrize(
    "fixture",
    [
        "gguf/derived_multiquant_real_blocks.gguf",
        "gptq/llama_3_2_1b_int4.safetensors",
        "safetensors/diffusers_sd_pokemon_lora.safetensors",
    ],
)
def test_estimate_extract_bytes_covers_what_extract_writes(tmp_path: Path, fixture: str) -> None:
    """GGUF blocks and GPTQ weights expand to float32, small tensors pad to TIFF tiles: covered."""
    from weightsmith.extract import plan
    from weightsmith.sources import open_source

    options = ExtractOptions(store=str(tmp_path / "store"))
    source = open_source(str(FIXTURES / fixture))
    estimate = space.estimate_extract_bytes(source, plan(source, options), "all")
    stored = du(model_dir(parse_model_url(extract(str(FIXTURES / fixture), options).model_url)))
    assert stored <= estimate <= 2 * stored + (2 << 20)


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A real 1 MB tmpfs (needs root and a kernel that allows the mount; skipped otherwise)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    try:
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip() or run.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def test_free_space_check_on_a_tiny_disk(tiny_disk: Path) -> None:
    store = Store(str(tiny_disk / "store"))
    check_free_space(store, 100_000)
    with pytest.raises(WeightsmithError, match=r"needs about .* free, has 1\.0 MB"):
        check_free_space(store, estimate_output_bytes(LORA.stat().st_size, "all"))


def test_extract_refuses_a_store_too_small_before_writing(tiny_disk: Path) -> None:
    with pytest.raises(WeightsmithError, match="needs about"):
        extract(str(LORA), ExtractOptions(store=str(tiny_disk / "store")))
    assert not (tiny_disk / "store" / "models").exists()


@pytest.mark.s3
def test_ls_and_gc_on_s3(s3_bucket: str) -> None:
    """Same listing and collection on S3 (sizes and times come from the object listing)."""
    url = f"s3://{s3_bucket}/store"
    good = complete(url, MINICPM)
    options = ExtractOptions(store=url, name="broken", revision="r1", images="preview")

    def progress(nbytes: int, tensor: str) -> None:
        raise RuntimeError("stopped by the test")

    with pytest.raises(RuntimeError):
        extract(str(MINICPM), options, progress=progress)
    store = Store(url)
    infos = {m.slug: m for m in list_models(store)}
    assert {s: i.status for s, i in infos.items()} == {"good": "complete", "broken": "failed"}
    assert infos["good"].stored_bytes == store.size(parse_model_url(good.model_url).prefix)

    assert [i.key for i in gc(store, dry_run=True, older_than_s=3600).items] == []
    report = gc(store, dry_run=False, older_than_s=0)
    assert [i.key for i in report.items] == ["models/broken/r1"]
    assert [m.slug for m in list_models(store)] == ["good"]
    assert verify(good.model_url).ok


@pytest.mark.s3
def test_ls_with_wrong_credentials_is_a_one_line_error(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached filesystem would keep the right key
    result = CliRunner().invoke(cli(), ["ls", "--store", f"s3://{s3_bucket}/store"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: s3://{s3_bucket}/store: cannot list models/")
