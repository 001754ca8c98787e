"""Generator `img2img`: a pretrained diffusers image-to-image pipeline redraws a tensor's tiles.

Nothing is learned: `fit` keeps the tensor (the first checkpoint) and checks that `model_dir`
holds a saved pipeline. `sample` does, per sample:

1. encode: the codec's robust normalisation, cut into image_size x image_size tiles;
2. map each tile onto 3-channel pixels, [-4, 4] normalised -> [-1, 1] (`PIXELS`), unclipped;
3. run `StableDiffusionImg2ImgPipeline` on batches of tiles: noise to `strength`, then
   int(steps * strength) denoising steps, each tile with its own torch generator;
4. decode the latents with the pipeline's VAE and map the pixels back to tensor values with
   the codec (`from_image`, `decode`).

Float32 end to end, with no 8-bit images and no clipping. The pipeline's default image
processor (diffusers 0.42) would spoil this twice, so two of its steps are bypassed:
- input: it expects tensors in [0, 1] and maps them to [-1, 1], unless the batch has a value
  below 0, which makes it take the whole batch for [-1, 1] pixels, so the mapping would depend
  on the data. A `VaeImageProcessor(do_normalize=False, do_resize=False)` passes our [-1, 1]
  pixels on as they are, values beyond +-1 included.
- output: "pt" and "np" clamp the decoded pixels to [0, 1]. The pipeline returns latents
  instead, and `vae.decode` (the pipeline's own last step, without the clamp) gives pixels.

The pipeline is only ever loaded from the local folder (`local_files_only=True`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from diffusers.image_processor import VaeImageProcessor
from pydantic import Field, model_validator

from weightsmith.codec import (
    PixelMap,
    TileLayout,
    decode,
    encode,
    fit_normalizer,
    from_image,
    to_image,
)
from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleResult,
    SampleSpec,
    State,
    sample_seed,
)

PIXELS = PixelMap(limit=4.0, low=-1.0, high=1.0)  # +-4 robust std -> the VAE's [-1, 1] pixels
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class Img2ImgConfig(GeneratorConfig):
    """Which pipeline, and how strongly it redraws the tiles."""

    model_dir: str  # folder of a saved diffusers SD pipeline (model_index.json); never downloaded
    strength: float = Field(0.3, gt=0, le=1)  # noise level to start from: near 0 keeps, 1 redraws
    steps: int = Field(10, ge=1)  # num_inference_steps; int(steps * strength) of them are run
    guidance_scale: float = Field(1.0, ge=1)  # classifier-free guidance; 1 = off (one UNet pass)
    prompt: str = ""  # text every tile is conditioned on
    image_size: int = Field(512, ge=8, multiple_of=8)  # tile edge in pixels (SD's VAE: 8 | edge)
    dtype: Literal["float32", "float16"] = "float32"  # weights and activations; float16 needs CUDA
    batch_size: int = Field(8, ge=1)  # tiles per pipeline call

    @model_validator(mode="after")
    def _one_step_at_least(self) -> Img2ImgConfig:
        # diffusers runs int(steps * strength) steps and fails on zero
        if int(self.steps * self.strength) < 1:
            raise ValueError(
                f"steps * strength = {self.steps} * {self.strength} is below one denoising "
                "step; raise steps or strength"
            )
        return self


class Img2Img(Generator):
    """A local diffusers img2img pipeline redraws the tensor's tiles at a given strength."""

    name = "img2img"
    Config = Img2ImgConfig

    def __init__(self, device: str = "cpu"):
        super().__init__(device)
        # loaded pipelines by (model_dir, dtype, device): loading SD 1.5 takes seconds
        self._pipelines: dict[tuple[str, str, str], StableDiffusionImg2ImgPipeline] = {}

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, Img2ImgConfig)
        _check_model_dir(config.model_dir)
        source = examples.values[0]  # the first checkpoint; a zoo's others are not used
        layout = TileLayout(
            shape=examples.shape,
            dtype=str(source.dtype),
            tile=config.image_size,
            params=fit_normalizer(source),
        )
        return {"source": source}, {"layout": layout.to_dict(), "checkpoint": 0}

    def _sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        config = self.Config.model_validate(state.config)
        assert isinstance(config, Img2ImgConfig)
        self._require_shape(state, spec)
        encoded = encode(state.arrays["source"], config.image_size)
        todo = _covering_tiles(encoded.layout, spec)  # only the tiles the request reads
        arrays, devices = [], []
        for i in range(n):
            base = sample_seed(seed, i, state.tensor)  # the tensor's own; tiles seeded from it
            tiles = encoded.tiles.copy()  # (n_tiles, t, t); tiles outside `todo` are not read
            used: set[str] = set()
            for start in range(0, todo.size, config.batch_size):
                batch = todo[start : start + config.batch_size]
                images = to_image(encoded.tiles[batch], PIXELS)  # (b, 3, t, t) float32
                seeds = [_tile_seed(base, int(j)) for j in batch]
                pixels, device = self._redraw(config, images, seeds)
                tiles[batch] = from_image(pixels, PIXELS)
                used.add(device)
            values = decode(encoded.layout, tiles).reshape(-1)[spec.region]
            arrays.append(values.reshape(spec.out_shape))
            devices.append("+".join(sorted(used)))  # "cuda:0+cpu" if a batch fell back
        return SampleResult(arrays=arrays, devices=devices, seed=seed)

    def _redraw(self, config: Img2ImgConfig, images: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, str]:
        """A batch through the pipeline on `self.device`; on CUDA out of memory, on the CPU."""
        pipe = self._pipeline(config.model_dir, config.dtype, self.device)
        try:
            return _denoise(pipe, config, images, seeds), str(pipe.device)
        except torch.cuda.OutOfMemoryError:
            if pipe.device.type != "cuda":
                raise
        torch.cuda.empty_cache()
        warnings.warn(
            f"{config.model_dir}: CUDA out of memory on {len(seeds)} tiles of "
            f"{config.image_size} px; redoing the batch on the CPU (float32)",
            RuntimeWarning,
            stacklevel=4,  # the caller of Generator.sample
        )
        cpu = self._pipeline(config.model_dir, "float32", "cpu")
        return _denoise(cpu, config, images, seeds), "cpu"

    def _pipeline(self, model_dir: str, dtype: str, device: str) -> StableDiffusionImg2ImgPipeline:
        """The pipeline in `model_dir`, loaded once per (dtype, device), on `device`."""
        key = (model_dir, dtype, device)
        if key not in self._pipelines:
            if dtype == "float16" and torch.device(device).type == "cpu":
                raise WeightsmithError(f"{self.name} dtype", "float16 needs a CUDA device; use float32 on the CPU")
            _check_model_dir(model_dir)
            try:
                pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                    model_dir,
                    local_files_only=True,
                    safety_checker=None,
                    requires_safety_checker=False,
                    dtype=_DTYPES[dtype],
                )
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WeightsmithError(model_dir, f"cannot load the pipeline: {first}") from None
            # [-1, 1] pixels go in as they are: no [0, 1] -> [-1, 1] step, no resize
            pipe.image_processor = VaeImageProcessor(
                vae_scale_factor=pipe.vae_scale_factor, do_normalize=False, do_resize=False
            )
            pipe.set_progress_bar_config(disable=True)
            self._pipelines[key] = pipe.to(device)
        return self._pipelines[key]


