"""Baseline `noise`: a checkpoint plus Gaussian noise of a chosen radius.

x = source + r * std(source) * N(0, 1), with r in units of the source's per-tensor std, so
that a distance from the source (novelty) means the same thing for every tensor and every
generator; a report sweeps r to compare generators at equal novelty. With K > 1 each sample
perturbs a zoo member chosen per sample (the same member for every tensor of the sample); a
joint stack scales each stacked tensor's noise by that tensor's own std.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleSpec,
    State,
    Streams,
    moments,
)


class NoiseConfig(GeneratorConfig):
    """How far from the source to go."""

    radius: float = Field(0.1, ge=0.0)  # noise std in units of the source tensor's std


class Noise(Generator):
    """Source + radius * std * N(0, 1)."""

    name = "noise"
    Config = NoiseConfig
    version = 2  # v1: one std per member over a whole joint stack

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        return k == 1 and self.config(config).radius == 0.0

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        flat = examples.flat()  # (K, numel)
        parts = max(len(examples.parts), 1)
        stds = np.array([[moments(p)[1] for p in row.reshape(parts, -1)] for row in flat], dtype=np.float64)
        return {"checkpoints": flat, "stds": stds}, {}  # (K, numel), (K, parts)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        assert isinstance(config, NoiseConfig)
        self._require_shape(state, spec)
        k = streams.member(state.arrays["checkpoints"].shape[0])
        source = state.arrays["checkpoints"][k, spec.region]
        sigma = streams.spread((config.radius * state.arrays["stds"][k]).astype(np.float32))
        return (source + sigma * streams.normal().reshape(-1)).reshape(spec.out_shape)
