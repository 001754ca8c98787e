"""bench/quality.py's paired bootstrap: the SE it reports for new - previous must see fit-to-fit
variation, or two fits of the same configuration look "significantly" different."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from quality import _se_units, paired  # noqa: E402


def _labels(fit_effect: float, shift: float, seed: int, fits: int = 3, samples: int = 8, blocks: int = 5):
    """Two labels (fits, samples, blocks): per-fit offsets (independent per label), shared sample
    noise (the same seeds in both), `shift` added to the first."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0.0, 1.0, (fits, samples, blocks))
    a = shared + fit_effect * rng.normal(0.0, 1.0, (fits, 1, 1)) + shift
    b = shared + fit_effect * rng.normal(0.0, 1.0, (fits, 1, 1))
    return a, b


def test_a_shift_is_found_and_its_size_reported() -> None:
    a, b = _labels(fit_effect=0.0, shift=0.5, seed=0)
    r = paired(a, b, np.ones(5))
    assert abs(r["d"] - 0.5) < 1e-9  # the pairing cancels the shared noise exactly
    assert r["a"] - r["b"] == r["d"]


def test_fit_variation_widens_the_se() -> None:
    """Same configuration, different fits: the SE must cover the difference (an A/A check)."""
    z = []
    for seed in range(20):
        a, b = _labels(fit_effect=1.0, shift=0.0, seed=seed)
        r = paired(a, b, np.ones(5))
        assert r["se"] > 0.2  # the fits differ by ~1.4 on average; one fit per label cannot hide that
        z.append(abs(r["d"]) / r["se"])
    # With only 3 fits the bootstrap SE is rough, but most A/A differences stay within 2 SE.
    assert np.mean(np.array(z) <= 2.0) >= 0.7, z


def test_block_weights_are_bytes() -> None:
    """Per-block values are sums over the block's bytes: the mean is per byte, not per block."""
    a = np.ones((1, 1, 2)) * np.array([2.0, 6.0])  # 2 nats over 1 byte, 6 nats over 3 bytes
    b = np.zeros((1, 1, 2))
    r = paired(a, b, np.array([1.0, 3.0]))
    assert abs(r["a"] - 2.0) < 1e-12  # (2 + 6) / (1 + 3)


def test_identical_labels_are_within_any_number_of_se() -> None:
    """The same samples under both labels (a configuration that resolves to the previous one):
    every replicate differs by exactly 0, so the SE is 0 and the verdict must still say "within"."""
    a, _ = _labels(fit_effect=1.0, shift=0.0, seed=0)
    r = paired(a, a.copy(), np.ones(5))
    assert r["d"] == 0.0 and r["se"] == 0.0
    assert _se_units(r["d"], r["se"]) == 0.0
    assert _se_units(1e-6, 0.0) == float("inf") and _se_units(-1e-6, 0.0) == float("-inf")
    assert _se_units(0.1, 0.05) == 2.0
