"""Statistics that decide (weightsmith.vet.statistics): bootstrap SEs against hand-computed ones,
the ensemble NLL, and the "beyond" rule on constructed reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from weightsmith.vet import statistics as st
from weightsmith.vet.statistics import LabelStats


def test_bootstrap_se_of_one_sample_is_the_block_se() -> None:
    # One sample, n blocks of one byte: the bootstrap SE of the mean is the plug-in SE,
    # sqrt(sum (x_i - mean)^2 / n) / sqrt(n).
    x = np.random.default_rng(1).normal(1.5, 0.2, 200)
    reps = st.bootstrap({"a": x[None]}, np.ones(200))
    hand = math.sqrt(((x - x.mean()) ** 2).sum() / 200) / math.sqrt(200)
    assert reps["a"].std(ddof=1) == pytest.approx(hand, rel=0.06)
    assert reps["a"].mean() == pytest.approx(x.mean(), abs=hand / 5)  # Monte Carlo error ~ hand / sqrt(B)


def test_bootstrap_se_of_two_samples_is_the_sample_se() -> None:
    # Two samples, constant over blocks at a and b: only the draw of samples varies. The mean
    # of two draws from {a, b} is a, (a+b)/2 or b with odds 1:2:1, so its SE is |a - b| / (2 sqrt 2).
    a, b = 1.0, 1.4
    values = np.array([[a] * 50, [b] * 50])
    reps = st.bootstrap({"x": values}, np.ones(50))
    assert reps["x"].std(ddof=1) == pytest.approx(abs(a - b) / (2 * math.sqrt(2)), rel=0.05)


def test_paired_blocks_cancel_in_differences() -> None:
    # Two labels that differ by a constant on every block: the paired SE of the difference is 0,
    # while each label alone has a sizeable SE.
    x = np.random.default_rng(2).normal(2.0, 0.5, 100)
    reps = st.bootstrap({"c": x[None], "b": (x + 0.01)[None]}, np.ones(100))
    assert reps["c"].std() > 0.02
    assert (reps["b"] - reps["c"]).std() < 1e-12


def test_several_fits_add_their_spread() -> None:
    # Two fits, each with two identical samples: the fits' spread shows in the SE.
    values = np.array([[1.0] * 20, [1.0] * 20, [2.0] * 20, [2.0] * 20])
    one = st.bootstrap({"x": values}, np.ones(20), fits={"x": [0, 0, 0, 0]})["x"].std(ddof=1)
    two = st.bootstrap({"x": values}, np.ones(20), fits={"x": [0, 0, 1, 1]})["x"].std(ddof=1)
    assert one == pytest.approx(0.5 / 2, rel=0.06)  # 4 draws from {1, 2}: SE 0.5 / sqrt 4
    assert two == pytest.approx(0.5 / math.sqrt(2), rel=0.06)  # 2 draws of fits: SE 0.5 / sqrt 2


def test_ensemble_nll_is_the_mixture() -> None:
    p = np.array([[0.5, 0.25, 0.1], [0.1, 0.25, 0.3]])  # (samples, tokens) true-token probabilities
    nll, m = st.ensemble_nll(np.log(p), np.array([1.0, 2.0, 1.0]))
    hand = -(math.log(0.3) + math.log(0.25) + math.log(0.2)) / 4.0
    assert m == 2 and nll == pytest.approx(hand, rel=1e-12)
    many = np.log(np.full((12, 3), 0.5))
    assert st.ensemble_nll(many, np.ones(3))[1] == 8  # M = min(8, samples)


def _stats(label: str, kind: str, mean: float, novelty: float, functional: float = math.nan) -> LabelStats:
    return LabelStats(label, kind, 8, 1, mean, 0.001, mean, 8, novelty, functional, False)


def _replicates(mean: float, se: float, seed: int) -> np.ndarray:
    z = np.random.default_rng(seed).normal(size=st.REPLICATES)
    return mean + se * (z - z.mean()) / z.std(ddof=1)  # replicates whose std is exactly se


@pytest.mark.parametrize(("sigmas", "verdict"), [(1.0, "not beyond"), (3.0, "beyond")])
def test_beyond_needs_two_se_over_every_qualifying_baseline(sigmas: float, verdict: str) -> None:
    # A constructed report: candidate "gen" at novelty 1.0 with NLL 1.80; baselines as novel
    # (1.2 and 0.96 >= 0.95 x 1.0) are `sigmas` SE worse; a less novel one (0.5) is far better.
    se = 2e-4
    cand = _stats("gen", "candidate", 1.80, 1.0, functional=0.01)
    baselines = [
        _stats("noise(r=1.2)", "baseline", 1.80 + sigmas * se, 1.2, functional=0.02),
        _stats("pca", "baseline", 1.80 + (sigmas + 1) * se, 0.96, functional=0.005),
        _stats("noise(r=0.5)", "baseline", 1.70, 0.5, functional=0.001),
    ]
    reps = {"gen": _replicates(0.0, 0.0, 0)}
    for i, b in enumerate(baselines):
        reps[b.label] = _replicates(0.0, se, i + 1)
    diffs = st.differences(reps, [cand, *baselines])
    assert diffs["gen", "noise(r=1.2)"] == pytest.approx((sigmas * se, se))
    decision = st.decide(cand, baselines, {b: v for (c, b), v in diffs.items()})
    assert decision.qualifying == ["noise(r=1.2)", "pca"]
    assert decision.verdict == verdict and decision.beyond == (verdict == "beyond")
    assert decision.bound_by == "noise(r=1.2)"
    assert decision.margin == pytest.approx(sigmas * se) and decision.margin_se == pytest.approx(se)
    # functionally, only noise(r=1.2) (0.02 >= 0.95 x 0.01) qualifies
    assert decision.functional_bound_by == "noise(r=1.2)"
    assert decision.functional_verdict == verdict


def test_no_baseline_as_novel_is_unbounded() -> None:
    cand = _stats("gen", "candidate", 1.80, 2.0)
    base = _stats("noise(r=1)", "baseline", 1.9, 1.0)
    decision = st.decide(cand, [base], {"noise(r=1)": (0.1, 0.001)})
    assert decision.verdict == "unbounded" and not decision.beyond
    assert decision.margin is None and decision.bound_by is None
    assert decision.functional_verdict == "unbounded"  # no functional novelty measured


def test_label_stats_from_per_token_log_probabilities() -> None:
    rng = np.random.default_rng(3)
    tokens = 3000
    lp = {"original": -rng.uniform(1, 2, (1, tokens)), "gen": -rng.uniform(1, 2, (4, tokens))}
    stats, reps = st.label_stats(
        [("original", "original"), ("gen", "candidate")],
        lp,
        np.ones(tokens),
        novelty={"gen": [0.1, 0.2, 0.3, 0.4]},
        functional={},
        bounds={},
        block=100,
    )
    gen = stats[1]
    assert gen.samples == 4 and gen.mean == pytest.approx(-lp["gen"].sum(axis=1).mean() / tokens)
    assert gen.novelty == pytest.approx(0.25) and math.isnan(gen.functional_novelty)
    assert 0 < gen.se < 0.05 and len(reps["gen"]) == st.REPLICATES
    # the same inputs give the same numbers (fixed seed)
    again, _ = st.label_stats(
        [("original", "original"), ("gen", "candidate")], lp, np.ones(tokens), {}, {}, {}, block=100
    )
    assert again[1].se == gen.se
