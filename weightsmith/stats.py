"""Streaming tensor statistics: mean/std (Chan et al. parallel update), min/max, NaN/Inf counts."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


PIECE = 1 << 20


@dataclass
class RunningStats:
    """Statistics of finite values, updated one block at a time in float64."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    min: float = math.inf
    max: float = -math.inf
    nan: int = 0
    inf: int = 0

    def update(self, block: np.ndarray) -> None:
        flat = np.asarray(block).ravel()
        # float64 copies of at most PIECE values at a time: memory stays small for big blocks
        for start in range(0, max(1, flat.size), PIECE):
            self._update(flat[start : start + PIECE])

    def _update(self, piece: np.ndarray) -> None:
        x = piece.astype(np.float64)
        finite = np.isfinite(x)
        if not finite.all():
            self.nan += int(np.isnan(x).sum())
            self.inf += int(np.isinf(x).sum())
            x = x[finite]
        if x.size == 0:
            return
        # Chan, Golub & LeVeque (1979): merge (n, mean, M2) of two sets.
        n_b = x.size
        mean_b = float(x.mean())
        m2_b = float(((x - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.n * n_b / total
        self.n = total
        self.min = min(self.min, float(x.min()))
        self.max = max(self.max, float(x.max()))

    def as_dict(self) -> dict:
        empty = self.n == 0
        return {
            "mean": None if empty else self.mean,
            "std": None if empty else math.sqrt(self.m2 / self.n),
            "min": None if empty else self.min,
            "max": None if empty else self.max,
            "abs_max": None if empty else max(abs(self.min), abs(self.max)),
            "nan": self.nan,
            "inf": self.inf,
        }
