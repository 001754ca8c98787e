"""Zoo baseline `zoo-member`: a copy of a zoo member chosen per sample.

It exposes memorising: a generator that only reproduces its examples scores like this, at
novelty zero. The member is chosen per sample (`Streams.member`), the same for every tensor of
the sample, so a group's sample is one whole checkpoint, as a candidate would have to be. With
`pick="in-order"` sample i is member i (mod K): the pipeline scores a reference zoo (real models
kept out of the zoo) this way.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams


class ZooMemberConfig(GeneratorConfig):
    """Which member each sample copies."""

    # random: chosen per sample; in-order: sample i copies member i mod K (a reference set scored whole)
    pick: Literal["random", "in-order"] = "random"


class ZooMember(Generator):
    """A copy of a member chosen per sample."""

    name = "zoo-member"
    Config = ZooMemberConfig
    min_checkpoints = 2

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        return {"checkpoints": examples.flat()}, {}  # (K, numel)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        self._require_shape(state, spec)
        source = state.arrays["checkpoints"]
        assert isinstance(config, ZooMemberConfig)
        k = source.shape[0]
        member = streams.index % k if config.pick == "in-order" else streams.member(k)
        return source[member, spec.region].reshape(spec.out_shape)
