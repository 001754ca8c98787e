"""Baseline `gaussian`: every value drawn i.i.d. from N(mean, std) of the examples' values.

The weakest sensible prediction: it keeps a tensor's first two moments and nothing else, so
any generator worth reporting must beat it. Pooled over all K checkpoints; the target may
have any shape.
"""

from __future__ import annotations

import numpy as np

from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleSpec,
    State,
    moments,
)


class GaussianConfig(GeneratorConfig):
    """No options: the mean and std are those of the examples."""


class Gaussian(Generator):
    """Per-tensor N(mean, std)."""

    name = "gaussian"
    Config = GaussianConfig

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        mean, std = moments(examples.values)
        return {"mean": np.float64(mean), "std": np.float64(std)}, {}

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal(spec.out_shape, dtype=np.float32)
        return np.float32(state.arrays["mean"]) + np.float32(state.arrays["std"]) * z
