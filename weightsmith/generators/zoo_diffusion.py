"""`zoo-diffusion`: neural network diffusion (p-diff, Wang et al. 2024) over a zoo of checkpoints.

Fitted on K >= 2 checkpoints of one tensor, or of a group of tensors of any shapes flattened
into one vector per checkpoint (`group_examples`, which `predict` uses for `joint` fits:
`fits_groups`), it draws whole new tensors, a group's tensors from one latent together:

1. Optional alignment (`align`): the rows (hidden units) of every checkpoint are permuted to
   best match checkpoint 0 (`align_rows`), so zoos trained from independent seeds share one
   ordering of units instead of K unrelated ones.
2. Per-piece normalisation: x = (w - mean) / std, one mean and std per tensor of a group (its
   values over all K checkpoints), so a LayerNorm weight near 1 and a matrix near 0 each get
   their own; a single tensor is one piece.
3. Autoencoder x (D,) -> z (L,) -> x (D,) with p-diff's noise augmentation: N(0, input_noise^2)
   on the input and N(0, (latent_noise * s)^2) on the latent while training, s the spread (std)
   of the training members' latents (detached, measured on each step's batch), so the noise is
   a fixed fraction of the latents' own scale whatever scale the encoder picks, and the decoder
   maps a neighbourhood of each training latent to a working tensor. Its outer layers are the
   zoo's q <= K - 1 principal directions, computed in closed form: x -> c = V (x - center) (q,)
   and c -> center + V^T c. A learned D-wide first or last layer reaches the same optimum, since
   K training vectors only constrain it inside their span, but costs K * D * width per step;
   in closed form the learned MLPs (q -> hidden -> L -> hidden -> q) train in seconds on a CPU.
   The latent width L is what the zoo supports: the fewest principal components whose share of
   the variance reaches `latent_variance`, at most `max_latent`, q and K_train - 1 (K_train the
   members the networks train on; at least 1), since K_train centred latents span at most
   K_train - 1 directions. info records L (`latent`), the variance share it holds
   (`latent_explained`) and every component's (`explained_variance`), and the kept encoder's
   latent spread (`latent_std`) with the noise on that scale (`latent_noise_abs`).
4. Latents z_k = enc(x_k), centred and rescaled to unit std (the scale is stored, as Stable
   Diffusion stores its VAE's `scaling_factor`).
5. Latent DDPM (Ho et al. 2020): epsilon prediction trained with `DDPMScheduler.add_noise` +
   MSE; sampling is a DDIM loop (eta = 0, `inference_steps` steps) from Gaussian noise, then
   decoded and de-normalised piece by piece.

Why an MLP denoiser, not `UNet1DModel`: the encoder mixes all coordinates, so the latent has no
spatial order for convolutions to exploit. An MLP with a sinusoidal timestep embedding
(diffusers' `get_timestep_embedding` + `TimestepEmbedding`) fits a latent this small and runs a
batch of 64 through 20 DDIM steps in milliseconds on a CPU core.

Budget and early stopping (`weightsmith.generators.budget`): the last `val_fraction` of the
members (a contiguous block: a zoo's members come in training order) are held out when that is at
least `min_held_out` (3: K >= 20 at 1/8; a smaller zoo trains on every member for the whole budget);
the networks train on the others for at most steps_per_member x members steps (twice that for
the denoiser), between `*_min_steps` and the cap `ae_steps` / `ddpm_steps`, at a constant
learning rate, and stop when their loss on the held-out members (with noise and timesteps drawn
once) plateaus, keeping the best weights; `info["ae_fit"]` / `info["ddpm_fit"]` say how each
ended. The principal directions (step 3a, closed form) use every member. `early_stop=False`
trains on all members for the whole budget (the previous behaviour with `*_min_steps` at the caps).

Samples are drawn in fixed-size batches (padded), so sample i is bit-identical whatever n is.
Its noise is one latent per sample, keyed by (seed, i) alone (`sample_seed(seed, i)`): every
chunk of a tensor drawn with the same seed is a piece of the same whole sample, so spliced
chunks form one coherent tensor, and a group fitted jointly is drawn jointly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from pydantic import Field
from torch import nn

from weightsmith.errors import WeightsmithError
from weightsmith.generators.base import (
    Examples,
    Generator,
    GeneratorConfig,
    SampleResult,
    SampleSpec,
    State,
    device_name,
    moments,
    sample_seed,
)
from weightsmith.generators.budget import FitRecord, Plateau, budget, finish

try:  # an exact assignment where SciPy is installed; a greedy matching otherwise
    from scipy.optimize import linear_sum_assignment
except ImportError:  # pragma: no cover - depends on the environment
    linear_sum_assignment = None

_BATCH_BYTES = 256 << 20  # decoded float32 output per sampling batch, at most
# Intra-op threads on CPU. The networks are small, so per-op OpenMP synchronisation outweighs
# the parallel work; on a busy 2-core machine 2 threads measured 5-20x slower than 1.
_CPU_THREADS = 1
_BLOCK = 1 << 20  # columns per block in the principal directions: K x 1M float64 at most


class ZooDiffusionConfig(GeneratorConfig):
    """Autoencoder, latent DDPM and sampling options (defaults: K = 200, D = 33k in ~35 s)."""

    components: int = Field(256, ge=1)  # q, principal directions kept (capped at K - 1)
    latent_variance: float = Field(0.99, gt=0, le=1)  # L = fewest components holding this share of the variance
    max_latent: int = Field(64, ge=1)  # cap on L (also capped by q and K_train - 1)
    hidden: int = Field(256, ge=1)  # width of the autoencoder's MLP layers
    input_noise: float = Field(0.001, ge=0)  # p-diff sigma_in, on the normalised weights
    latent_noise: float = Field(0.1, ge=0)  # p-diff sigma_lat, as a fraction of the latents' own std
    ae_steps: int = Field(1000, ge=1)  # most autoencoder optimiser steps (its budget's cap)
    ae_min_steps: int = Field(300, ge=1)  # floor of the autoencoder's budget
    steps_per_member: float = Field(4.0, gt=0)  # budget per training member (the denoiser's: twice this)
    denoiser_width: int = Field(256, ge=1)  # width of the MLP denoiser's residual blocks
    denoiser_depth: int = Field(3, ge=1)  # number of residual blocks
    ddpm_steps: int = Field(2000, ge=1)  # most denoiser optimiser steps (its budget's cap)
    ddpm_min_steps: int = Field(600, ge=1)  # floor of the denoiser's budget
    early_stop: bool = True  # hold out members and stop each net at a validation plateau (False: all train)
    val_fraction: float = Field(0.125, gt=0, lt=1)  # held-out contiguous block: the last members
    min_held_out: int = Field(3, ge=1)  # fewer held-out members than this: no early stopping (K < 20 by default)
    val_draws: int = Field(256, ge=1)  # (latent, timestep, noise) triples drawn once for the denoiser's validation
    eval_every: int = Field(25, ge=1)  # optimiser steps between validation checks
    patience: int = Field(4, ge=1)  # checks in a row without improvement that mean "plateau"
    min_delta: float = Field(0.01, ge=0)  # relative improvement of the best validation loss that counts
    batch_size: int = Field(200, ge=1)  # training minibatch of both nets (autoencoder: <= K)
    lr: float = Field(1e-3, gt=0)  # AdamW learning rate of both networks
    weight_decay: float = Field(2e-6, ge=0)  # AdamW weight decay (p-diff's value)
    train_timesteps: int = Field(1000, ge=2)  # DDPM forward-process steps T
    beta_schedule: str = Field(
        "linear", pattern="^(linear|scaled_linear|squaredcos_cap_v2)$"
    )  # DDPM betas, as diffusers names them
    inference_steps: int = Field(20, ge=1)  # DDIM steps per sample (eta = 0)
    sample_batch: int = Field(64, ge=1)  # samples per batch (fixed: the last batch is padded)
    align: bool = False  # permute rows (hidden units) to match checkpoint 0; needs (K, rows, ...)
    seed: int = Field(0, ge=0)  # seed of initialisation and training noise
    max_numel: int = Field(1 << 22, ge=1)  # largest D accepted (the state holds q * D floats)


class ZooDiffusion(Generator):
    """p-diff: an autoencoder over whole tensors and a DDPM over its latents."""

    name = "zoo-diffusion"
    Config = ZooDiffusionConfig
    min_checkpoints = 2
    # 2: data-sized budgets, held-out members, early stopping; 3: groups, L from the zoo, relative
    # noise, no early stopping on fewer than 3 held-out members
    version = 3
    packs_roles = True  # predict fits small tensors of one role together (weightsmith.predict)
    fits_groups = True  # with `joint`, predict fits all selected tensors as one group (weightsmith.predict)

    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        assert isinstance(config, ZooDiffusionConfig)
        d = examples.numel
        if d > config.max_numel:
            raise WeightsmithError(
                examples.name,
                f"zoo-diffusion fits at most max_numel={config.max_numel} values, got {d}: "
                "fit a smaller tensor set or raise max_numel",
            )
        values, arrays = examples.values, {}
        # 1. alignment
        if config.align:
            if values.ndim < 3:
                raise WeightsmithError(
                    examples.name,
                    f"align needs checkpoints with rows (K, rows, ...), got {values.shape}",
                )
            values, arrays["align.perms"] = align_rows(values)
        # 2. per-piece normalisation: each tensor of a group its own mean and std
        x = values.reshape(examples.k, d).copy()  # (K, D)
        offsets = examples.offsets
        norm = np.empty((len(offsets) - 1, 2), dtype=np.float64)  # (pieces, 2): mean, std
        for p, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            mean, std = moments(x[:, a:b])
            std = std or 1.0  # 0 only for a constant piece
            norm[p] = mean, std
            x[:, a:b] = (x[:, a:b] - np.float32(mean)) / np.float32(std)
        # 3a. the autoencoder's outer layers: the zoo's principal directions
        center, basis, ratios = _principal_directions(x, config.components)  # (D,), (q, D), (K,)
        held = _held_out(examples.k, config)
        latent, explained = latent_width(ratios, basis.shape[0], examples.k - held, config)
        with _threads(self.device):
            nets, info = self._train((x - center) @ basis.T, latent, held, config)  # coeffs (K, q)
        info["ae_loss"] *= basis.shape[0] / d  # as an MSE per value of the D-vector
        arrays |= {
            "norm": norm,  # (pieces, 2): (mean, std) of step 2, per piece
            "norm.sizes": np.diff(offsets).astype(np.int64),  # (pieces,) values per piece
            "pca.center": center,  # (D,) mean of the normalised checkpoints
            "pca.basis": basis,  # (q, D) orthonormal rows
            **nets,
        }
        return arrays, {
            "components": basis.shape[0],
            "latent": latent,
            "latent_explained": explained,  # share of the variance the first L components hold
            "explained_variance": [float(r) for r in ratios],  # per component, largest first
            "pieces": len(offsets) - 1,
            **info,
        }

    def _train(
        self, coeffs: np.ndarray, latent: int, held: int, config: ZooDiffusionConfig
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Steps 3b-5 on the checkpoints' principal coefficients (K, q); the last `held` members validate."""
        device = torch.device(self.device)
        c = torch.from_numpy(coeffs).to(device)  # (K, q)
        # the last members (a contiguous block: a zoo's members come in training order) are
        # held out for validation; the networks train on the rest
        k = c.shape[0]
        c_train, c_val = c[: k - held], c[k - held :]  # (K - held, q), (held, q)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(config.seed)  # module initialisation
            ae = _Autoencoder(c.shape[1], config.hidden, latent).to(device)
            den = _Denoiser(latent, config.denoiser_width, config.denoiser_depth).to(device)
        gen = torch.Generator(device).manual_seed(config.seed)
        val_gen = torch.Generator(device).manual_seed(config.seed + 1)  # validation draws, once
        members = k - held
        # 3b. the inner autoencoder, with noise augmentation
        steps = budget(members, config.steps_per_member, config.ae_min_steps, config.ae_steps)
        ae_fit = _train_autoencoder(ae, c_train, c_val, config, gen, val_gen, steps)
        # 4. latents centred and scaled to unit std (over the training members)
        with torch.inference_mode():
            z = ae.encoder(c)  # (K, L)
        latent_std = float(_spread(z[:members]))  # what the latent noise was a fraction of
        z_mean = z[:members].mean(0)
        z_scale = float((z[:members] - z_mean).std()) or 1.0  # 0 only for identical checkpoints
        z = (z - z_mean) / z_scale
        # 5. latent DDPM
        steps = budget(members, 2 * config.steps_per_member, config.ddpm_min_steps, config.ddpm_steps)
        ddpm_fit = _train_denoiser(den, z[:members], z[members:], config, gen, val_gen, steps)
        arrays = {
            "latent_mean": z_mean.cpu().numpy().astype(np.float32),  # (L,)
            "latent_scale": np.array(z_scale, dtype=np.float64),
            **_to_arrays("ae.", ae),
            **_to_arrays("den.", den),
        }
        return arrays, {
            "latent_scale": z_scale,
            "latent_std": latent_std,  # spread of the kept encoder's training latents
            "latent_noise_abs": config.latent_noise * latent_std,  # the latent noise on that encoder's scale
            "ae_loss": ae_fit.train_loss,
            "ddpm_loss": ddpm_fit.train_loss,
            "held_out": held,  # members used only for validation
            "ae_fit": ae_fit.to_dict(),
            "ddpm_fit": ddpm_fit.to_dict(),
        }

    def _sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        self._require_shape(state, spec)
        config = ZooDiffusionConfig.model_validate(state.config)
        batch = min(config.sample_batch, max(1, _BATCH_BYTES // (4 * math.prod(state.shape))))
        nets: dict[str, _Sampler] = {}  # per device, made on first use

        def run(device: str, gens: list[torch.Generator]) -> list[np.ndarray]:
            if device not in nets:
                nets[device] = _Sampler(state, config, torch.device(device))
            return nets[device](gens, batch, spec.region)

        arrays: list[np.ndarray] = []
        devices: list[str] = []
        with _threads(self.device):
            for start in range(0, n, batch):
                gens = [
                    torch.Generator("cpu").manual_seed(sample_seed(seed, i))  # one latent per sample
                    for i in range(start, min(n, start + batch))
                ]
                device = self.device
                try:
                    out = run(device, gens)
                except torch.cuda.OutOfMemoryError:
                    warnings.warn(
                        f"{state.tensor}: out of memory on {device}; this batch runs on CPU",
                        stacklevel=2,
                    )
                    torch.cuda.empty_cache()
                    device = "cpu"
                    out = run(device, gens)
                arrays += [a.reshape(spec.out_shape) for a in out]
                devices += [device_name(nets[device].device)] * len(out)
        return SampleResult(arrays=arrays, devices=devices, seed=seed)


# -- tensor sets ---------------------------------------------------------------------------


# -- latent width --------------------------------------------------------------------------


def _held_out(k: int, config: ZooDiffusionConfig) -> int:
    """Members held out for validation: the last val_fraction of them when early stopping, and none
    when that is fewer than `min_held_out` (a loss on one or two members is too noisy to stop on:
    a denoiser stopped at ~150 steps by one held-out member drew latents at 7-14x the training
    latents' spread on a K = 6 zoo; then every member trains for the whole budget)."""
    held = max(1, round(k * config.val_fraction)) if k >= 4 else 0
    return held if config.early_stop and held >= config.min_held_out else 0


def latent_width(ratios: np.ndarray, q: int, k_train: int, config: ZooDiffusionConfig) -> tuple[int, float]:
    """L and the share of the variance its first L components hold.

    L = the fewest principal components whose cumulative share `ratios` (largest first) reaches
    `latent_variance`, capped by `max_latent`, by q (the components kept) and by k_train - 1
    (k_train centred latents span at most that many directions); at least 1.
    """
    cum = np.cumsum(ratios)
    need = int(np.searchsorted(cum, config.latent_variance * (1 - 1e-9)) + 1) if cum.size else 1
    latent = max(1, min(need, config.max_latent, q, k_train - 1))
    return latent, float(cum[min(latent, cum.size) - 1]) if cum.size else 1.0


# -- alignment -----------------------------------------------------------------------------


def align_rows(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Permute each checkpoint's rows (hidden units) to match checkpoint 0's.

    Row r of checkpoint k is matched to row c of checkpoint 0 so that the summed Pearson
    correlation of matched rows (each row flattened over the trailing dims) is maximal: exactly
    with SciPy's `linear_sum_assignment` when it is installed, else greedily (repeatedly
    matching rows that are each other's best remaining match).

    For a whole network the permutation of a layer's output rows must also be applied to the
    next layer's input dimension (and to the layer's bias): `perms` is returned for that.

    Args:
        stack: (K, rows, ...) checkpoints of one weight.

    Returns:
        The aligned stack (aligned[k] = stack[k][perms[k]]) and perms (K, rows) int64, with
        perms[0] the identity.
    """
    stack = np.asarray(stack)
    if stack.ndim < 3:
        raise WeightsmithError("align_rows", f"needs a stack (K, rows, ...), got {stack.shape}")
    k, rows = stack.shape[:2]
    feats = stack.reshape(k, rows, -1).astype(np.float64)  # (K, rows, cols)
    feats -= feats.mean(-1, keepdims=True)
    feats /= np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-30)
    perms = np.empty((k, rows), dtype=np.int64)
    perms[0] = np.arange(rows)
    for i in range(1, k):
        perms[i] = _match(feats[0] @ feats[i].T)  # corr[r, c]: row r of 0, row c of i
    aligned = np.stack([stack[i][perms[i]] for i in range(k)])
    return aligned, perms


def _match(score: np.ndarray) -> np.ndarray:
    """perm with perm[r] = the column matched to row r, maximising sum(score[r, perm[r]])."""
    if linear_sum_assignment is not None:
        return linear_sum_assignment(score, maximize=True)[1]
    n = score.shape[0]
    perm = np.full(n, -1, dtype=np.int64)
    col_free = np.ones(n, dtype=bool)
    while (rows := np.flatnonzero(perm < 0)).size:
        cols = np.flatnonzero(col_free)
        sub = score[np.ix_(rows, cols)]
        best_col, best_row = sub.argmax(1), sub.argmax(0)
        # mutual best pairs; the first row holding the largest entry always is one
        mutual = best_row[best_col] == np.arange(rows.size)
        perm[rows[mutual]] = cols[best_col[mutual]]
        col_free[cols[best_col[mutual]]] = False
    return perm


# -- networks ------------------------------------------------------------------------------


class _Autoencoder(nn.Module):
    """The inner, learned part of the autoencoder: q principal coefficients <-> L latents."""

    def __init__(self, q: int, hidden: int, latent: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(q, hidden), nn.SiLU(), nn.Linear(hidden, latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, q))


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.fc1(F.silu(self.norm(h))) + self.time(F.silu(temb))  # (B, width)
        return h + self.fc2(F.silu(x))


class _Denoiser(nn.Module):
    """epsilon(z_t, t): an MLP with a sinusoidal timestep embedding added in every block."""

    def __init__(self, latent: int, width: int, depth: int):
        super().__init__()
        self.width = width
        self.time_embedding = TimestepEmbedding(width, width)
        self.proj_in = nn.Linear(latent, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, latent)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        freqs = get_timestep_embedding(t, self.width, flip_sin_to_cos=True, downscale_freq_shift=0)
        temb = self.time_embedding(freqs.to(z.dtype))  # (B, width)
        h = self.proj_in(z)  # (B, width)
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(F.silu(self.norm_out(h)))  # (B, L)


def _schedulers(config: ZooDiffusionConfig) -> tuple[DDPMScheduler, DDIMScheduler]:
    ddpm = DDPMScheduler(
        num_train_timesteps=config.train_timesteps,
        beta_schedule=config.beta_schedule,
        clip_sample=False,  # latents are unit-scaled, not bounded to [-1, 1]
    )
    return ddpm, DDIMScheduler.from_config(ddpm.config)


def _principal_directions(x: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Center (D,), the top q <= K - 1 orthonormal principal directions (q, D) of x (K, D), and
    every component's share of the variance (largest first; empty when all rows are equal).

    Gram trick (Turk & Pentland 1991, as in pca-gaussian): with Xc = x - center, eigenvectors
    u_i of Xc Xc^T (K, K) give v_i = Xc^T u_i / sqrt(lambda_i); float64, column block by block.
    """
    k, d = x.shape
    center = x.mean(0, dtype=np.float64)  # (D,)
    blocks = [slice(c, c + _BLOCK) for c in range(0, d, _BLOCK)]
    gram = np.zeros((k, k))
    for b in blocks:
        xc = x[:, b] - center[b]  # (K, block)
        gram += xc @ xc.T
    lam, u = np.linalg.eigh(gram)  # ascending
    order = np.argsort(lam)[::-1]
    positive = order[lam[order] > 1e-12 * max(lam.max(), 0.0)]  # drop rounding noise
    ratios = lam[positive] / lam[positive].sum() if positive.size else np.zeros(0)
    keep = positive[: min(components, k - 1)]
    basis = np.empty((keep.size, d), dtype=np.float32)  # (q, D)
    for b in blocks:
        basis[:, b] = (u[:, keep].T @ (x[:, b] - center[b])) / np.sqrt(lam[keep])[:, None]
    return center.astype(np.float32), basis, ratios


def _spread(z: torch.Tensor) -> torch.Tensor:
    """The latents' std (B, L) -> (): each dimension centred over the rows, pooled; 0 for one row."""
    return (z - z.mean(0)).square().mean().sqrt()


def _train(
    module: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    val_fn: Callable[[], torch.Tensor] | None,
    steps: int,
    config: ZooDiffusionConfig,
) -> FitRecord:
    """AdamW at a constant rate for at most `steps` steps; stops at a validation plateau.

    Without `val_fn` (no held-out members) it runs all `steps`. With it, the weights of the
    best validation check are kept.
    """
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    plateau = Plateau(module, config.patience, config.min_delta) if val_fn is not None else None
    losses, stopped, step = [], "cap", 0

    def validate() -> float:
        with torch.no_grad():
            return float(val_fn())

    while step < steps:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(loss.detach())  # no per-step device sync
        if plateau is not None and step % config.eval_every == 0 and plateau.check(validate(), step) and step < steps:
            stopped = "plateau"
            break
    train_loss = float(torch.stack(losses[-max(1, len(losses) // 10) :]).mean())  # the last 10% of steps
    return finish(plateau, validate, step, steps, stopped, config.eval_every, train_loss)


def _train_autoencoder(
    ae: _Autoencoder,
    c: torch.Tensor,
    c_val: torch.Tensor,
    config: ZooDiffusionConfig,
    gen: torch.Generator,
    val_gen: torch.Generator,
    steps: int,
) -> FitRecord:
    """p-diff's autoencoder objective: reconstruct from noisy inputs and noisy latents.

    Noise N(0, s^2 I_D) on the normalised weights is N(0, s^2 I_q) on their coefficients in an
    orthonormal basis, so it is added to the coefficients c (K, q). The latent noise is
    `latent_noise` times the spread of the training members' latents (`_spread`, detached),
    measured on each step's batch (on all training members when the batch holds one row), so
    scaling the latents up does not escape it. Validation: the held-out members c_val with input
    and latent noise drawn once, the latter scaled by the latest spread.
    """
    k, batch = c.shape[0], min(config.batch_size, c.shape[0])
    spread = torch.zeros((), device=c.device)  # refreshed at every training step

    def loss(cb: torch.Tensor, in_eps: torch.Tensor, lat_eps: torch.Tensor | None) -> torch.Tensor:
        nonlocal spread
        z = ae.encoder(cb + config.input_noise * in_eps)  # (B, L)
        if lat_eps is None:  # a training step
            if z.shape[0] > 1:
                spread = _spread(z.detach())
            else:
                with torch.no_grad():
                    spread = _spread(ae.encoder(c))
            lat_eps = torch.randn(z.shape, generator=gen, device=c.device)
        return F.mse_loss(ae.decoder(z + config.latent_noise * spread * lat_eps), cb)

    def train_loss() -> torch.Tensor:
        cb = c[torch.randperm(k, generator=gen, device=c.device)[:batch]]  # (B, q)
        return loss(cb, torch.randn(cb.shape, generator=gen, device=c.device), None)

    val_fn = None
    if c_val.shape[0]:
        in_eps = torch.randn(c_val.shape, generator=val_gen, device=c.device)
        lat_eps = torch.randn((c_val.shape[0], ae.encoder[-1].out_features), generator=val_gen, device=c.device)
        val_fn = lambda: loss(c_val, in_eps, lat_eps)  # noqa: E731
    return _train(ae, train_loss, val_fn, steps, config)


def _train_denoiser(
    den: _Denoiser,
    z: torch.Tensor,
    z_val: torch.Tensor,
    config: ZooDiffusionConfig,
    gen: torch.Generator,
    val_gen: torch.Generator,
    steps: int,
) -> FitRecord:
    """Epsilon prediction: MSE(eps, den(sqrt(a_t) z + sqrt(1 - a_t) eps, t)) (Ho et al. eq. 14).

    Validation: `val_draws` (held-out latent, timestep, noise) triples drawn once.
    """
    ddpm, _ = _schedulers(config)
    k, batch, T = z.shape[0], config.batch_size, ddpm.config.num_train_timesteps

    def loss(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(den(ddpm.add_noise(z0, eps, t), t), eps)

    def train_loss() -> torch.Tensor:
        idx = torch.randint(0, k, (batch,), generator=gen, device=z.device)
        z0 = z[idx]  # (B, L)
        eps = torch.randn(z0.shape, generator=gen, device=z.device)
        t = torch.randint(0, T, (batch,), generator=gen, device=z.device)
        return loss(z0, eps, t)

    val_fn = None
    if z_val.shape[0]:
        n = config.val_draws
        zv = z_val[torch.arange(n, device=z.device) % z_val.shape[0]]  # (n, L)
        eps = torch.randn(zv.shape, generator=val_gen, device=z.device)
        t = torch.randint(0, T, (n,), generator=val_gen, device=z.device)
        val_fn = lambda: loss(zv, eps, t)  # noqa: E731
    return _train(den, train_loss, val_fn, steps, config)


@contextlib.contextmanager
def _threads(device: str) -> Iterator[None]:
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _to_arrays(prefix: str, module: nn.Module) -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}


def _load(module: nn.Module, prefix: str, arrays: dict[str, np.ndarray]) -> nn.Module:
    module.load_state_dict({k[len(prefix) :]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith(prefix)})
    return module.eval()


class _Sampler:
    """The fitted networks on one device: noise -> DDIM loop -> decoded, de-normalised rows."""

    def __init__(self, state: State, config: ZooDiffusionConfig, device: torch.device):
        a = state.arrays
        q, latent = a["pca.basis"].shape[0], a["latent_mean"].shape[0]
        self.device = device
        self.config = config
        self.latent = latent
        self.ae = _load(_Autoencoder(q, config.hidden, latent), "ae.", a).to(device)
        den = _Denoiser(latent, config.denoiser_width, config.denoiser_depth)
        self.den = _load(den, "den.", a).to(device)
        self.center = torch.from_numpy(a["pca.center"]).to(device)  # (D,)
        self.basis = torch.from_numpy(a["pca.basis"]).to(device)  # (q, D)
        self.z_mean = torch.from_numpy(a["latent_mean"]).to(device)  # (L,)
        self.z_scale = float(a["latent_scale"])
        norm, sizes = a["norm"].reshape(-1, 2), a["norm.sizes"]
        if len(sizes) == 1:  # one piece: scalars, no D-wide vectors
            self.mean, self.std = (float(v) for v in norm[0])
        else:  # per value of the D-vector, float32 as the values are
            self.mean = torch.from_numpy(np.repeat(norm[:, 0], sizes).astype(np.float32)).to(device)
            self.std = torch.from_numpy(np.repeat(norm[:, 1], sizes).astype(np.float32)).to(device)

    @torch.inference_mode()
    def __call__(self, gens: list[torch.Generator], batch: int, region: slice) -> list[np.ndarray]:
        """Values `region` of len(gens) samples, computed in a batch padded to `batch` rows."""
        _, ddim = _schedulers(self.config)
        ddim.set_timesteps(self.config.inference_steps, device=self.device)
        z = torch.zeros((batch, self.latent), device=self.device)  # padding rows stay 0
        z[: len(gens)] = randn_tensor((len(gens), self.latent), generator=gens, device=self.device)
        for t in ddim.timesteps:
            eps = self.den(z, t.expand(batch))
            z = ddim.step(eps, t, z, eta=0.0).prev_sample  # (B, L)
        c = self.ae.decoder(z * self.z_scale + self.z_mean)  # (B, q)
        # only the columns of the region: a chunk costs what it holds
        x = self.center[region] + c @ self.basis[:, region]  # (B, region)
        std, mean = self.std, self.mean
        if isinstance(std, torch.Tensor):
            std, mean = std[region], mean[region]
        x = (x[: len(gens)] * std + mean).cpu().numpy()
        return [np.ascontiguousarray(row) for row in x]
