"""Tests for the `tile-diffusion` generator (weightsmith.generators.tile_diffusion).

The examples are real trained values: sixteen (4, 320) LoRA down-projections of a Stable
Diffusion UNet stacked into a 64 x 96 matrix. The networks are real diffusers/torch modules at
a tiny config trained for a few dozen steps, so every test runs on the CPU in seconds; the
GPU test runs only where CUDA is available.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import weightsmith.generators.tile_diffusion as td
from weightsmith.codec import Chunk, chunk_region, encode, parse_size
from weightsmith.errors import WeightsmithError
from weightsmith.generators import (
    Examples,
    SampleSpec,
    State,
    get,
    state_from_bytes,
    state_to_bytes,
)
from weightsmith.generators.tile_diffusion import TileDiffusion

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
# tile 16 -> 4 x 4 latents; a 4 x 6 grid of tiles on the 64 x 96 examples
TINY = {
    "tile": 16,
    "ae_channels": 16,
    "block_out_channels": (16, 32),
    "ae_train_steps": 60,
    "unet_train_steps": 120,
    "batch_size": 32,
    "sample_steps": 4,
}


@pytest.fixture(scope="module")
def examples(fixtures_dir: Path) -> Examples:
    tensors = load_file(fixtures_dir / LORA)
    downs = [v for k, v in sorted(tensors.items()) if v.shape == (4, 320)][:16]
    return Examples.stack("lora.down", [np.concatenate(downs)[:, :96]])  # (64, 96)


@pytest.fixture(scope="module")
def fitted(examples: Examples) -> State:
    return TileDiffusion().fit(examples, TINY)


def test_registered() -> None:
    assert get("tile-diffusion") is TileDiffusion


def test_fit_stores_both_networks_and_the_layout(fitted: State, examples: Examples) -> None:
    assert fitted.generator == "tile-diffusion" and fitted.shape == examples.shape == (64, 96)
    names = set(fitted.arrays)
    assert any(k.startswith("ae.") for k in names) and any(k.startswith("unet.") for k in names)
    assert all(k.startswith(("ae.", "unet.")) or k == "residual_std" for k in names)
    assert all(a.dtype == np.float32 for a in fitted.arrays.values())
    assert fitted.arrays["residual_std"].shape == (16, 16)
    assert fitted.info["layout"]["shape"] == [64, 96] and fitted.info["layout"]["tile"] == 16
    for key in ("ae_loss", "unet_loss", "latent_scale"):
        assert math.isfinite(fitted.info[key]) and fitted.info[key] > 0


def test_whole_samples_are_reproducible(fitted: State, examples: Examples) -> None:
    gen = TileDiffusion()
    spec = SampleSpec(examples.shape)
    first = gen.sample(fitted, 2, spec, seed=3)
    assert first.devices == ["cpu", "cpu"] and first.seed == 3
    for a in first.arrays:
        assert a.shape == (64, 96) and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.array_equal(first.arrays[0], first.arrays[1])

    again = gen.sample(fitted, 2, spec, seed=3)
    for a, b in zip(first.arrays, again.arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    # sample i does not depend on how many are drawn
    np.testing.assert_array_equal(gen.sample(fitted, 1, spec, seed=3).arrays[0], first.arrays[0])
    other = gen.sample(fitted, 1, spec, seed=4).arrays[0]
    assert not np.allclose(other, first.arrays[0])


def test_samples_have_the_examples_scale(fitted: State, examples: Examples) -> None:
    # A sanity check, not a quality measure: after a few dozen training steps the samples'
    # spread should be within 3x of the examples', not collapsed to 0 or blown up.
    result = TileDiffusion().sample(fitted, 2, SampleSpec(examples.shape), seed=0)
    target = float(examples.values.std())
    for a in result.arrays:
        assert target / 3 < float(a.std()) < 3 * target


def test_chunk_sample(fitted: State, examples: Examples) -> None:
    gen = TileDiffusion()
    chunk = chunk_region(examples.shape, parse_size("2KB"), offset=100)
    spec = SampleSpec(examples.shape, chunk)
    result = gen.sample(fitted, 2, spec, seed=0)
    for a in result.arrays:
        assert a.shape == (500,) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(gen.sample(fitted, 1, spec, seed=0).arrays[0], result.arrays[0])

    # a chunk cut at the tensor's end
    tail = SampleSpec(examples.shape, chunk_region(examples.shape, parse_size("2KB"), 6000))
    assert gen.sample(fitted, 1, tail, seed=0).arrays[0].shape == (144,)

    # each tile draws its own noise, so a chunk is that run of the whole sample (up to the
    # rounding of a convolution over a batch of another size)
    whole = gen.sample(fitted, 2, SampleSpec(examples.shape), seed=0).arrays
    for part, w in zip(result.arrays, whole, strict=True):
        np.testing.assert_allclose(part, w.reshape(-1)[100:600], rtol=1e-4, atol=1e-5 * float(np.abs(w).max()))


def test_two_tensors_never_share_noise(fitted: State, examples: Examples) -> None:
    """The same networks under another tensor name (two alike tensors of one group) draw other
    noise: version 1 gave them the same sample."""
    gen = TileDiffusion()
    spec = SampleSpec(examples.shape)
    (a,) = gen.sample(fitted, 1, spec, seed=0).arrays
    (b,) = gen.sample(replace(fitted, tensor="another.tensor"), 1, spec, seed=0).arrays
    assert not np.allclose(a, b)


@pytest.mark.parametrize(
    "shape, chunk",
    [
        ((64, 96), Chunk(100, 500)),  # rows 1-6: whole tile row
        ((64, 96), Chunk(97, 10)),  # inside one row
        ((64, 96), Chunk(90, 12)),  # the end of row 0 and the start of row 1
        ((64, 96), Chunk(15 * 96 + 40, 96)),  # rows 15 and 16: two tile rows, partly
        ((64, 96), Chunk(6000, 144)),  # the tensor's last values
        ((3, 50), Chunk(20, 100)),  # one tile row, padded
        ((1000,), Chunk(17, 400)),  # 1-D: a single padded row
        ((5, 4, 10), Chunk(33, 60)),  # N-D: seen as 5 x 40
    ],
)
def test_chunk_tiles_and_assembly(shape: tuple[int, ...], chunk: Chunk) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    enc = encode(x, 16)
    index = td._covering(enc.layout, chunk)

    # exactly the tiles that hold an element of the chunk, by brute force
    cols = enc.shape2d[1]
    rows_of, cols_of = np.divmod(np.arange(chunk.offset, chunk.stop), cols)
    expected = np.unique((rows_of // 16) * enc.layout.grid[1] + cols_of // 16)
    np.testing.assert_array_equal(index, expected)

    # assembling those tiles gives back the chunk's values
    out = td._assemble(enc.layout, index, enc.tiles[index], SampleSpec(shape, chunk))
    scale = float(np.abs(x).max())
    np.testing.assert_allclose(out, x.reshape(-1)[chunk.offset : chunk.stop], atol=1e-6 * scale)


def test_state_round_trip_samples_the_same(fitted: State, examples: Examples) -> None:
    loaded = state_from_bytes(state_to_bytes(fitted))
    assert loaded.info == fitted.info and set(loaded.arrays) == set(fitted.arrays)
    gen = TileDiffusion()
    spec = SampleSpec(examples.shape)
    np.testing.assert_array_equal(
        gen.sample(loaded, 1, spec, seed=1).arrays[0], gen.sample(fitted, 1, spec, seed=1).arrays[0]
    )


def test_fit_is_reproducible(examples: Examples) -> None:
    config = TINY | {"ae_train_steps": 5, "unet_train_steps": 5}
    first, again = (TileDiffusion().fit(examples, config) for _ in range(2))
    assert state_to_bytes(again) == state_to_bytes(first)


def test_out_of_memory_batch_is_redone_on_cpu(
    fitted: State, examples: Examples, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first batch fails as a GPU out of memory would; the CPU copy of the networks redoes
    # it from the same noise, so the sample is the one drawn without the failure.
    spec = SampleSpec(examples.shape)
    clean = TileDiffusion().sample(fitted, 1, spec, seed=5).arrays[0]
    denoise = td._Models.denoise
    failed: list[bool] = []

    def fail_once(self: td._Models, *args: object) -> np.ndarray:
        if not failed:
            failed.append(True)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return denoise(self, *args)

    monkeypatch.setattr(td._Models, "denoise", fail_once)
    with pytest.warns(UserWarning, match="out of GPU memory.*redoing them on the CPU"):
        result = TileDiffusion().sample(fitted, 1, spec, seed=5)
    assert result.devices == ["cpu->cpu"]
    np.testing.assert_array_equal(result.arrays[0], clean)


def test_pixel_space(examples: Examples) -> None:
    config = TINY | {"use_latent": False, "unet_train_steps": 10}
    gen = TileDiffusion()
    state = gen.fit(examples, config)
    assert not any(k.startswith("ae.") for k in state.arrays) and "residual_std" not in state.arrays
    a = gen.sample(state, 1, SampleSpec(examples.shape), seed=0).arrays[0]
    assert a.shape == (64, 96) and a.dtype == np.float32 and np.isfinite(a).all()


@pytest.mark.parametrize(
    "config, match",
    [
        ({"tile": 16, "downsample": 3}, "power of two"),
        ({"tile": 20, "downsample": 8}, "power of two that divides tile 20"),
        ({"tile": 16, "block_out_channels": (8, 16, 32, 64)}, "halves its 4-pixel input 3 times"),
        ({"block_out_channels": (12, 24)}, "norm_groups 8 must divide"),
        ({"sample_steps": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_configs(config: dict, match: str, examples: Examples) -> None:
    with pytest.raises(WeightsmithError, match=match):
        TileDiffusion().fit(examples, config)


def test_other_shapes_are_refused(fitted: State) -> None:
    with pytest.raises(WeightsmithError, match=r"samples the examples' shape \(64, 96\)"):
        TileDiffusion().sample(fitted, 1, SampleSpec((96, 64)), seed=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(fitted: State, examples: Examples) -> None:
    gen = TileDiffusion(device="cuda")
    spec = SampleSpec(examples.shape)
    result = gen.sample(fitted, 2, spec, seed=0)
    assert result.devices == ["cuda:0", "cuda:0"]
    for a in result.arrays:
        assert a.shape == (64, 96) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(gen.sample(fitted, 1, spec, seed=0).arrays[0], result.arrays[0])
    state = gen.fit(examples, TINY)  # fitting runs on the GPU too
    assert gen.sample(state, 1, spec, seed=0).devices == ["cuda:0"]


def test_easy_examples_stop_at_a_plateau_before_the_cap() -> None:
    # a smooth ramp: both networks learn it within a few dozen steps, then stop improving
    rows, cols = np.meshgrid(np.linspace(-1, 1, 32), np.linspace(-1, 1, 48), indexing="ij")
    easy = Examples("ramp", (0.02 * (rows + 0.5 * cols))[None].astype(np.float32))  # (1, 32, 48)
    config = {
        **TINY,
        "batch_size": 8,
        "ae_min_steps": 400,
        "ae_train_steps": 400,
        "unet_min_steps": 400,
        "unet_train_steps": 400,
        "eval_every": 5,
        "patience": 2,
        "min_delta": 0.05,
    }
    state = TileDiffusion().fit(easy, config)
    for net in ("ae_fit", "unet_fit"):
        fit = state.info[net]
        assert fit["budget"] == 400 and fit["stopped"] == "plateau" and fit["steps"] < 400, (net, fit)
        assert fit["best_step"] <= fit["steps"] and math.isfinite(fit["val_loss"])
    # without early stopping the same fit runs its whole budget, and says so
    state = TileDiffusion().fit(easy, {**config, "early_stop": False, "ae_train_steps": 20, "unet_train_steps": 20})
    assert state.info["unet_fit"]["stopped"] == "cap" and state.info["unet_fit"]["steps"] == 20
    assert state.info["unet_fit"]["val_loss"] is None
    json.dumps(state.info, allow_nan=False)  # the store writes strict JSON (no NaN)


def test_the_budget_grows_with_the_distinct_crops() -> None:
    from weightsmith.generators.budget import budget

    assert budget(10, 0.5, floor=8, cap=100) == 8  # the floor
    assert budget(100, 0.5, floor=8, cap=100) == 50  # in between: crops x passes / batch
    assert budget(10_000, 0.5, floor=8, cap=100) == 100  # the cap
    assert budget(10, 0.5, floor=200, cap=100) == 100  # a cap below the floor wins


def test_each_part_of_a_stack_keeps_its_own_scale() -> None:
    # a LayerNorm-like weight (near 1, spread 0.01) stacked with a bias-like part (near 0, spread
    # 0.5), as a joint fit or a role pack gives them: fitted on one scale, the weight's samples
    # land tens of its own stds from every example; normalised apart, a few at most
    rng = np.random.default_rng(0)
    k, n = 4, 64
    weight = 1.0 + 0.01 * rng.standard_normal((k, n))
    bias = 0.5 * rng.standard_normal((k, n))
    stack = Examples("ln.weight + ln.bias", np.stack([weight, bias], axis=1).astype(np.float32), parts=("w", "b"))
    spec = SampleSpec(stack.shape)

    def weight_novelty(state: State) -> float:
        """The weight part's RMS distance to its nearest example, in its examples' std, over 4 samples."""
        samples = TileDiffusion().sample(state, 4, spec, seed=0).arrays
        return max(float(np.sqrt(((s[0] - weight) ** 2).mean(axis=1).min())) / float(weight.std()) for s in samples)

    apart = TileDiffusion().fit(stack, TINY)
    shared = TileDiffusion().fit(stack, {**TINY, "normalise_parts": False})
    centers = [z["center"] for z in apart.info["part_normalizers"]]
    assert centers[0] == pytest.approx(1.0, abs=0.01) and centers[1] == pytest.approx(0.0, abs=0.2)
    assert "part_normalizers" not in shared.info
    near, far = weight_novelty(apart), weight_novelty(shared)
    assert near < 5 and far > 3 * near, (near, far)

    # a chunk across the two parts is that run of the whole sample, each value on its part's scale
    chunk = Chunk(offset=40, size=60)
    part = TileDiffusion().sample(apart, 1, SampleSpec(stack.shape, chunk), seed=0).arrays[0]
    whole = TileDiffusion().sample(apart, 1, spec, seed=0).arrays[0]
    np.testing.assert_allclose(part, whole.reshape(-1)[40:100], rtol=1e-4, atol=1e-5)
