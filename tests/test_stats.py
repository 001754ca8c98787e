"""RunningStats: the same bits however the values are split into blocks."""

from __future__ import annotations

import math

import numpy as np

from weightsmith.stats import PIECE, RunningStats


def stats_of(blocks) -> dict:
    stats = RunningStats()
    for block in blocks:
        stats.update(block)
    return stats.as_dict()


def test_block_sizes_do_not_change_the_bits() -> None:
    values = (np.random.default_rng(0).standard_normal(3 * PIECE + 123) * 3 + 1).astype(np.float32)
    values[[5, 70_000]] = np.nan
    values[PIECE] = np.inf
    values[-1] = -np.inf
    whole = stats_of([values])
    cuts = [0, 1, 11, PIECE - 3, PIECE + 4, 2 * PIECE + 4, values.size]
    assert stats_of(values[a:b] for a, b in zip(cuts, cuts[1:], strict=False)) == whole
    assert stats_of(values.reshape(-1, 1)[i : i + 1000] for i in range(0, values.size, 1000)) == whole
    finite = values[np.isfinite(values)].astype(np.float64)
    assert (whole["nan"], whole["inf"]) == (2, 2)
    assert math.isclose(whole["mean"], finite.mean(), rel_tol=1e-12)
    assert math.isclose(whole["std"], finite.std(), rel_tol=1e-12)
    assert (whole["min"], whole["max"]) == (finite.min(), finite.max())
    assert whole["abs_max"] == max(-finite.min(), finite.max())


def test_fields_are_current_after_each_update() -> None:
    stats = RunningStats()
    stats.update(np.array([1.0, 2.0, 3.0]))
    assert (stats.n, stats.mean, stats.m2) == (3, 2.0, 2.0)
    stats.update(np.array([np.nan, 4.0]))
    assert (stats.n, stats.mean, stats.nan, stats.max) == (4, 2.5, 1, 4.0)


def test_no_finite_values() -> None:
    assert stats_of([]) == {"mean": None, "std": None, "min": None, "max": None, "abs_max": None, "nan": 0, "inf": 0}
    assert stats_of([np.array([np.nan, np.inf], np.float32)])["mean"] is None
    assert stats_of([np.ones((3, 3), np.float32)])["std"] == 0.0
