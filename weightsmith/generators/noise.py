"""Baseline `noise`: a checkpoint plus Gaussian noise of a chosen radius.

x = source + r * std(source) * N(0, 1), with r in units of the source's per-tensor std, so
that a distance from the source (novelty) means the same thing for every tensor and every
generator; a report sweeps r to compare generators at equal novelty. With K > 1 each sample
perturbs a randomly chosen checkpoint.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleSpec,
    State,
    moments,
)


class NoiseConfig(GeneratorConfig):
    """How far from the source to go."""

    radius: float = Field(0.1, ge=0.0)  # noise std in units of the source tensor's std


class Noise(Generator):
    """Source + radius * std * N(0, 1)."""

    name = "noise"
    Config = NoiseConfig

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        flat = examples.flat()  # (K, numel)
        stds = np.array([moments(row)[1] for row in flat], dtype=np.float64)  # (K,)
        return {"checkpoints": flat, "stds": stds}, {}

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
        assert isinstance(config, NoiseConfig)
        self._require_shape(state, spec)
        k = rng.integers(state.arrays["checkpoints"].shape[0])
        source = state.arrays["checkpoints"][k, spec.region]
        z = rng.standard_normal(source.shape, dtype=np.float32)
        sigma = np.float32(config.radius * state.arrays["stds"][k])
        return (source + sigma * z).reshape(spec.out_shape)
