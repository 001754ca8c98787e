"""Baseline `gaussian`: every value drawn i.i.d. from N(mean, std) of a real tensor's values.

The weakest sensible prediction: it keeps a tensor's first two moments and nothing else, so
any generator worth reporting must beat it. With K examples each sample takes the moments of
one member, chosen per sample (the member `noise` and `permute` start from in that sample), so
the baseline sees the same examples as the generators it is compared with. For one tensor the
target may have any shape; a joint stack keeps each stacked tensor's own moments.
"""

from __future__ import annotations

import numpy as np

from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleSpec,
    State,
    Streams,
    moments,
)


class GaussianConfig(GeneratorConfig):
    """No options: the mean and std are those of the examples."""


class Gaussian(Generator):
    """Per-tensor N(mean, std) of a member chosen per sample."""

    name = "gaussian"
    Config = GaussianConfig
    version = 2  # v1: one mean and std pooled over all K members

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        parts = max(len(examples.parts), 1)
        rows = examples.values.reshape(examples.k, parts, -1)  # (K, parts, values per part)
        stats = np.array([[moments(part) for part in member] for member in rows], dtype=np.float64)
        return {"mean": stats[..., 0], "std": stats[..., 1]}, {}  # (K, parts) each

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        mean, std = state.arrays["mean"], state.arrays["std"]  # (K, parts)
        if mean.shape[1] > 1:
            self._require_shape(state, spec)
        k = streams.member(mean.shape[0])
        z = streams.normal().reshape(-1)
        mu, sigma = (streams.spread(a[k].astype(np.float32)) for a in (mean, std))
        return (mu + sigma * z).reshape(spec.out_shape)
