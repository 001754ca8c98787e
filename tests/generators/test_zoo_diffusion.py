"""Tests for `zoo-diffusion` (weightsmith.generators.zoo_diffusion), on CPU at tiny configs.

The zoo is a real trained tensor (a Stable Diffusion UNet LoRA matrix, (320, 4)) walking along
a few random directions, as checkpoints of one training run do: K = 24 checkpoints with
low-rank structure for the autoencoder and the latent DDPM to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from weightsmith.codec import chunk_region
from weightsmith.errors import WeightsmithError
from weightsmith.generators import (
    Examples,
    SampleSpec,
    get,
    state_from_bytes,
    state_to_bytes,
)
from weightsmith.generators.base import group_examples, split_group
from weightsmith.generators.zoo_diffusion import align_rows

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
_BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora"
UP = f"{_BLOCK}.up.weight"  # (320, 4)
DOWN = f"{_BLOCK}.down.weight"  # (4, 320)
K = 24
TINY = {
    "hidden": 32,
    "max_latent": 8,
    "ae_steps": 150,
    "denoiser_width": 64,
    "denoiser_depth": 1,
    "ddpm_steps": 600,
    "batch_size": 64,
    "inference_steps": 5,
    "sample_batch": 4,
}


@pytest.fixture(scope="module")
def tensors(fixtures_dir: Path) -> dict[str, np.ndarray]:
    return load_file(fixtures_dir / LORA)


def walk(name: str, tensor: np.ndarray, k: int = K, rank: int = 3, seed: int = 0) -> Examples:
    """The tensor plus a random walk in `rank` random directions (steps of 5% of its std)."""
    rng = np.random.default_rng(seed)
    std = float(tensor.std())
    dirs = rng.standard_normal((rank, *tensor.shape)) * std  # (rank, *shape)
    steps = np.cumsum(0.05 * rng.standard_normal((k, rank)), axis=0)  # (K, rank)
    return Examples(name, tensor + np.tensordot(steps, dirs, axes=1))


@pytest.fixture(scope="module")
def fitted(tensors: dict[str, np.ndarray]):
    gen = get("zoo-diffusion")()
    examples = walk(UP, tensors[UP])
    return gen, examples, gen.fit(examples, TINY)


def test_sample_shape_seed_and_state_round_trip(fitted) -> None:
    gen, examples, state = fitted
    assert state.generator == "zoo-diffusion" and state.checkpoints == K
    # the walk's rank: 3 components hold all the variance, so L = 3 (below max_latent = 8)
    assert state.info["components"] == 3 and state.info["latent"] == 3
    assert state.info["latent_explained"] == pytest.approx(1.0) and len(state.info["explained_variance"]) == 3
    assert all(a.dtype.kind in "fi" for a in state.arrays.values())
    assert {"ae.encoder.0.weight", "den.proj_in.weight"} <= set(state.arrays)

    spec = SampleSpec(examples.shape)
    first = gen.sample(state, 3, spec, seed=7)
    assert first.devices == ["cpu"] * 3 and first.seed == 7
    for a in first.arrays:
        assert a.shape == examples.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.array_equal(first.arrays[0], first.arrays[1])

    # same seed: identical, and sample i does not depend on n (fixed, padded batches)
    for a, b in zip(gen.sample(state, 3, spec, seed=7).arrays, first.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    five = gen.sample(state, 5, spec, seed=7).arrays
    for a, b in zip(five, first.arrays, strict=False):
        np.testing.assert_array_equal(a, b)
    other = gen.sample(state, 3, spec, seed=8).arrays
    assert not any(np.array_equal(a, b) for a, b in zip(other, first.arrays, strict=True))

    # the state survives bytes
    stored = state_from_bytes(state_to_bytes(state))
    assert stored.info == state.info and stored.config == state.config
    for a, b in zip(gen.sample(stored, 3, spec, seed=7).arrays, first.arrays, strict=True):
        np.testing.assert_array_equal(a, b)

    # a chunk is the 1-D run of the same whole sample, so chunks splice into one tensor
    chunk = chunk_region(examples.shape, 4 * 100, 250)
    part = gen.sample(state, 3, SampleSpec(examples.shape, chunk), seed=7).arrays
    for p, whole in zip(part, first.arrays, strict=True):
        assert p.shape == (100,) and p.dtype == np.float32
        np.testing.assert_allclose(p, whole.reshape(-1)[250:350], rtol=1e-5, atol=1e-7)


def test_samples_look_like_the_zoo(fitted) -> None:
    gen, examples, state = fitted
    draws = np.stack(gen.sample(state, 16, SampleSpec(examples.shape), seed=0).arrays)
    flat, got = examples.flat(), draws.reshape(16, -1)
    # distance to the zoo's mean: on the zoo's scale, not collapsed and not blown up
    spread = np.linalg.norm(flat - flat.mean(0), axis=1).mean()
    dist = np.linalg.norm(got - flat.mean(0), axis=1).mean()
    assert 0.2 * spread < dist < 3 * spread
    # near the zoo: as close to their nearest checkpoint as a few steps of the walk
    step = np.linalg.norm(np.diff(flat, axis=0), axis=1).mean()
    nearest = np.linalg.norm(got[:, None] - flat[None], axis=-1).min(1)
    assert float(np.median(nearest)) < 5 * step
    # the samples' values have the zoo's scale
    assert float(got.std()) == pytest.approx(float(flat.std()), rel=0.2)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_identical_checkpoints_give_the_checkpoint(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[UP]
    gen = get("zoo-diffusion")()
    state = gen.fit(Examples.stack(UP, [x, x, x]), TINY)  # no spread: q = 0 directions
    assert state.arrays["pca.basis"].shape == (0, x.size)
    for a in gen.sample(state, 2, SampleSpec(x.shape), seed=0).arrays:
        np.testing.assert_allclose(a, x, rtol=1e-5, atol=1e-7)


def test_zoo_diffusion_refuses_bad_input(tensors: dict[str, np.ndarray]) -> None:
    gen = get("zoo-diffusion")()
    with pytest.raises(WeightsmithError, match="zoo-diffusion needs at least 2 checkpoints, got 1"):
        gen.fit(Examples.stack(UP, [tensors[UP]]), TINY)
    with pytest.raises(WeightsmithError, match="at most max_numel=100 values, got 1280"):
        gen.fit(walk(UP, tensors[UP], k=3), {**TINY, "max_numel": 100})
    vec = Examples("bias", walk(UP, tensors[UP], k=3).flat())  # (K, D): no rows to align
    with pytest.raises(WeightsmithError, match=r"align needs checkpoints with rows"):
        gen.fit(vec, {**TINY, "align": True})
    with pytest.raises(WeightsmithError, match="zoo-diffusion inference_steps"):
        gen.fit(vec, {**TINY, "inference_steps": 0})
    fp = gen.fingerprint(vec, TINY)
    assert gen.fingerprint(vec, {**TINY, "align": True}) != fp


def test_align_rows_recovers_a_permutation(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[UP]  # (320, 4): 320 hidden units
    rng = np.random.default_rng(0)
    perm = rng.permutation(x.shape[0])
    noisy = x + 0.01 * float(x.std()) * rng.standard_normal(x.shape)
    stack = np.stack([x, x[perm], noisy[rng.permutation(x.shape[0])]]).astype(np.float32)
    aligned, perms = align_rows(stack)
    assert perms.shape == (3, 320) and perms.dtype == np.int64
    np.testing.assert_array_equal(perms[0], np.arange(320))
    np.testing.assert_array_equal(aligned[1], x)  # checkpoint 1 = permuted checkpoint 0
    # the noisy checkpoint: units whose rows are nearly alike may trade places (SciPy's exact
    # assignment does that for a few of them; the greedy matching does not): most land home
    home = np.all(np.abs(aligned[2] - noisy) <= 0.05 * float(x.std()), axis=1)
    assert home.mean() >= 0.95, home.mean()
    np.testing.assert_array_equal(x[perm][perms[1]], x)
    with pytest.raises(WeightsmithError, match="needs a stack"):
        align_rows(stack[:, :, 0])

    # in fit: the stored permutations, and samples in checkpoint 0's order of units
    gen = get("zoo-diffusion")()
    state = gen.fit(Examples(UP, stack), {**TINY, "align": True})
    np.testing.assert_array_equal(state.arrays["align.perms"], perms)
    (a,) = gen.sample(state, 1, SampleSpec(x.shape), seed=0).arrays
    assert float(np.abs(a - x).mean()) < 0.05 * float(x.std())


def test_tensor_set_concat_and_split(tensors: dict[str, np.ndarray]) -> None:
    up, down = walk(UP, tensors[UP], seed=1), walk(DOWN, tensors[DOWN], seed=2)
    both = group_examples([up, down])
    offsets = both.offsets
    assert both.name == f"{UP}+{DOWN}" and both.values.shape == (K, 2560)
    assert offsets == [0, 1280, 2560]
    parts = split_group(both.values[5], offsets, [up.shape, down.shape])
    np.testing.assert_array_equal(parts[0], up.values[5])
    np.testing.assert_array_equal(parts[1], down.values[5])

    gen = get("zoo-diffusion")()
    state = gen.fit(both, TINY)
    (vec,) = gen.sample(state, 1, SampleSpec(both.shape), seed=0).arrays
    a, b = split_group(vec, offsets, [up.shape, down.shape])
    assert a.shape == (320, 4) and b.shape == (4, 320)
    with pytest.raises(WeightsmithError, match="different checkpoint counts"):
        group_examples([up, walk(DOWN, tensors[DOWN], k=3)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(fitted) -> None:
    _, examples, cpu_state = fitted
    gen = get("zoo-diffusion")(device="cuda")
    spec = SampleSpec(examples.shape)
    result = gen.sample(cpu_state, 3, spec, seed=7)  # a state fitted on CPU samples on the GPU
    assert result.devices == ["cuda:0"] * 3
    for a in result.arrays:
        assert a.shape == examples.shape and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(gen.sample(cpu_state, 3, spec, seed=7).arrays[0], result.arrays[0])
    state = gen.fit(examples, TINY)  # fitting runs on the GPU too
    again = gen.sample(state, 2, spec, seed=1)
    assert again.devices == ["cuda:0"] * 2 and all(np.isfinite(a).all() for a in again.arrays)


def test_easy_zoo_stops_at_a_plateau_on_held_out_members(tensors: dict[str, np.ndarray]) -> None:
    # nearly identical members: the held-out block looks like the rest, both nets plateau early
    rng = np.random.default_rng(0)
    base = tensors[UP]
    easy = Examples("easy", base + 1e-4 * float(base.std()) * rng.standard_normal((K, *base.shape)))
    config = {
        **TINY,
        "ae_min_steps": 600,
        "ae_steps": 600,
        "ddpm_min_steps": 600,
        "ddpm_steps": 600,
        "eval_every": 10,
        "patience": 2,
        "min_delta": 0.05,
    }
    state = get("zoo-diffusion")().fit(easy, config)
    assert state.info["held_out"] == 3  # the last eighth of 24 members
    for net in ("ae_fit", "ddpm_fit"):
        fit = state.info[net]
        assert fit["budget"] == 600 and fit["stopped"] == "plateau" and fit["steps"] < 600, (net, fit)
    # without early stopping nothing is held out and the budget runs out
    state = get("zoo-diffusion")().fit(easy, {**config, "early_stop": False, "ae_steps": 30, "ddpm_steps": 30})
    assert state.info["held_out"] == 0 and state.info["ddpm_fit"]["stopped"] == "cap"
    assert state.info["ddpm_fit"]["steps"] == 30 and state.info["ddpm_fit"]["val_loss"] is None
