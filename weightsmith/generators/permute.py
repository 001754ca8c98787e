"""Baseline `permute`: a checkpoint's values in a random order.

Keeps the exact value distribution of a real tensor but none of its structure; with K > 1
each sample permutes a zoo member chosen per sample (the same member for every tensor of the
sample). The permutation is the tensor's own (keyed by its name), drawn whole, so a chunk is
exactly that run of the whole sample. A joint stack is permuted as one array.
"""

from __future__ import annotations

import numpy as np

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams


class PermuteConfig(GeneratorConfig):
    """No options."""


class Permute(Generator):
    """Entries of a (random) checkpoint, shuffled."""

    name = "permute"
    Config = PermuteConfig

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        return {"checkpoints": examples.flat()}, {}  # (K, numel)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        self._require_shape(state, spec)
        source = state.arrays["checkpoints"]
        values = source[streams.member(source.shape[0])]  # (numel,)
        order = streams.tensor(state.tensor).permutation(values.size)[spec.region]
        return values[order].reshape(spec.out_shape)
