"""Zoo baseline `average`: the mean of k distinct checkpoints chosen at random.

Weight averaging (model soups, Wortsman et al. 2022) is the simplest way to make a new model
from a zoo; each sample averages a fresh random subset of k of the K checkpoints.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State


class AverageConfig(GeneratorConfig):
    """How many checkpoints each sample averages."""

    k: int = Field(2, ge=2)  # checkpoints per average (at most the zoo's K)


class Average(Generator):
    """Mean of k random distinct checkpoints."""

    name = "average"
    Config = AverageConfig
    min_checkpoints = 2

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, AverageConfig)
        if config.k > examples.k:
            raise WeightsmithError(examples.name, f"average k={config.k} needs that many checkpoints, got {examples.k}")
        return {"checkpoints": examples.flat()}, {}  # (K, numel)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
        assert isinstance(config, AverageConfig)
        self._require_shape(state, spec)
        source = state.arrays["checkpoints"]
        chosen = np.sort(rng.choice(source.shape[0], size=config.k, replace=False))
        mean = source[chosen, spec.region].mean(axis=0, dtype=np.float64)
        return mean.astype(np.float32).reshape(spec.out_shape)
