"""Zoo baselines for ordered zoos: `latest` and `extrapolate`.

On a zoo whose zoo.json says `ordered` (checkpoints of one training run, first to last),
`latest` is the last checkpoint, the most optimised one, and `extrapolate` goes on along the
run: last + t * (last - first) (t = 0 is `latest`). They expose a cheap trick: a generator
that sees later checkpoints of a run that keeps improving gets credit for the extra
optimisation unless it beats these. Both are deterministic, so a report scores them once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from weightsmith.generators.base import Examples, Generator, GeneratorConfig, SampleSpec, State, Streams


class LatestConfig(GeneratorConfig):
    """No options."""


class Latest(Generator):
    """The last checkpoint of an ordered zoo."""

    name = "latest"
    Config = LatestConfig
    min_checkpoints = 2
    ordered = True

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        return True

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        return {"last": examples.flat()[-1].copy()}, {}  # (numel,)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        self._require_shape(state, spec)
        return state.arrays["last"][spec.region].reshape(spec.out_shape)


class ExtrapolateConfig(GeneratorConfig):
    """How far beyond the last checkpoint to go."""

    t: float = Field(0.3, ge=0.0)  # in units of the whole run's displacement (last - first)


class Extrapolate(Generator):
    """last + t * (last - first) of an ordered zoo."""

    name = "extrapolate"
    Config = ExtrapolateConfig
    min_checkpoints = 2
    ordered = True

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        return True

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, ExtrapolateConfig)
        flat = examples.flat()  # (K, numel)
        first, last = flat[0].astype(np.float64), flat[-1].astype(np.float64)
        return {"value": (last + config.t * (last - first)).astype(np.float32)}, {}  # (numel,)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        self._require_shape(state, spec)
        return state.arrays["value"][spec.region].reshape(spec.out_shape)
