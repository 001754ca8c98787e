"""What the pipeline predicts per group (weightsmith.pipeline): the baseline table, the noise radii."""

from __future__ import annotations

from weightsmith.pipeline import PipelineOptions, ZooFacts, noise_radii_for, predictions_plan


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


def test_plan_with_a_zoo_gives_every_registered_baseline() -> None:
    options = PipelineOptions(store="/tmp/x", generators=("zoo-diffusion",), samples=4, zoo="z")
    labels = {p.label: p for p in predictions_plan(options, ZooFacts(k=8, ordered=True, base=True))}
    expected = {
        "zoo-diffusion", "gaussian", "permute", "coord-gaussian", "zoo-member", "latest",
        "pca-gaussian(scale=0.5)", "pca-gaussian(scale=1)", "pca-gaussian(scale=2)",
        "average(k=2)", "average(k=4)", "average(k=all)",
        "extrapolate(t=0.1)", "extrapolate(t=0.3)", "extrapolate(t=1)",
        "task-arithmetic", "task-arithmetic(k=2)", "task-arithmetic(k=4,scale=0.5)",
        "ties(density=0.2)", "ties(density=0.5,k=2)",
    }  # fmt: skip
    assert expected <= set(labels), expected - set(labels)
    for label in ("latest", "extrapolate(t=1)", "average(k=all)"):
        assert labels[label].samples == 1  # deterministic: scored once
    for label in ("zoo-member", "average(k=2)", "gaussian", "ties(density=0.2)"):
        assert labels[label].samples == 4
    unordered = {p.label for p in predictions_plan(options, ZooFacts(k=8, ordered=False, base=False))}
    assert not unordered & {"latest", "extrapolate(t=1)", "task-arithmetic", "ties(density=0.2)"}
    small = {p.label for p in predictions_plan(options, ZooFacts(k=3, ordered=False, base=True))}
    assert "average(k=4)" not in small and "task-arithmetic(k=4)" not in small  # subsets the zoo cannot give


def test_fit_seeds_fit_each_generator_once_per_seed_under_one_label() -> None:
    options = PipelineOptions(
        store="/tmp/x",
        generators=("zoo-diffusion",),
        generator_config={"zoo-diffusion": {"hidden": 8}},
        samples=4,
        fit_seeds=(0, 1, 2),
    )
    fits = [p for p in predictions_plan(options) if p.kind == "candidate"]
    assert [(p.label, p.fit, p.config) for p in fits] == [
        ("zoo-diffusion", i, {"hidden": 8, "seed": s}) for i, s in enumerate((0, 1, 2))
    ]
    one = [p for p in predictions_plan(options.model_copy(update={"fit_seeds": (0,)})) if p.kind == "candidate"]
    assert [(p.fit, p.config) for p in one] == [(0, {"hidden": 8})]  # one seed of 0: the config as given


def test_a_reference_zoo_is_scored_whole_as_gold_never_as_a_baseline() -> None:
    options = PipelineOptions(store="/tmp/x", generators=("zoo-diffusion",), samples=4, zoo="z", reference="gold-z")
    plan = predictions_plan(options, ZooFacts(k=6, ordered=False, base=True), ZooFacts(k=2, ordered=False, base=True))
    gold = [p for p in plan if p.label == "gold"]
    assert len(gold) == 1 and gold[0].kind == "reference" and gold[0].zoo == "gold-z"
    assert gold[0].samples == 2 and gold[0].generator == "zoo-member" and gold[0].config == {"pick": "in-order"}
    assert all(p.zoo is None for p in plan if p.label != "gold")  # everything else fits on the zoo
    assert "gold" not in {p.label for p in predictions_plan(options, ZooFacts(k=6, ordered=False, base=True))}
