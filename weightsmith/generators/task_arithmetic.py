"""Merge baseline `task-arithmetic`: base + scale * (sum of the chosen members' deltas).

Task arithmetic (Ilharco et al. 2023, "Editing Models with Task Arithmetic") adds the task
vectors delta_i = theta_i - theta_base of fine-tunes of one base model; mergekit's
`task_arithmetic` method computes the same sum (unnormalised weights = `scale`). With scale
1/k it is the average of the chosen members (a model soup). Each sample merges a random subset
of k of the zoo's K members, chosen by (seed, sample) alone, so every chunk of a sample merges
the same members. It needs a zoo with a base model (`weightsmith zoo build --base`).

Reports sweep the scale (1/k included) and k in {2, 4, all}: `SWEEP`.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleResult, SampleSpec, State

# The settings a report compares: k members per merge (None: all), scale (None: 1/k).
SWEEP = tuple({"k": k, "scale": s} for k in (2, 4, None) for s in (None, 0.5, 1.0))
_SUBSET_KEY = 0x5EB5E7  # spawn key of the subset streams, apart from `sample_seed`'s


class TaskArithmeticConfig(GeneratorConfig):
    """How many members a sample merges, and how strongly their deltas are added."""

    k: int | None = Field(None, ge=1)  # members per merge (at most the zoo's K); None: all
    scale: float | None = Field(None, gt=0)  # lambda; None: 1/k (the subset's average)


def check_base(name: str, examples: Examples) -> np.ndarray:
    """The examples' base as (numel,), or a one-line error naming what is missing."""
    if examples.base is None:
        raise WeightsmithError(examples.name, f"{name} merges deltas from a base: build the zoo with --base")
    return examples.base.reshape(-1)


def subset(k_total: int, k: int | None, seed: int, index: int) -> np.ndarray:
    """Sorted indices of the members that sample `index` merges, from (seed, index) alone."""
    if k is None or k >= k_total:
        return np.arange(k_total)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index], spawn_key=(_SUBSET_KEY,)))
    return np.sort(rng.choice(k_total, size=k, replace=False))


class MergeBaseline(Generator):
    """What the merge baselines share: fit keeps base and deltas, each sample merges a subset."""

    min_checkpoints = 2

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        base = check_base(self.name, examples)
        k = getattr(config, "k", None)
        if k is not None and k > examples.k:
            raise WeightsmithError(examples.name, f"{self.name} k={k} needs that many members, got {examples.k}")
        deltas = examples.flat() - base[None]  # (K, numel)
        return {"base": base, "deltas": deltas, **self._fit_extra(deltas, config)}, {}

    def _fit_extra(self, deltas: np.ndarray, config: GeneratorConfig) -> dict[str, np.ndarray]:
        return {}

    def _sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        self._require_shape(state, spec)
        config = self.Config.model_validate(state.config)
        deltas = state.arrays["deltas"]
        arrays = []
        for i in range(n):
            chosen = subset(deltas.shape[0], getattr(config, "k", None), seed, i)
            merged = self._merge(state, chosen, spec.region, config)  # (region,) float64
            arrays.append(merged.astype(np.float32).reshape(spec.out_shape))
        return SampleResult(arrays=arrays, devices=["cpu"] * n, seed=seed)

    def _merge(self, state: State, chosen: np.ndarray, region: slice, config: GeneratorConfig) -> np.ndarray:
        raise NotImplementedError


class TaskArithmetic(MergeBaseline):
    """base + scale * sum of k random members' deltas."""

    name = "task-arithmetic"
    Config = TaskArithmeticConfig

    def _merge(self, state: State, chosen: np.ndarray, region: slice, config: GeneratorConfig) -> np.ndarray:
        assert isinstance(config, TaskArithmeticConfig)
        scale = 1.0 / len(chosen) if config.scale is None else config.scale
        total = state.arrays["deltas"][chosen, region].sum(axis=0, dtype=np.float64)  # (region,)
        return state.arrays["base"][region] + scale * total
