"""Zoo baseline `coord-gaussian`: each coordinate drawn from N(mean_i, std_i) across checkpoints.

With K >= 2 checkpoints of a tensor, coordinate i gets the mean and the (unbiased, ddof=1)
std of its K values; coordinates are independent. It ignores every correlation, which
`pca-gaussian` keeps in part.
"""

from __future__ import annotations

import numpy as np

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams


class CoordGaussianConfig(GeneratorConfig):
    """No options."""


class CoordGaussian(Generator):
    """Per-coordinate N(mean, std) over a zoo."""

    name = "coord-gaussian"
    Config = CoordGaussianConfig
    min_checkpoints = 2

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        flat = examples.flat()  # (K, numel)
        mean = flat.mean(axis=0, dtype=np.float64)  # (numel,)
        std = flat.std(axis=0, ddof=1, dtype=np.float64)  # (numel,)
        return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}, {}

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        self._require_shape(state, spec)
        mean = state.arrays["mean"][spec.region]
        std = state.arrays["std"][spec.region]
        return (mean + std * streams.normal().reshape(-1)).reshape(spec.out_shape)
