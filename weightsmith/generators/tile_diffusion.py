"""Generator `tile-diffusion`: a small latent diffusion model of one tensor's tiles.

The tensor's 2-D view is cut into square tiles by the codec (`weightsmith.codec.encode`:
robustly normalised float32, no quantising), and a diffusion model learns p(tile | where the
tile is) from the K examples:

1. A small conv autoencoder maps a t x t tile to a (c, t/d, t/d) latent. It is trained
   first, with noise added to the latents so that the decoder tolerates the diffusion
   model's errors, and its latents are rescaled to unit second moment (Rombach et al. 2022,
   sec. 4.3.2). What it cannot reconstruct is kept as a per-pixel residual std and added
   back as Gaussian noise when sampling.
2. A small `UNet2DModel` is trained as a DDPM (Ho et al. 2020): `DDPMScheduler.add_noise`
   and an MSE on the predicted noise (epsilon; v-prediction is an option).
3. Sampling runs a few DDIM steps (Song et al. 2021, eta = 0) from seeded Gaussian noise,
   decodes the latents to tiles and the tiles to the tensor (`weightsmith.codec.decode`).
   Each tile's noise is its own run of the tensor's stream (`_tile_noise`), so a chunk is the
   same run of the whole sample and two tensors fitted apart never share noise.

Conditioning on position: two extra input channels hold each (latent) pixel's normalised
row and column in the padded 2-D view ("CoordConv", Liu et al. 2018). Unlike one label per
tile (`class_labels`), the coordinates tell the UNet where every pixel is, so it can learn
row- and column-wise structure, and training can use crops at any offset (far more distinct
examples than the tile grid, which is all that sampling uses).

A stack of tensors (`Examples.parts`: a joint fit's (n, *shape), or a role pack of n vectors)
is fitted as one 2-D view, but each part is first normalised on its own (`normalise_parts`,
`codec.fit_normalizer` over its K examples) and put back on its scale after sampling. With one
normaliser for the stack, a LayerNorm weight (values near 1, spread 0.01) stacked with biases
(near 0) kept its whole variation within a small fraction of the normalised range: on the
demo's block its samples were 10 of its own stds from the nearest example, against 1.4 with
each part on its own scale (3 fits of 8 samples each; the other parts barely moved).

Training uses random t x t crops of the examples' padded, normalised 2-D views; a chunk
(`SampleSpec.chunk`) is drawn by generating only the tiles that cover it. With
`use_latent=False` the UNet diffuses the tiles' pixels directly (slower, no autoencoder).

Budget (`weightsmith.generators.budget`): each network trains for at most
crop_passes x distinct crops / batch_size steps (every offset of every example is a distinct
crop), between `*_min_steps` and the cap `ae_train_steps` / `unet_train_steps`; the cosine
learning rate decays over that budget. Every `eval_every` steps the loss on a validation batch
drawn once (`val_batch` crops with their latent noise, or timesteps and noise) is checked, and
a network stops at a plateau, keeping its best weights; `info["ae_fit"]` / `info["unet_fit"]`
record the steps taken and why it stopped. The previous fixed 200 + 400 steps are
`{"early_stop": False, "ae_min_steps": 200, "unet_min_steps": 400}`. Measured on this 2-core
machine, a fit costs about the same per step whatever the tensor's size (59 ms per step for a
stack of two 64-value vectors, 63 ms for two 64 x 256 matrices, one thread), so a LayerNorm at
the floor (40 + 40 steps) fits in about an eighth of the old fixed budget's time. The floor was
80 + 80 until the whole-model bench showed 10 of the tiny model's 16 fits at it: at 40 + 40,
`bench/quality.py` gave the same paired differences as at 80 (NLL +0.3 SE, novelty +6.1 SE,
+0.01395 against +0.01393) and the floor-bound vectors' own novelty moved within its noise.

The trade-off, measured (`bench/quality.py`, `bench/RESULTS.md`): on the demo's block with 3 fit
seeds, these defaults keep NLL (+0.4 paired SE against the previous budget) but raise weight
novelty by 6 paired SE (+0.014 on 1.40). Nearly all of it is in the two 128 x 512 matrices,
whose diffusion models stop at a validation plateau after about a third of their 400 steps;
the diffusion loss levels off while the samples still move towards the examples. Before
`normalise_parts` the same comparison gave 11 SE, most of it from the stacked LayerNorm weight.

Other settings, each against the same previous fits (3 seeds, 8 samples each; one run each,
`bench/RESULTS.md`): `patience=10` halves the gap (+0.0071, 7.0 SE) for 1533 diffusion steps
where the defaults take 1163 (of 2793 planned); a moving average of the weights (decay 0.99,
validated and kept) left it where it was (+0.0137) and was not kept; `lr` 0.002 gave +0.0094
and 0.004 +0.0185 (neither meets it, so the default stays); a cap of 200 diffusion steps, so
that the schedule anneals fully, made it worse (+0.0227; +0.0182 without early stopping).
`early_stop=False` trains the matrices exactly as before and leaves +0.0004 (8.8 SE of a
paired SE of 0.00004), all of it from the vectors at the floor, which stay 0.03-0.12 of their
stds further from the examples; with the floors at 200 + 400 as well, all 24 samples score
exactly as the previous ones. Novelty fell as the matrices trained longer, so no setting tried
meets "within 2 SE" short of the previous budget. Later runs: 4x the validation crops
(`val_batch` 256) stopped about where the defaults do and left +0.0139; `min_delta` 0 left
+0.0003 (2.03 SE) only because the loss then improves a little at almost every check, so the
networks ran within 40 of their 2793 planned diffusion steps (early stopping off, in effect).
`early_stop=False` keeps the matrices' samples as they were at about 1.6x the defaults' fit
time on this block; on the whole tiny model (`bench/predict.py --whole-model`, two runs
minutes apart) it fitted in 70 s against the defaults' 52 s: 9.4x and 12.6x faster than the
previous defaults (10x is the target).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from pydantic import Field, model_validator

from weightsmith.codec import Chunk, Normalizer, TileLayout, decode, encode, fit_normalizer
from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleResult,
    SampleSpec,
    State,
    device_name,
    standard_normal,
)
from weightsmith.generators.budget import FitRecord, Plateau, budget, finish

_COORDS = 2  # extra UNet input channels: normalised row and column of each pixel
_RESIDUAL_TILES = 4096  # the residual std is measured on at most this many grid tiles
_BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]  # diffusers beta schedules


class TileDiffusionConfig(GeneratorConfig):
    """Tiles, the two networks, their training and the sampler."""

    tile: int = Field(32, ge=4)  # tile side in elements of the tensor's 2-D view
    use_latent: bool = True  # diffuse the autoencoder's latents (False: the tiles' pixels)
    latent_channels: int = Field(4, ge=1)  # channels c of a (c, tile/d, tile/d) latent
    downsample: int = Field(4, ge=2)  # d, a power of two: latent side = tile / d
    ae_channels: int = Field(64, ge=4)  # width of the autoencoder's conv layers
    ae_train_steps: int = Field(200, ge=1)  # most optimiser steps of the autoencoder (its budget's cap)
    ae_min_steps: int = Field(40, ge=1)  # floor of the autoencoder's budget
    ae_noise: float = Field(0.1, ge=0.0)  # latent noise while training the decoder, in latent std
    residual_noise: bool = True  # add the autoencoder's per-pixel residual std back as noise
    block_out_channels: tuple[int, ...] = (32, 64)  # UNet widths, one per resolution
    layers_per_block: int = Field(1, ge=1)  # resnets per UNet down block
    norm_groups: int = Field(8, ge=1)  # GroupNorm groups; must divide every UNet width
    unet_train_steps: int = Field(400, ge=1)  # most optimiser steps of the diffusion model (its budget's cap)
    unet_min_steps: int = Field(40, ge=1)  # floor of the diffusion model's budget
    crop_passes: float = Field(2.0, gt=0.0)  # budget: each distinct crop seen this often, on average
    batch_size: int = Field(64, ge=1)  # crops per training step
    lr: float = Field(1e-3, gt=0.0)  # AdamW learning rate of both networks (cosine decay over the budget)
    early_stop: bool = True  # stop a network when its validation loss plateaus (False: run the budget)
    val_batch: int = Field(64, ge=1)  # crops (with their noise and timesteps) drawn once for validation
    eval_every: int = Field(10, ge=1)  # optimiser steps between validation checks
    patience: int = Field(4, ge=1)  # checks in a row without improvement that mean "plateau"
    min_delta: float = Field(0.01, ge=0.0)  # relative improvement of the best validation loss that counts
    num_train_timesteps: int = Field(1000, ge=2)  # DDPM noise levels
    beta_schedule: _BetaSchedule = "squaredcos_cap_v2"  # DDPM betas (cosine: Nichol, Dhariwal 2021)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the UNet predicts
    sample_steps: int = Field(8, ge=1)  # DDIM steps per sample
    sample_batch: int = Field(1024, ge=1)  # tiles per denoising batch (and per noise draw)
    seed: int = Field(0, ge=0)  # seed of the fit: initial weights, crops and training noise
    normalise_parts: bool = True  # a stack of tensors (K, n, ...): each part on its own scale first

    @model_validator(mode="after")
    def _check_sizes(self) -> TileDiffusionConfig:
        d = self.downsample
        if self.use_latent and (d & (d - 1) or self.tile % d):
            raise ValueError(f"downsample {d} must be a power of two that divides tile {self.tile}")
        side, levels = self.side, len(self.block_out_channels) - 1
        if not self.block_out_channels or side % 2**levels:
            raise ValueError(
                f"the UNet halves its {side}-pixel input {levels} times; use fewer block_out_channels or a larger tile"
            )
        if any(w % self.norm_groups for w in self.block_out_channels):
            raise ValueError(f"norm_groups {self.norm_groups} must divide {self.block_out_channels}")
        if self.num_train_timesteps < self.sample_steps:
            raise ValueError("sample_steps may not exceed num_train_timesteps")
        return self

    @property
    def side(self) -> int:
        """Side of what the UNet denoises: the latent, or the tile itself."""
        return self.tile // self.downsample if self.use_latent else self.tile

    @property
    def step(self) -> int:
        """Tensor elements per UNet pixel along each axis."""
        return self.downsample if self.use_latent else 1

    @property
    def channels(self) -> int:
        return self.latent_channels if self.use_latent else 1


class TileDiffusion(Generator):
    """Latent DDPM/DDIM on position-conditioned tiles of one tensor."""

    name = "tile-diffusion"
    Config = TileDiffusionConfig
    version = 3  # 2: data-sized budgets and early stopping; 3: the parts of a stack normalised apart
    packs_roles = True  # predict fits small tensors of one role together (weightsmith.predict)

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, TileDiffusionConfig)
        cfg, dev = config, torch.device(self.device)
        info: dict = {}
        values = examples.values
        if cfg.normalise_parts and examples.parts:
            # 0. a stack of tensors (K, n, ...): each part on its own scale first (see the module doc)
            norms = [fit_normalizer(values[:, j]) for j in range(values.shape[1])]
            values = np.stack([z.apply(values[:, j]) for j, z in enumerate(norms)], axis=1)
            info["part_normalizers"] = [z.to_dict() for z in norms]
        # 1. every checkpoint as a padded, normalised 2-D image; samples are decoded with the
        #    mean of the checkpoints' normalisers (their typical center and scale)
        encoded = [encode(x, cfg.tile) for x in values]
        layout = replace(
            encoded[0].layout,
            params=Normalizer(
                center=float(np.mean([e.params.center for e in encoded])),
                scale=float(np.mean([e.params.scale for e in encoded])),
                method=encoded[0].params.method,
            ),
        )
        images = torch.from_numpy(np.stack([_untile(layout, e.tiles) for e in encoded])).to(dev)
        mask = torch.from_numpy(_untile(layout, encoded[0].mask.astype(np.float32))).to(dev)
        crops = _Crops(images, mask, cfg)
        # the budget: steps grow with the distinct crops (every offset of every example)
        (h, w), t = crops.extent, cfg.tile
        distinct = len(encoded) * (h - t + 1) * (w - t + 1)
        per_crop = cfg.crop_passes / cfg.batch_size
        budgets = {
            "ae": budget(distinct, per_crop, cfg.ae_min_steps, cfg.ae_train_steps),
            "unet": budget(distinct, per_crop, cfg.unet_min_steps, cfg.unet_train_steps),
        }
        # the validation batch: crops, latent noise, timesteps and noise drawn once, from their
        # own streams (the training streams are those of a fit without validation)
        val_rng = torch.Generator(dev).manual_seed(cfg.seed + 1)
        val = crops.batch(cfg.val_batch, np.random.default_rng([cfg.seed, 1]))

        with torch.random.fork_rng(devices=[]):  # seeded initial weights, global RNG untouched
            torch.manual_seed(cfg.seed)
            ae = _Autoencoder(cfg).to(dev) if cfg.use_latent else None
            unet = _unet(cfg).to(dev)
        noise = torch.Generator(dev).manual_seed(cfg.seed)
        info |= {"layout": layout.to_dict(), "distinct_crops": distinct}
        arrays: dict[str, np.ndarray] = {}

        # 2. the autoencoder, then its latent scale and residual
        if ae is not None:
            fit = _train_autoencoder(ae, crops, val, val_rng, noise, cfg, budgets["ae"])
            info["ae_loss"], info["ae_fit"] = fit.train_loss, fit.to_dict()
            ae.eval()
            with torch.no_grad():
                z = torch.cat([ae.encoder(crops.batch()[0]) for _ in range(8)])
                info["latent_scale"] = float(1.0 / z.square().mean().sqrt().clamp_min(1e-12))
            residual = _residual_std(ae, encoded, dev) if cfg.residual_noise else None
            arrays |= _to_arrays("ae.", ae)
            if residual is not None:
                arrays["residual_std"] = residual

        # 3. the diffusion model on (scaled) latents or pixels
        fit = _train_unet(unet, ae, info.get("latent_scale", 1.0), crops, val, val_rng, noise, cfg, budgets["unet"])
        info["unet_loss"], info["unet_fit"] = fit.train_loss, fit.to_dict()
        arrays |= _to_arrays("unet.", unet)
        return arrays, info

    def _sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        cfg = TileDiffusionConfig.model_validate(state.config)
        self._require_shape(state, spec)
        layout = TileLayout.from_dict(state.info["layout"])
        index = np.arange(layout.n_tiles) if spec.chunk is None else _covering(layout, spec.chunk)
        dev = torch.device(self.device)
        models = _Models.load(state, cfg, dev)
        cpu_models: _Models | None = None  # built on the first batch that runs out of memory
        arrays, devices = [], []
        for i in range(n):
            tiles = np.empty((index.size, cfg.tile, cfg.tile), dtype=np.float32)
            fell_back = False
            for b0 in range(0, index.size, cfg.sample_batch):
                batch = index[b0 : b0 + cfg.sample_batch]
                z = _tile_noise(seed, i, state.tensor, "latent", batch, (cfg.channels, cfg.side, cfg.side), dev)
                r = _tile_noise(seed, i, state.tensor, "residual", batch, (cfg.tile, cfg.tile), dev)
                try:
                    out = models.denoise(layout, batch, z, r)
                except torch.cuda.OutOfMemoryError:
                    warnings.warn(
                        f"{self.name}: out of GPU memory on {batch.size} tiles of "
                        f"{state.tensor}; redoing them on the CPU",
                        stacklevel=2,
                    )
                    torch.cuda.empty_cache()
                    cpu_models = cpu_models or _Models.load(state, cfg, torch.device("cpu"))
                    out = cpu_models.denoise(layout, batch, z.cpu(), r.cpu())
                    fell_back = True
                tiles[b0 : b0 + batch.size] = out
            arrays.append(_unnormalise_parts(_assemble(layout, index, tiles, spec), state, spec))
            name = device_name(dev)
            devices.append(f"{name}->cpu" if fell_back else name)
        return SampleResult(arrays=arrays, devices=devices, seed=seed)


def _tile_noise(
    seed: int, index: int, name: str, stream: str, tiles: np.ndarray, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """N(0, 1) noise (len(tiles), *shape) for sampling: tile j's values are run j of the tensor's
    own stream (`standard_normal`), so a tile draws the same noise in any batch, chunk or n, and
    two tensors (or two tiles) never share it."""
    per = math.prod(shape)
    lo, hi = int(tiles.min()), int(tiles.max()) + 1
    values = standard_normal(seed, index, name, lo * per, hi * per, stream).reshape(hi - lo, *shape)
    return torch.from_numpy(values[tiles - lo]).to(device)


# ---------------------------------------------------------------------------------------------
# networks and schedulers


class _Autoencoder(torch.nn.Module):
    """Tile <-> latent: d x d pixel blocks folded into channels, then 3x3 convs at latent size.

    Every conv runs at the latent resolution (tile / d), so decoding costs a fraction of a
    UNet step; a TAESD-style autoencoder (diffusers `AutoencoderTiny`) with convs at full
    resolution measured ~15x slower to decode here and would dominate sampling.
    """

    def __init__(self, cfg: TileDiffusionConfig):
        super().__init__()
        d, ch, c = cfg.downsample, cfg.ae_channels, cfg.latent_channels
        act = torch.nn.SiLU
        self.encoder = torch.nn.Sequential(
            torch.nn.PixelUnshuffle(d),  # (B, 1, t, t) -> (B, d*d, t/d, t/d)
            torch.nn.Conv2d(d * d, ch, 3, padding=1),
            act(),
            torch.nn.Conv2d(ch, ch, 3, padding=1),
            act(),
            torch.nn.Conv2d(ch, c, 1),
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Conv2d(c, ch, 3, padding=1),
            act(),
            torch.nn.Conv2d(ch, ch, 3, padding=1),
            act(),
            torch.nn.Conv2d(ch, ch, 3, padding=1),
            act(),
            torch.nn.Conv2d(ch, d * d, 1),
            torch.nn.PixelShuffle(d),  # (B, d*d, t/d, t/d) -> (B, 1, t, t)
        )


def _unet(cfg: TileDiffusionConfig) -> UNet2DModel:
    """A small UNet: plain resnet blocks, attention only in the lowest-resolution mid block."""
    levels = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=cfg.side,
        in_channels=cfg.channels + _COORDS,
        out_channels=cfg.channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=cfg.norm_groups,
        attention_head_dim=8,
    )


def _schedule(cfg: TileDiffusionConfig) -> dict:
    """The noise schedule that training and sampling share."""
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
    }


def _ddim(cfg: TileDiffusionConfig, dev: torch.device) -> DDIMScheduler:
    # No clipping: latents and normalised weights are not images in [-1, 1].
    # Spacing: with few steps, "trailing" starts at t = T - 1, where the cosine schedule's
    # SNR is ~1e-9, so x0 = (x - sqrt(1 - a) eps) / sqrt(a) amplifies any error of an epsilon
    # model ~2e4-fold (measured: samples 100-1000x too large). Epsilon models therefore start
    # one stride below T ("leading" + offset 1, Stable Diffusion's setting); v-prediction is
    # well posed at T and takes the full range (Lin et al. 2024, "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed", secs. 3.2-3.3).
    spacing = (
        {"timestep_spacing": "trailing"}
        if cfg.prediction_type == "v_prediction"
        else {"timestep_spacing": "leading", "steps_offset": 1}
    )
    sched = DDIMScheduler(**_schedule(cfg), clip_sample=False, **spacing)
    sched.set_timesteps(cfg.sample_steps, device=dev)
    return sched


def _coords(tops: torch.Tensor, cfg: TileDiffusionConfig, extent: tuple[int, int]) -> torch.Tensor:
    """(B, 2, side, side) row and column of each UNet pixel's centre, scaled to [-1, 1].

    Args:
        tops: (B, 2) top-left (row, col) of each crop in the padded 2-D view.
        cfg: gives the UNet's side and elements per pixel.
        extent: (rows, cols) of the padded 2-D view.
    """
    offsets = (torch.arange(cfg.side, device=tops.device) + 0.5) * cfg.step  # (side,)
    rows = (tops[:, 0:1] + offsets) * (2.0 / extent[0]) - 1.0  # (B, side)
    cols = (tops[:, 1:2] + offsets) * (2.0 / extent[1]) - 1.0  # (B, side)
    b, s = tops.shape[0], cfg.side
    return torch.stack([rows[:, :, None].expand(b, s, s), cols[:, None, :].expand(b, s, s)], 1)


def _to_arrays(prefix: str, module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# training


class _Crops:
    """Random tile-sized crops of the examples' padded 2-D views, with their positions."""

    def __init__(self, images: torch.Tensor, mask: torch.Tensor, cfg: TileDiffusionConfig):
        self.images = images  # (K, H, W) normalised, padding 0
        self.mask = mask  # (H, W) 1 on real elements, 0 on padding
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    @property
    def extent(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:])

    def batch(
        self, size: int | None = None, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 1, t, t) crops, (B, 1, t, t) their masks and (B, 2) float top-left corners.

        B is `size` (default: the batch size); `rng` defaults to the training stream.
        """
        t, b, rng = self.cfg.tile, size or self.cfg.batch_size, rng or self.rng
        k = rng.integers(self.images.shape[0], size=b)
        ys = rng.integers(self.extent[0] - t + 1, size=b)
        xs = rng.integers(self.extent[1] - t + 1, size=b)
        x = torch.stack([self.images[i, y : y + t, c : c + t] for i, y, c in zip(k, ys, xs, strict=True)])
        m = torch.stack([self.mask[y : y + t, c : c + t] for y, c in zip(ys, xs, strict=True)])
        tops = torch.tensor(np.stack([ys, xs], 1), dtype=torch.float32, device=x.device)
        return x[:, None], m[:, None], tops


def _train(
    module: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    val_fn: Callable[[], torch.Tensor],
    steps: int,
    cfg: TileDiffusionConfig,
) -> FitRecord:
    """AdamW with cosine decay over the budget `steps`; stops at a validation plateau.

    The schedule is fixed before the first step, so stopping early only truncates it. With
    `early_stop`, the weights of the best validation check are kept.
    """
    opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    plateau = Plateau(module, cfg.patience, cfg.min_delta) if cfg.early_stop else None
    losses, stopped, step = [], "cap", 0

    def validate() -> float:
        with torch.no_grad():
            return float(val_fn())

    while step < steps:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        lr.step()
        step += 1
        losses.append(loss.item())
        if plateau is not None and step % cfg.eval_every == 0 and plateau.check(validate(), step) and step < steps:
            stopped = "plateau"
            break
    train_loss = float(np.mean(losses[-max(1, len(losses) // 10) :]))  # the last 10% of steps
    return finish(plateau, validate, step, steps, stopped, cfg.eval_every, train_loss)


def _train_autoencoder(
    ae: _Autoencoder,
    crops: _Crops,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val_rng: torch.Generator,
    noise: torch.Generator,
    cfg: TileDiffusionConfig,
    steps: int,
) -> FitRecord:
    """Masked MSE reconstruction with noisy latents, at most `steps` steps."""

    def loss(x: torch.Tensor, m: torch.Tensor, eps: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
        z = ae.encoder(x)
        if eps is None:
            eps = torch.randn(z.shape, generator=gen, device=z.device)
        z = z + cfg.ae_noise * z.detach().square().mean().sqrt() * eps
        err = (ae.decoder(z) - x).square() * m  # padding is not the tensor's
        return err.sum() / m.sum().clamp_min(1.0)

    vx, vm, _ = val
    with torch.no_grad():
        val_eps = torch.randn(ae.encoder(vx).shape, generator=val_rng, device=vx.device)  # drawn once

    def train_loss() -> torch.Tensor:
        x, m, _ = crops.batch()
        return loss(x, m, None, noise)

    return _train(ae, train_loss, lambda: loss(vx, vm, val_eps, None), steps, cfg)


def _train_unet(
    unet: UNet2DModel,
    ae: _Autoencoder | None,
    latent_scale: float,
    crops: _Crops,
    val: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    val_rng: torch.Generator,
    noise: torch.Generator,
    cfg: TileDiffusionConfig,
    steps: int,
) -> FitRecord:
    """DDPM training (Ho et al. 2020, Algorithm 1), at most `steps` steps."""
    scheduler = DDPMScheduler(**_schedule(cfg))

    def latents(x: torch.Tensor) -> torch.Tensor:
        if ae is None:
            return x
        with torch.no_grad():
            return ae.encoder(x) * latent_scale  # (B, c, side, side)

    def loss(x: torch.Tensor, tops: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noisy = scheduler.add_noise(x, eps, t)
        pred = unet(torch.cat([noisy, _coords(tops, cfg, crops.extent)], 1), t).sample
        target = eps if cfg.prediction_type == "epsilon" else scheduler.get_velocity(x, eps, t)
        return F.mse_loss(pred, target)

    def train_loss() -> torch.Tensor:
        x, _, tops = crops.batch()
        x = latents(x)
        eps = torch.randn(x.shape, generator=noise, device=x.device)
        t = torch.randint(cfg.num_train_timesteps, (x.shape[0],), generator=noise, device=x.device)
        return loss(x, tops, eps, t)

    vx, _, vtops = val
    vx = latents(vx)  # the autoencoder is trained by now: fixed latents
    val_eps = torch.randn(vx.shape, generator=val_rng, device=vx.device)
    val_t = torch.randint(cfg.num_train_timesteps, (vx.shape[0],), generator=val_rng, device=vx.device)
    return _train(unet, train_loss, lambda: loss(vx, vtops, val_eps, val_t), steps, cfg)


def _residual_std(ae: _Autoencoder, encoded: list, dev: torch.device) -> np.ndarray:
    """(t, t) std of tile - decode(encode(tile)) at each pixel, over real elements of grid tiles."""
    total = sum(len(e.tiles) for e in encoded)
    pick = np.linspace(0, total - 1, min(total, _RESIDUAL_TILES)).astype(np.int64)  # spread out
    tiles = np.concatenate([e.tiles for e in encoded])[pick]  # (n, t, t)
    mask = np.concatenate([e.mask for e in encoded])[pick]
    sq, count = np.zeros(tiles.shape[1:]), np.zeros(tiles.shape[1:])
    with torch.no_grad():
        for b0 in range(0, len(tiles), 256):
            x = torch.from_numpy(tiles[b0 : b0 + 256, None]).to(dev)
            err = (ae.decoder(ae.encoder(x)) - x)[:, 0].cpu().numpy()
            m = mask[b0 : b0 + 256]
            sq += np.where(m, err.astype(np.float64) ** 2, 0.0).sum(0)
            count += m.sum(0)
    return np.sqrt(sq / np.maximum(count, 1)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# sampling


class _Models:
    """The fitted networks on one device, and the DDIM loop that uses them."""

    def __init__(
        self,
        cfg: TileDiffusionConfig,
        unet: UNet2DModel,
        ae: _Autoencoder | None,
        latent_scale: float,
        residual: torch.Tensor | None,
        dev: torch.device,
    ):
        self.cfg, self.unet, self.ae, self.dev = cfg, unet, ae, dev
        self.latent_scale = latent_scale
        self.residual = residual  # (t, t) residual std of the autoencoder, or None

    @classmethod
    def load(cls, state: State, cfg: TileDiffusionConfig, dev: torch.device) -> _Models:
        def weights(prefix: str) -> dict[str, torch.Tensor]:
            return {
                k[len(prefix) :]: torch.from_numpy(np.asarray(v))
                for k, v in state.arrays.items()
                if k.startswith(prefix)
            }

        unet = _unet(cfg)
        unet.load_state_dict(weights("unet."))
        ae = None
        if cfg.use_latent:
            ae = _Autoencoder(cfg)
            ae.load_state_dict(weights("ae."))
            ae = ae.to(dev).eval()
        residual = state.arrays.get("residual_std")
        return cls(
            cfg,
            unet.to(dev).eval(),
            ae,
            float(state.info.get("latent_scale", 1.0)),
            None if residual is None else torch.from_numpy(np.asarray(residual)).to(dev),
            dev,
        )

    @torch.inference_mode()
    def denoise(self, layout: TileLayout, index: np.ndarray, z: torch.Tensor, r: torch.Tensor) -> np.ndarray:
        """(B, t, t) normalised tiles at grid `index`, from initial noise z and residual noise r.

        DDIM with eta = 0 (Song et al. 2021, eq. 12): deterministic given z.
        """
        cfg, t = self.cfg, layout.tile
        gc = layout.grid[1]
        tops = torch.from_numpy(np.stack([index // gc, index % gc], 1) * t).float().to(self.dev)
        coords = _coords(tops, cfg, (layout.grid[0] * t, gc * t))  # (B, 2, side, side)
        scheduler = _ddim(cfg, self.dev)
        x = z.to(self.dev) * scheduler.init_noise_sigma  # (B, c, side, side)
        for step in scheduler.timesteps:
            out = self.unet(torch.cat([x, coords], 1), step).sample  # epsilon or v
            x = scheduler.step(out, step, x, eta=0.0).prev_sample
        if self.ae is not None:
            x = self.ae.decoder(x / self.latent_scale)  # (B, 1, t, t)
        tiles = x[:, 0]
        if self.residual is not None:
            tiles = tiles + self.residual * r.to(self.dev)
        return tiles.float().cpu().numpy()


def _untile(layout: TileLayout, tiles: np.ndarray) -> np.ndarray:
    """(n, t, t) grid tiles -> the padded (rows, cols) image they cut (as in codec.decode)."""
    (gr, gc), t = layout.grid, layout.tile
    return np.ascontiguousarray(tiles.reshape(gr, gc, t, t).transpose(0, 2, 1, 3).reshape(gr * t, gc * t))


def _covering(layout: TileLayout, chunk: Chunk) -> np.ndarray:
    """Indices (row-major in the grid) of the tiles that hold an element of the chunk."""
    (_, cols), t = layout.shape2d, layout.tile
    r0, c0 = divmod(chunk.offset, cols)
    r1, c1 = divmod(chunk.stop - 1, cols)
    need = np.zeros(layout.grid, dtype=bool)  # (tile rows, tile cols)
    if r0 == r1:
        need[r0 // t, c0 // t : c1 // t + 1] = True
    else:
        need[r0 // t, c0 // t :] = True  # the first row, from c0 on
        need[r1 // t, : c1 // t + 1] = True  # the last row, up to c1
        if r1 - r0 > 1:
            need[(r0 + 1) // t : (r1 - 1) // t + 1] = True  # whole rows between
    return np.flatnonzero(need)


def _unnormalise_parts(values: np.ndarray, state: State, spec: SampleSpec) -> np.ndarray:
    """A sample (or its chunk) of a stack fitted with `normalise_parts`, back on each part's scale."""
    norms = state.info.get("part_normalizers")
    if not norms:
        return values
    per = math.prod(spec.shape[1:])  # values of one part
    start = 0 if spec.chunk is None else spec.chunk.offset
    flat, out = values.reshape(-1), np.empty(values.size, dtype=np.float32)
    for j, z in enumerate(norms):  # the parts this run of values covers, in C order
        a, b = max(j * per - start, 0), min((j + 1) * per - start, flat.size)
        if a < b:
            out[a:b] = Normalizer.from_dict(z).invert(flat[a:b])
    return out.reshape(values.shape)


def _assemble(layout: TileLayout, index: np.ndarray, tiles: np.ndarray, spec: SampleSpec) -> np.ndarray:
    """The sample of spec.out_shape from generated tiles at grid `index`."""
    if spec.chunk is None:
        return decode(layout, tiles)
    # decode only the band of tile rows that holds the chunk, as a tensor of its own
    (rows, cols), t, gc = layout.shape2d, layout.tile, layout.grid[1]
    first, last = index[0] // gc, index[-1] // gc  # tile rows of the band
    band = replace(layout, shape=(min((last + 1) * t, rows) - first * t, cols))
    full = np.zeros((band.n_tiles, t, t), dtype=np.float32)  # tiles not generated stay 0
    full[index - first * gc] = tiles
    start = spec.chunk.offset - first * t * cols
    return decode(band, full).reshape(-1)[start : start + spec.chunk.size].copy()
