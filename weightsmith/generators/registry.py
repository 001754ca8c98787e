"""The generators by name: one line each, imported only when asked for.

Values are "module:Class" paths, so listing the names (CLI help, config validation) does not
import torch or diffusers for the diffusion generators.
"""

from __future__ import annotations

import importlib
import threading

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
    "zoo-diffusion": "weightsmith.generators.zoo_diffusion:ZooDiffusion",
    "tile-diffusion": "weightsmith.generators.tile_diffusion:TileDiffusion",
    "img2img": "weightsmith.generators.img2img:Img2Img",
    "task-arithmetic": "weightsmith.generators.task_arithmetic:TaskArithmetic",
    "ties": "weightsmith.generators.ties:Ties",
}

BASELINES = ("gaussian", "permute", "noise")  # in every report
ZOO_BASELINES = ("coord-gaussian", "pca-gaussian", "average")  # in reports with K >= 2 checkpoints
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
