"""Zoo baselines `average`: the mean of k distinct checkpoints chosen per sample, or of all.

Weight averaging (model soups, Wortsman et al. 2022) is the simplest way to make a new model
from a zoo; each sample averages a fresh subset of k of the K checkpoints, chosen per sample
(the same subset for every tensor of the sample). With k = "all" (or k = K) every sample is
the zoo's mean: deterministic, so a report scores it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams


class AverageConfig(GeneratorConfig):
    """How many checkpoints each sample averages."""

    k: Annotated[int, Field(ge=2)] | Literal["all"] = 2  # checkpoints per average (<= the zoo's K), or "all"


class Average(Generator):
    """Mean of k random distinct checkpoints."""

    name = "average"
    Config = AverageConfig
    min_checkpoints = 2

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        chosen = self.config(config).k
        return chosen == "all" or chosen >= k

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, AverageConfig)
        if config.k != "all" and config.k > examples.k:
            raise WeightsmithError(examples.name, f"average k={config.k} needs that many checkpoints, got {examples.k}")
        return {"checkpoints": examples.flat()}, {}  # (K, numel)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        assert isinstance(config, AverageConfig)
        self._require_shape(state, spec)
        source = state.arrays["checkpoints"]
        k = source.shape[0] if config.k == "all" else config.k
        chosen = np.sort(streams.choice().choice(source.shape[0], size=k, replace=False))
        mean = source[chosen, spec.region].mean(axis=0, dtype=np.float64)
        return mean.astype(np.float32).reshape(spec.out_shape)
