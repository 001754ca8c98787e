"""`weightsmith run --no-prefect`: the library path of the whole pipeline, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.model import parse_model_url
from weightsmith.verify import verify

pytestmark = pytest.mark.slow

TILE = {
    "tile": 16,
    "ae_channels": 16,
    "ae_train_steps": 5,
    "unet_train_steps": 5,
    "batch_size": 8,
    "block_out_channels": [16, 32],
    "sample_steps": 2,
}


def test_run_without_prefect_extracts_predicts_assembles_and_vets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    model_dir = build_gpt2(tmp_path / "gpt", *SIZES["tiny"])
    text = tmp_path / "held.txt"
    text.write_text(json.__doc__ * 4)
    store = tmp_path / "store"
    command = [
        sys.executable, "-m", "weightsmith.cli", "run", str(model_dir), "--store", str(store),
        "--stages", "extract,predict,weight-stats,lm-eval", "--layer", "transformer.h.0.ln_1.*",
        "--generator", "tile-diffusion", "--config", json.dumps({"tile-diffusion": TILE}),
        "--samples", "1", "--text", str(text), "--no-prefect",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report_url = run.stdout.strip().splitlines()[-1]
    assert report_url.startswith(str(store)) and "/reports/" in report_url
    assert not (tmp_path / "home" / "prefect").exists() or not any((tmp_path / "home" / "prefect").iterdir())

    model = parse_model_url(report_url.split("/reports/")[0])
    assert verify(model.url).ok
    report = model.store.read_json(f"{report_url[len(model.store.url) + 1 :]}/report.json")
    labels = {e["label"] for e in report["entries"]}
    assert {"original", "tile-diffusion", "gaussian", "permute"} <= labels
    assert report["primary"]["metric"] == "lm-perplexity/nll_per_byte"
    candidates = [k for k in model.store.list(model.key("candidates")) if k.endswith("candidate.json")]
    assert len(candidates) >= len(labels)
    assert "tile-diffusion#0" in run.stderr  # the verdicts are printed


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 2.4 MB tmpfs (needs root, as CI has)."""
    folder = tmp_path / "small"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2400k", "tmpfs", str(folder)], check=True, timeout=30)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True, timeout=30)


def test_run_is_checked_for_space_with_the_images_it_writes(small_disk: Path, tmp_path: Path, monkeypatch) -> None:
    """The pipeline extracts previews only: a model that fits with previews but not with TIFFs runs."""
    import fixture_paths

    from weightsmith.extract import ExtractOptions, plan
    from weightsmith.sources import open_source
    from weightsmith.space import estimate_extract_bytes

    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))
    model = fixture_paths.FIXTURES / "safetensors" / "ollama_minicpm3_4b_model.safetensors"
    source = open_source(str(model))
    units = plan(source, ExtractOptions(store=str(small_disk)))
    free = 2400 * 1024
    assert estimate_extract_bytes(source, units, "preview") < free < estimate_extract_bytes(source, units, "all")

    cli = [sys.executable, "-m", "weightsmith.cli"]
    refused = subprocess.run(
        [*cli, "extract", str(model), "--store", str(small_disk / "a")], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "needs about" in refused.stderr, refused.stderr
    run = subprocess.run([*cli, "run", str(model), "--store", str(small_disk / "b")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "/reports/" in run.stdout
