"""The weightsmith-pipeline flow on a tiny model: every stage, artifacts in the store, resume."""

from __future__ import annotations

import json

import pytest

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.model import parse_model_url
from weightsmith_flows.pipeline import weightsmith_pipeline

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TILE = {
    "tile": 16,
    "ae_channels": 16,
    "ae_train_steps": 5,
    "unet_train_steps": 5,
    "batch_size": 8,
    "block_out_channels": [16, 32],
    "sample_steps": 2,
}


def test_pipeline_runs_every_stage_and_resumes(tmp_path):
    model_dir = build_gpt2(tmp_path / "gpt", *SIZES["tiny"])
    text = tmp_path / "held.txt"
    text.write_text(json.__doc__ * 4)
    args = dict(
        source=str(model_dir),
        store=str(tmp_path / "store"),
        stages=["extract", "predict", "weight-stats", "lm-eval"],
        layers=[["transformer.h.0.ln_1.*", "transformer.h.0.attn.c_proj.weight"]],  # ln_1 is constant: no std
        generators=["tile-diffusion"],
        generator_config={"tile-diffusion": TILE},
        samples=1,
        text=str(text),
        images="none",
    )
    first = weightsmith_pipeline(**args)
    model = parse_model_url(first["model_url"])
    report_key = first["report_url"][len(model.store.url) + 1 :]
    report = model.store.read_json(f"{report_key}/report.json")
    labels = {e["label"] for e in report["entries"]}
    assert {"original", "tile-diffusion", "gaussian", "permute", "noise(r=0.01)"} <= labels
    assert report["primary"]["metric"] == "lm-perplexity/nll_per_byte"
    assert first["verdicts"] and "tile-diffusion" in first["verdicts"][0]
    summary = report["summary"]
    assert first["summaries"] == [summary]
    assert summary["best_candidate"] == "tile-diffusion" and summary["samples"] == 1
    assert summary["verdict"] in ("beyond", "not beyond", "unbounded")
    assert summary["text_bytes"] == len(text.read_bytes())
    stats = {s["label"]: s for s in report["statistics"]["labels"]}
    assert stats["gaussian"]["se"] is not None and stats["gaussian"]["se"] >= 0
    # noise at the generator's own median novelty, and a sweep reaching 1.5x it
    novelty = stats["tile-diffusion"]["novelty"]
    radii = [e["params"]["radius"] for e in report["entries"] if e["generator"] == "noise"]
    assert float(f"{novelty:.2g}") in radii and max(radii) >= 1.5 * novelty
    predictions = sorted(model.store.list(model.key("predictions")))
    candidates = [k for k in model.store.list(model.key("candidates")) if k.endswith("candidate.json")]
    assert len(candidates) == len(labels)  # one per label and sample (+ the original)

    # An interrupted run: one candidate lost its completion marker. Re-running redoes that one only.
    lost = candidates[1]
    model.store.delete(lost)
    scores = sorted(model.store.list(model.key("scores")))
    again = weightsmith_pipeline(**args)
    assert sorted(model.store.list(model.key("scores"))) == scores  # nothing re-scored
    assert again["reports"] == first["reports"]
    assert model.store.exists(lost)
    assert sorted(model.store.list(model.key("predictions"))) == predictions  # nothing re-predicted
    assert model.store.read_json(f"{report_key}/report.json")["entries"] == report["entries"]
