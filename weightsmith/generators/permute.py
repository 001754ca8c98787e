"""Baseline `permute`: a checkpoint's values in a random order.

Keeps the exact value distribution of a real tensor but none of its structure; with K > 1
each sample permutes a randomly chosen checkpoint. With a chunk, the run is filled with
values drawn without replacement from the whole checkpoint (the same law as that run of a
full permutation).
"""

from __future__ import annotations

import numpy as np

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State


class PermuteConfig(GeneratorConfig):
    """No options."""


class Permute(Generator):
    """Entries of a (random) checkpoint, shuffled."""

    name = "permute"
    Config = PermuteConfig

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        return {"checkpoints": examples.flat()}, {}  # (K, numel)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, rng: np.random.Generator) -> np.ndarray:
        self._require_shape(state, spec)
        source = state.arrays["checkpoints"]
        values = source[rng.integers(source.shape[0])]  # (numel,)
        taken = rng.choice(values.size, size=spec.region.stop - spec.region.start, replace=False)
        return values[taken].reshape(spec.out_shape)
