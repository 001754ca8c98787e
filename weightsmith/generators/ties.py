"""Merge baseline `ties`: trim, elect sign, disjoint merge (Yadav et al. 2023, "TIES-Merging").

For the chosen members' deltas delta_i = theta_i - theta_base of one tensor:
1. Trim: keep each delta's `density` fraction of largest magnitudes (top max(1, int(density *
   numel)) entries, as mergekit's `magnitude` sparsification), zero the rest. The threshold is taken
   over the whole tensor at fit time, so chunks of a sample agree.
2. Elect: the sign of each entry is the sign of the trimmed deltas' sum (mergekit's "sum"
   method: the sign with the larger total mass; + where the sum is 0).
3. Disjoint merge: average the trimmed entries whose sign agrees with the elected one (entries
   where none agree stay 0), then theta = base + scale * merged.
Each sample merges a random subset of k members chosen by (seed, sample), as `task-arithmetic`.

Reports use density in {0.2, 0.5} at scale 1 and k in {2, 4, all}: `SWEEP`.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from weightsmith.generators.base import GeneratorConfig, State
from weightsmith.generators.task_arithmetic import MergeBaseline

SWEEP = tuple({"k": k, "density": d} for k in (2, 4, None) for d in (0.2, 0.5))


class TiesConfig(GeneratorConfig):
    """The fraction of each delta kept, the members per merge and the merged delta's scale."""

    density: float = Field(0.2, gt=0, le=1)  # fraction of each delta's entries kept (largest |delta|)
    k: int | None = Field(None, ge=1)  # members per merge (at most the zoo's K); None: all
    scale: float = Field(1.0, gt=0)  # lambda applied to the merged delta


class Ties(MergeBaseline):
    """TIES-Merging of k random members."""

    name = "ties"
    Config = TiesConfig

    def _fit_extra(self, deltas: np.ndarray, config: GeneratorConfig) -> dict[str, np.ndarray]:
        assert isinstance(config, TiesConfig)
        numel = deltas.shape[1]
        keep = max(1, int(config.density * numel))  # entries kept per member (at least one, as mergekit)
        # the keep-th largest |delta| of each member: entries at or above it are kept
        magnitude = np.abs(deltas)
        threshold = -np.partition(-magnitude, keep - 1, axis=1)[:, keep - 1]  # (K,)
        return {"threshold": threshold.astype(np.float32)}

    def _merge(self, state: State, chosen: np.ndarray, region: slice, config: GeneratorConfig) -> np.ndarray:
        assert isinstance(config, TiesConfig)
        deltas = state.arrays["deltas"][chosen, region].astype(np.float64)  # (k, region)
        # 1. trim
        kept = np.abs(deltas) >= state.arrays["threshold"][chosen, None]
        trimmed = np.where(kept, deltas, 0.0)
        # 2. elect the sign with the larger total mass (+ on a tie, as mergekit)
        sign = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)  # (region,)
        # 3. average the kept entries that agree with it (a trimmed entry has sign 0: never agrees)
        agree = np.sign(trimmed) == sign[None]
        count = agree.sum(axis=0)
        merged = np.where(agree, trimmed, 0.0).sum(axis=0) / np.maximum(count, 1)
        return state.arrays["base"][region] + config.scale * merged
