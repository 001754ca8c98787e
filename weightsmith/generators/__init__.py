"""Generators: fit on examples of a tensor, sample new values for it.

One module per method, listed in `registry.py`; the shared interface is in `base.py`.
"""

from weightsmith.generators.base import (
    SAMPLING_VERSION,
    Examples,
    Generator,
    GeneratorConfig,
    SampleResult,
    SampleSpec,
    State,
    Streams,
    state_from_bytes,
    state_to_bytes,
)
from weightsmith.generators.registry import (
    BASELINES,
    GENERATORS,
    ORDERED_BASELINES,
    SWEEPS,
    ZOO_BASELINES,
    BaselineRun,
    get,
    zoo_baselines,
)

__all__ = [
    "BASELINES",
    "GENERATORS",
    "ORDERED_BASELINES",
    "SAMPLING_VERSION",
    "SWEEPS",
    "ZOO_BASELINES",
    "BaselineRun",
    "Examples",
    "Generator",
    "GeneratorConfig",
    "SampleResult",
    "SampleSpec",
    "State",
    "Streams",
    "get",
    "state_from_bytes",
    "state_to_bytes",
    "zoo_baselines",
]
