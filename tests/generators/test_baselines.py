"""Tests for the baseline generators and the shared interface (weightsmith.generators.base).

Examples are real trained tensors (a Stable Diffusion UNet LoRA); zoos are a tensor plus
seven small perturbations of it (K = 8). The tiny MiniCPM3 checkpoint, whose tensors are all
zeros or ones, covers constant tensors. Everything runs on CPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from weightsmith.codec import chunk_region
from weightsmith.errors import WeightsmithError
from weightsmith.generators import (
    BASELINES,
    GENERATORS,
    ZOO_BASELINES,
    Examples,
    SampleSpec,
    State,
    get,
    state_from_bytes,
    state_to_bytes,
)

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
CONSTANT = "safetensors/ollama_minicpm3_4b_model.safetensors"
_BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora"
MATRIX = f"{_BLOCK}.up.weight"  # (320, 4)
WIDE = f"{_BLOCK}.down.weight"  # (4, 320)
K = 8


@pytest.fixture(scope="module")
def tensors(fixtures_dir: Path) -> dict[str, np.ndarray]:
    return load_file(fixtures_dir / LORA)


def zoo(name: str, tensor: np.ndarray, k: int = K, seed: int = 0) -> Examples:
    """The tensor and k - 1 copies perturbed by 5% of its std."""
    rng = np.random.default_rng(seed)
    std = float(tensor.std()) or 1.0
    copies = [tensor] + [tensor + 0.05 * std * rng.standard_normal(tensor.shape) for _ in range(k - 1)]
    return Examples.stack(name, copies)


def examples_for(generator: str, tensors: dict[str, np.ndarray], name: str = MATRIX) -> Examples:
    one = Examples.stack(name, [tensors[name]])
    return zoo(name, tensors[name]) if generator in ZOO_BASELINES else one


def test_registry_lists_the_baselines() -> None:
    assert set(BASELINES) | set(ZOO_BASELINES) <= set(GENERATORS)
    for name in GENERATORS:
        assert get(name).name == name
    with pytest.raises(WeightsmithError, match="unknown.*gaussian, permute, noise"):
        get("no-such")


@pytest.mark.parametrize("generator", BASELINES + ZOO_BASELINES)
@pytest.mark.parametrize("name", [MATRIX, WIDE])
def test_fit_and_sample(generator: str, name: str, tensors: dict[str, np.ndarray]) -> None:
    gen = get(generator)()
    examples = examples_for(generator, tensors, name)
    state = gen.fit(examples)
    assert state.generator == generator and state.shape == examples.shape
    assert state.checkpoints == examples.k and state.tensor == name

    spec = SampleSpec(examples.shape)
    first = gen.sample(state, 3, spec, seed=7)
    assert len(first.arrays) == 3 and first.devices == ["cpu"] * 3 and first.seed == 7
    for a in first.arrays:
        assert a.shape == examples.shape and a.dtype == np.float32
        assert np.isfinite(a).all()
    # samples differ from each other (the average of 2 of 8 can repeat, rarely)
    if generator != "average":
        assert not np.array_equal(first.arrays[0], first.arrays[1])

    # reproducible for a seed, different for another; sample i does not depend on n
    again = gen.sample(state, 2, spec, seed=7)
    for a, b in zip(again.arrays, first.arrays, strict=False):
        np.testing.assert_array_equal(a, b)
    other = gen.sample(state, 3, spec, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(other.arrays, first.arrays, strict=True))

    # the state survives bytes: same samples from the stored copy
    stored = state_from_bytes(state_to_bytes(state))
    assert stored.fingerprint == state.fingerprint and stored.config == state.config
    assert stored.shape == state.shape and stored.info == state.info
    for a, b in zip(gen.sample(stored, 3, spec, seed=7).arrays, first.arrays, strict=True):
        np.testing.assert_array_equal(a, b)

    # a chunk of the tensor: a 1-D run; other chunks with the same seed get other values
    c1 = chunk_region(examples.shape, 4 * 30, 10)
    c2 = chunk_region(examples.shape, 4 * 30, 50)
    part = gen.sample(state, 2, SampleSpec(examples.shape, c1), seed=7)
    assert [a.shape for a in part.arrays] == [(30,), (30,)]
    assert all(a.dtype == np.float32 and np.isfinite(a).all() for a in part.arrays)
    part2 = gen.sample(state, 1, SampleSpec(examples.shape, c2), seed=7)
    assert not np.array_equal(part.arrays[0], part2.arrays[0])


@pytest.mark.parametrize("generator", BASELINES + ZOO_BASELINES)
def test_fingerprint_follows_inputs(generator: str, tensors: dict[str, np.ndarray]) -> None:
    gen = get(generator)()
    examples = examples_for(generator, tensors)
    fp = gen.fingerprint(examples)
    assert fp == gen.fingerprint(Examples(examples.name, examples.values.copy()))
    assert fp == gen.fit(examples).fingerprint
    changed = examples.values.copy()
    changed.reshape(-1)[123] += 1e-3
    assert gen.fingerprint(Examples(examples.name, changed)) != fp
    assert gen.fingerprint(Examples("other.name", examples.values)) != fp
    options = {"noise": {"radius": 0.5}, "pca-gaussian": {"components": 3}, "average": {"k": 3}}
    if generator in options:
        assert gen.fingerprint(examples, options[generator]) != fp
        assert gen.fingerprint(examples, gen.Config(**options[generator])) != fp
    other = next(n for n in BASELINES if n != generator)
    assert get(other)().fingerprint(examples) != fp


@pytest.mark.parametrize("generator", ZOO_BASELINES)
def test_zoo_baselines_refuse_one_checkpoint(generator: str, tensors: dict[str, np.ndarray]) -> None:
    with pytest.raises(WeightsmithError, match=f"{generator} needs at least 2 checkpoints, got 1"):
        get(generator)().fit(Examples.stack(MATRIX, [tensors[MATRIX]]))


def test_gaussian_matches_moments_and_any_shape(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[MATRIX]
    gen = get("gaussian")()
    state = gen.fit(Examples.stack(MATRIX, [x]))
    (a,) = gen.sample(state, 1, SampleSpec((300, 200)), seed=0).arrays
    assert a.shape == (300, 200)  # per-tensor moments fit any target shape
    assert float(a.mean()) == pytest.approx(float(x.mean()), abs=0.02 * float(x.std()))
    assert float(a.std()) == pytest.approx(float(x.std()), rel=0.02)


def test_permute_is_a_permutation(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[MATRIX]
    gen = get("permute")()
    (a,) = gen.sample(gen.fit(Examples.stack(MATRIX, [x])), 1, SampleSpec(x.shape), seed=0).arrays
    np.testing.assert_array_equal(np.sort(a, axis=None), np.sort(x, axis=None))
    assert not np.array_equal(a, x)


def test_noise_radius_is_in_std_units(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[MATRIX]
    examples = Examples.stack(MATRIX, [x])
    gen = get("noise")()
    (same,) = gen.sample(gen.fit(examples, {"radius": 0.0}), 1, SampleSpec(x.shape), seed=0).arrays
    np.testing.assert_array_equal(same, x)
    (a,) = gen.sample(gen.fit(examples, {"radius": 0.3}), 1, SampleSpec(x.shape), seed=0).arrays
    assert float((a - x).std() / x.std()) == pytest.approx(0.3, rel=0.08)
    chunk = chunk_region(x.shape, 4 * 100, 250)
    (part,) = gen.sample(gen.fit(examples, {"radius": 0.0}), 1, SampleSpec(x.shape, chunk), 0).arrays
    np.testing.assert_array_equal(part, x.reshape(-1)[250:350])


def test_coord_gaussian_follows_each_coordinate(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("coord-gaussian")()
    arrays = gen.sample(gen.fit(examples), 200, SampleSpec(examples.shape), seed=0).arrays
    draws = np.stack(arrays)  # (200, 320, 4)
    mean, std = examples.values.mean(0), examples.values.std(0, ddof=1)
    standard_error = std / np.sqrt(len(arrays))
    assert np.abs((draws.mean(0) - mean) / standard_error).max() < 5
    assert float(np.median(draws.std(0) / std)) == pytest.approx(1.0, abs=0.05)


def test_pca_gaussian_stays_in_the_zoo_span(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("pca-gaussian")()
    state = gen.fit(examples, {"components": 100})
    assert state.arrays["components"].shape == (K - 1, examples.numel)  # q capped at K - 1
    assert state.info["components"] == K - 1
    np.testing.assert_allclose(state.arrays["components"] @ state.arrays["components"].T, np.eye(K - 1), atol=1e-4)
    flat = examples.flat().astype(np.float64)
    centered = flat - flat.mean(0)
    (a,) = gen.sample(state, 1, SampleSpec(examples.shape), seed=0).arrays
    d = a.reshape(-1) - flat.mean(0)
    coef, *_ = np.linalg.lstsq(centered.T, d, rcond=None)
    assert np.linalg.norm(centered.T @ coef - d) < 1e-4 * np.linalg.norm(d)
    # fewer components, and identical checkpoints (no spread at all)
    assert get("pca-gaussian")().fit(examples, {"components": 2}).arrays["components"].shape[0] == 2
    state = gen.fit(Examples.stack(MATRIX, [tensors[MATRIX]] * 3))
    assert state.arrays["components"].shape == (0, examples.numel)
    (a,) = gen.sample(state, 1, SampleSpec(examples.shape), seed=0).arrays
    np.testing.assert_array_equal(a, tensors[MATRIX])


def test_average_of_all_is_the_mean(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("average")()
    (a,) = gen.sample(gen.fit(examples, {"k": K}), 1, SampleSpec(examples.shape), seed=3).arrays
    np.testing.assert_allclose(a, examples.values.mean(0), atol=1e-6)
    with pytest.raises(WeightsmithError, match="k=9 needs that many checkpoints, got 8"):
        gen.fit(examples, {"k": 9})


def test_bad_inputs_are_user_errors(tensors: dict[str, np.ndarray]) -> None:
    x = tensors[MATRIX]
    examples = Examples.stack(MATRIX, [x])
    noise = get("noise")()
    with pytest.raises(WeightsmithError, match="noise radius"):
        noise.fit(examples, {"radius": -1.0})
    with pytest.raises(WeightsmithError, match="noise radius2"):
        noise.fit(examples, {"radius2": 1.0})
    state = noise.fit(examples)
    with pytest.raises(WeightsmithError, match=r"samples the examples' shape \(320, 4\)"):
        noise.sample(state, 1, SampleSpec((10, 128)), seed=0)
    with pytest.raises(WeightsmithError, match="state of noise v1 given to permute"):
        get("permute")().sample(state, 1, SampleSpec(x.shape), seed=0)
    with pytest.raises(WeightsmithError, match="at least 1"):
        noise.sample(state, 0, SampleSpec(x.shape), seed=0)
    with pytest.raises(WeightsmithError, match="non-negative"):
        noise.sample(state, 1, SampleSpec(x.shape), seed=-1)
    with pytest.raises(WeightsmithError, match="outside the tensor"):
        SampleSpec((10,), chunk_region((100,), 40, 95))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(WeightsmithError, match="NaN or Inf"):
        noise.fit(Examples.stack(MATRIX, [bad]))
    with pytest.raises(WeightsmithError, match="differ in shape"):
        Examples.stack(MATRIX, [x, x[:50]])
    with pytest.raises(WeightsmithError, match="not a weightsmith generator state"):
        state_from_bytes(b"not an npz")


def test_state_bytes_are_not_pickled(tensors: dict[str, np.ndarray]) -> None:
    gen = get("pca-gaussian")()
    state = gen.fit(zoo(MATRIX, tensors[MATRIX]), {"components": 3})
    data = state_to_bytes(state)
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        assert set(npz.files) == {"__state__", "mean", "components", "variances"}
    assert state_to_bytes(state_from_bytes(data)) == data  # deterministic bytes
    back = state_from_bytes(data)
    for key, a in state.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], a)
        assert back.arrays[key].dtype == a.dtype


@pytest.mark.parametrize("generator", BASELINES + ZOO_BASELINES)
def test_constant_tensors(generator: str, fixtures_dir: Path) -> None:
    """All-zero and all-one tensors (std 0) give finite samples; baselines reproduce them."""
    for name, x in load_file(fixtures_dir / CONSTANT).items():
        one = Examples.stack(name, [x])
        examples = Examples.stack(name, [x] * 3) if generator in ZOO_BASELINES else one
        gen = get(generator)()
        (a,) = gen.sample(gen.fit(examples), 1, SampleSpec(x.shape), seed=0).arrays
        np.testing.assert_array_equal(a, x)


def test_state_arrays_may_have_any_name() -> None:
    """Array names such as a torch state dict's keys (or savez's own argument names) are kept."""
    state = State(
        generator="x",
        version=1,
        config={},
        tensor="t",
        shape=(2,),
        checkpoints=1,
        fingerprint="f",
        arrays={
            "file": np.ones(2),
            "allow_pickle": np.int64(3),
            "unet.conv_in.weight": np.zeros((2, 3)),
        },
        info={"loss": [0.5, 0.25]},
    )
    back = state_from_bytes(state_to_bytes(state))
    assert back.info == state.info and set(back.arrays) == set(state.arrays)
    for key, a in state.arrays.items():
        np.testing.assert_array_equal(back.arrays[key], a)
