"""What the pipeline predicts per group (weightsmith.pipeline): the baseline table, the noise radii."""

from __future__ import annotations

import pytest

from weightsmith.pipeline import BASELINE_TABLE, PENDING, PipelineOptions, noise_radii_for, predictions_plan


def test_noise_radii_match_each_generator_label_and_reach_past_the_largest() -> None:
    radii = noise_radii_for({"zoo-diffusion": 0.123, "tile-diffusion": 0.71})
    assert 0.12 in radii and 0.71 in radii  # each label's own median, 2 significant digits
    assert max(radii) >= 1.5 * 0.71 and [r for r in radii if r >= 1.5 * 0.71] == [3.0]  # cut after reaching
    assert 0.01 in radii  # the sweep starts low
    far = noise_radii_for({"g": 50.0})
    assert max(far) >= 75.0  # the sweep extends past its fixed radii when a candidate is far out
    assert noise_radii_for({}) == sorted(set(noise_radii_for({})))  # no candidates: the fixed sweep


def test_plan_without_a_zoo_has_the_plain_baselines_only() -> None:
    plan = predictions_plan(PipelineOptions(store="/tmp/x", generators=("tile-diffusion",), samples=4))
    assert [p.label for p in plan] == ["tile-diffusion", "gaussian", "permute"]
    assert all(p.samples == 4 for p in plan)


def test_plan_with_a_zoo_gives_every_registered_row() -> None:
    options = PipelineOptions(store="/tmp/x", generators=("zoo-diffusion",), samples=4, zoo="z")
    labels = {p.label: p for p in predictions_plan(options, ordered=True)}
    for label, _gen, _cfg, _needs, deterministic in BASELINE_TABLE:
        if label in PENDING and label not in labels:
            continue  # waits for its generator (vet-rng)
        assert label in labels
        assert labels[label].samples == (1 if deterministic else 4)
    unordered = {p.label for p in predictions_plan(options, ordered=False)}
    assert not unordered & {row[0] for row in BASELINE_TABLE if row[3] == "ordered"}


@pytest.mark.parametrize("label", sorted(PENDING))
def test_pending_rows_are_in_the_table(label: str) -> None:
    assert label in {row[0] for row in BASELINE_TABLE}
