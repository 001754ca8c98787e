"""Generators: fit on examples of a tensor, sample new values for it.

One module per method, listed in `registry.py`; the shared interface is in `base.py`.
"""

from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleResult,
    SampleSpec,
    State,
    state_from_bytes,
    state_to_bytes,
)
from weightsmith.generators.registry import BASELINES, GENERATORS, ZOO_BASELINES, get

__all__ = [
    "BASELINES",
    "GENERATORS",
    "ZOO_BASELINES",
    "Examples",
    "Generator",
    "GeneratorConfig",
    "SampleResult",
    "SampleSpec",
    "State",
    "get",
    "state_from_bytes",
    "state_to_bytes",
]