def _check_model_dir(model_dir: str) -> None:
    if not (Path(model_dir) / "model_index.json").is_file():
        raise WeightsmithError(
            model_dir,
            "no diffusers pipeline here (model_index.json missing); img2img never downloads",
        )


def _covering_tiles(layout: TileLayout, spec: SampleSpec) -> np.ndarray:
    """Indices of the tiles that hold the elements of `spec.region`, in tile order."""
    gr, gc = layout.grid
    if spec.chunk is None:
        return np.arange(gr * gc)
    _, cols = layout.shape2d
    t = layout.tile
    r0, c0 = divmod(spec.chunk.offset, cols)  # first element in the 2-D view
    r1, c1 = divmod(spec.chunk.stop - 1, cols)  # last element
    if r0 == r1:  # within one row (always for 1-D tensors): the tiles across its columns
        return (r0 // t) * gc + np.arange(c0 // t, c1 // t + 1)
    return np.arange((r0 // t) * gc, (r1 // t + 1) * gc)  # whole rows of tiles


def _tile_seed(base: int, tile: int) -> int:
    """Seed of one tile of a sample: the same whatever batch the tile is run in."""
    return int(np.random.SeedSequence([base, tile]).generate_state(1, np.uint64)[0])


@torch.inference_mode()
def _denoise(
    pipe: StableDiffusionImg2ImgPipeline,
    config: Img2ImgConfig,
    images: np.ndarray,
    seeds: list[int],
) -> np.ndarray:
    """(b, 3, t, t) [-1, 1] pixels -> the pipeline's (b, 3, t, t) float32 pixels, unclamped."""
    device = pipe.device
    latents = pipe(
        prompt=[config.prompt] * len(seeds),
        image=torch.from_numpy(images),
        strength=config.strength,
        num_inference_steps=config.steps,
        guidance_scale=config.guidance_scale,
        # one generator per tile: its VAE posterior sample and noise do not depend on the batch
        generator=[torch.Generator(device).manual_seed(s) for s in seeds],
        output_type="latent",  # "pt"/"np" would clamp the decoded pixels to [0, 1]
    ).images  # (b, 4, t/8, t/8)
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pixels.float().cpu().numpy()
