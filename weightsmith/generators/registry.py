"""The generators by name: one line each, imported only when asked for.

Values are "module:Class" paths, so listing the names (CLI help, config validation) does not
import torch or diffusers for the diffusion generators.

Below them, the tables a report reads to pick its baselines: which apply to every group, to a
zoo, to an ordered zoo, the settings each is swept over, and `zoo_baselines`, which turns them
into runs for a zoo of K members, marking those that are deterministic (one sample).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import Generator

_IMPORT_LOCK = threading.Lock()

GENERATORS: dict[str, str] = {
    "gaussian": "weightsmith.generators.gaussian:Gaussian",
    "permute": "weightsmith.generators.permute:Permute",
    "noise": "weightsmith.generators.noise:Noise",
    "coord-gaussian": "weightsmith.generators.coord_gaussian:CoordGaussian",
    "pca-gaussian": "weightsmith.generators.pca_gaussian:PcaGaussian",
    "average": "weightsmith.generators.average:Average",
    "zoo-member": "weightsmith.generators.zoo_member:ZooMember",
    "latest": "weightsmith.generators.trajectory:Latest",
    "extrapolate": "weightsmith.generators.trajectory:Extrapolate",
    "zoo-diffusion": "weightsmith.generators.zoo_diffusion:ZooDiffusion",
    "tile-diffusion": "weightsmith.generators.tile_diffusion:TileDiffusion",
    "img2img": "weightsmith.generators.img2img:Img2Img",
    "task-arithmetic": "weightsmith.generators.task_arithmetic:TaskArithmetic",
    "ties": "weightsmith.generators.ties:Ties",
}

BASELINES = ("gaussian", "permute", "noise")  # in every report (fitted on the zoo when there is one)
ZOO_BASELINES = ("coord-gaussian", "pca-gaussian", "average", "zoo-member")  # in reports with K >= 2 checkpoints
ORDERED_BASELINES = ("latest", "extrapolate")  # in reports whose zoo.json says `ordered: true`
# Settings a report runs, one label each (noise radii are the pipeline's: they follow the
# candidates' novelty). Baselines not listed run once with their defaults.
SWEEPS: dict[str, tuple[dict, ...]] = {
    "pca-gaussian": ({"scale": 0.5}, {"scale": 1.0}, {"scale": 2.0}),
    "average": ({"k": 2}, {"k": 4}, {"k": "all"}),
    "extrapolate": ({"t": 0.1}, {"t": 0.3}, {"t": 1.0}),
}
MERGE_BASELINES = ("task-arithmetic", "ties")  # for zoos with a base model (settings: each module's SWEEP)


def get(name: str) -> type[Generator]:
    """The generator class registered as `name`; instantiate it with the device to use."""
    if name not in GENERATORS:
        raise WeightsmithError(f"generator {name!r}", f"unknown (choose from {', '.join(GENERATORS)})")
    module, cls = GENERATORS[name].split(":")
    # diffusers/transformers import lazily and are not safe to import from two threads at once
    # (flows run tasks in threads): "cannot import name 'DDIMScheduler'" was seen here.
    with _IMPORT_LOCK:
        generator = getattr(importlib.import_module(module), cls)
    assert generator.name == name, (name, generator.name)
    return generator


@dataclass(frozen=True)
class BaselineRun:
    """One baseline label of a report (named by `weightsmith.vet.baseline_label`)."""

    generator: str  # registry name
    config: dict  # its options
    deterministic: bool  # every sample is the same: score one


def deterministic(generator: str, config: Mapping[str, Any] | None, k: int) -> bool:
    """True when every sample of `generator` fitted on k examples with `config` is the same."""
    return get(generator)().deterministic(config, k)


def zoo_baselines(k: int, ordered: bool) -> list[BaselineRun]:
    """The zoo baselines of a group whose zoo has k members (ordered: zoo.json says so).

    Each of ZOO_BASELINES (and, for an ordered zoo, ORDERED_BASELINES) with each of its SWEEPS
    settings that fits k members: an average of k' >= k members is the zoo's mean, run once
    as k="all". None for k < 2.
    """
    if k < 2:
        return []
    runs = []
    for name in ZOO_BASELINES + (ORDERED_BASELINES if ordered else ()):
        for config in SWEEPS.get(name, ({},)):
            if name == "average" and config["k"] != "all" and config["k"] >= k:
                continue
            runs.append(BaselineRun(name, dict(config), deterministic(name, config, k)))
    return runs


def merge_baselines(k: int) -> list[BaselineRun]:
    """The merges of a zoo of k members with a base model: each MERGE_BASELINES module's SWEEP,
    without subsets as large as the zoo (k=None, all members, covers them)."""
    runs = []
    for name in MERGE_BASELINES:
        module = importlib.import_module(GENERATORS[name].split(":")[0])
        for config in module.SWEEP:
            if config.get("k") is not None and config["k"] >= k:
                continue
            config = {key: v for key, v in config.items() if v is not None}
            runs.append(BaselineRun(name, config, deterministic(name, config, k)))
    return runs
