"""Tests for the baseline generators and the shared interface (weightsmith.generators.base).

Examples are real trained tensors (a Stable Diffusion UNet LoRA); zoos are a tensor plus
seven small perturbations of it (K = 8). The tiny MiniCPM3 checkpoint, whose tensors are all
zeros or ones, covers constant tensors. Everything runs on CPU.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from weightsmith.codec import chunk_region
from weightsmith.errors import WeightsmithError
from weightsmith.generators import (
    BASELINES,
    GENERATORS,
    ORDERED_BASELINES,
    SWEEPS,
    ZOO_BASELINES,
    Examples,
    SampleSpec,
    State,
    get,
    state_from_bytes,
    state_to_bytes,
    zoo_baselines,
)

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
CONSTANT = "safetensors/ollama_minicpm3_4b_model.safetensors"
_BLOCK = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora"
MATRIX = f"{_BLOCK}.up.weight"  # (320, 4)
WIDE = f"{_BLOCK}.down.weight"  # (4, 320)
K = 8
ALL = BASELINES + ZOO_BASELINES + ORDERED_BASELINES
NEEDS_ZOO = ZOO_BASELINES + ORDERED_BASELINES
SAME_EVERY_SAMPLE = ("latest", "extrapolate")  # deterministic
FEW_OUTCOMES = ("average", "zoo-member")  # a choice among few members: two samples can repeat


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
    return zoo(name, tensors[name]) if generator in NEEDS_ZOO else one


def test_registry_lists_the_baselines() -> None:
    assert set(ALL) <= set(GENERATORS)
    for name in GENERATORS:
        assert get(name).name == name
    with pytest.raises(WeightsmithError, match="unknown.*gaussian, permute, noise"):
        get("no-such")


def test_zoo_baselines_plan_the_sweeps() -> None:
    runs = zoo_baselines(8, ordered=True)
    assert [(r.generator, r.config) for r in runs] == [
        ("coord-gaussian", {}),
        ("pca-gaussian", {"scale": 0.5}),
        ("pca-gaussian", {"scale": 1.0}),
        ("pca-gaussian", {"scale": 2.0}),
        ("average", {"k": 2}),
        ("average", {"k": 4}),
        ("average", {"k": "all"}),
        ("zoo-member", {}),
        ("latest", {}),
        ("extrapolate", {"t": 0.1}),
        ("extrapolate", {"t": 0.3}),
        ("extrapolate", {"t": 1.0}),
    ]
    assert [r.deterministic for r in runs] == [False] * 6 + [True, False] + [True] * 4
    for r in runs:  # every planned config is valid for its generator
        assert get(r.generator)().config(r.config).model_dump(include=set(r.config)) == r.config
    assert set(SWEEPS) <= set(ZOO_BASELINES + ORDERED_BASELINES)
    # unordered zoos get no trajectory baselines; averages of k >= K members are the mean
    small = [(r.generator, r.config) for r in zoo_baselines(3, ordered=False)]
    assert ("latest", {}) not in small and ("average", {"k": 4}) not in small and ("average", {"k": 2}) in small
    assert [r.config for r in zoo_baselines(2, ordered=False) if r.generator == "average"] == [{"k": "all"}]
    assert zoo_baselines(1, ordered=True) == []


@pytest.mark.parametrize("generator", ALL)
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
    # samples differ from each other (a choice among 8 members can repeat)
    if generator not in SAME_EVERY_SAMPLE + FEW_OUTCOMES:
        assert not np.array_equal(first.arrays[0], first.arrays[1])

    # reproducible for a seed, different for another; sample i does not depend on n
    again = gen.sample(state, 2, spec, seed=7)
    for a, b in zip(again.arrays, first.arrays, strict=False):
        np.testing.assert_array_equal(a, b)
    other = gen.sample(state, 3, spec, seed=8)
    if generator not in SAME_EVERY_SAMPLE:
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
    # each chunk is exactly that run of the whole sample
    part2 = gen.sample(state, 2, SampleSpec(examples.shape, c2), seed=7)
    for a, b, whole in zip(part.arrays, part2.arrays, first.arrays, strict=False):
        np.testing.assert_array_equal(a, whole.reshape(-1)[10:40])
        np.testing.assert_array_equal(b, whole.reshape(-1)[50:80])


@pytest.mark.parametrize("generator", ALL)
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
    options = {
        "noise": {"radius": 0.5},
        "pca-gaussian": {"components": 3, "scale": 2.0},
        "average": {"k": 3},
        "extrapolate": {"t": 1.0},
    }
    if generator in options:
        assert gen.fingerprint(examples, options[generator]) != fp
        assert gen.fingerprint(examples, gen.Config(**options[generator])) != fp
    other = next(n for n in BASELINES if n != generator)
    assert get(other)().fingerprint(examples) != fp


@pytest.mark.parametrize("generator", NEEDS_ZOO)
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
    state = gen.fit(examples, {"k": "all"})
    draws = gen.sample(state, 2, SampleSpec(examples.shape), seed=0).arrays
    for a in draws:
        np.testing.assert_allclose(a, examples.values.mean(0), atol=1e-6)
    assert gen.deterministic({"k": "all"}, K) and gen.deterministic({"k": K}, K)
    assert not gen.deterministic({"k": 2}, K)
    with pytest.raises(WeightsmithError, match="average k"):
        gen.fit(examples, {"k": "most"})


def test_average_of_k_averages_k_members(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("average")()
    state = gen.fit(examples, {"k": 4})
    flat = examples.flat().astype(np.float64)
    subsets = [np.array(c) for c in itertools.combinations(range(K), 4)]
    for a in gen.sample(state, 5, SampleSpec(examples.shape), seed=1).arrays:
        errors = [np.abs(a.reshape(-1) - flat[c].mean(0)).max() for c in subsets]
        assert min(errors) < 1e-6  # the mean of exactly one subset of 4 members


def test_zoo_member_copies_a_member_chosen_per_sample(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("zoo-member")()
    draws = gen.sample(gen.fit(examples), 24, SampleSpec(examples.shape), seed=0).arrays
    chosen = []
    for a in draws:
        (hits,) = np.nonzero([np.array_equal(a, m) for m in examples.values])
        assert hits.size == 1
        chosen.append(int(hits[0]))
    assert len(set(chosen)) >= 4  # different members, not one
    # the member is a per-sample choice: another tensor's sample i copies the same member
    other = zoo("other.weight", tensors[MATRIX] * 2 + 1)
    again = gen.sample(gen.fit(other), 24, SampleSpec(other.shape), seed=0).arrays
    for a, k in zip(again, chosen, strict=True):
        np.testing.assert_array_equal(a, other.values[k])


def test_zoo_member_in_order_copies_member_i_for_sample_i(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("zoo-member")()
    state = gen.fit(examples, {"pick": "in-order"})
    draws = gen.sample(state, examples.k + 1, SampleSpec(examples.shape), seed=5).arrays
    for i, a in enumerate(draws):  # every member once, in order, whatever the seed; then round again
        np.testing.assert_array_equal(a, examples.values[i % examples.k])


def test_latest_and_extrapolate_follow_the_run(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    first, last = examples.values[0].astype(np.float64), examples.values[-1].astype(np.float64)
    latest = get("latest")()
    assert latest.ordered and latest.deterministic(None, K)
    (a,) = latest.sample(latest.fit(examples), 1, SampleSpec(examples.shape), seed=5).arrays
    np.testing.assert_array_equal(a, examples.values[-1])
    extrapolate = get("extrapolate")()
    assert extrapolate.ordered and extrapolate.deterministic({"t": 0.3}, K)
    for t in (0.0, 0.3, 1.0):
        (b,) = extrapolate.sample(extrapolate.fit(examples, {"t": t}), 1, SampleSpec(examples.shape), seed=5).arrays
        np.testing.assert_allclose(b, last + t * (last - first), rtol=1e-6, atol=1e-7)
    with pytest.raises(WeightsmithError, match="extrapolate t"):
        extrapolate.fit(examples, {"t": -1.0})


def test_pca_gaussian_scale_scales_the_spread(tensors: dict[str, np.ndarray]) -> None:
    examples = zoo(MATRIX, tensors[MATRIX])
    gen = get("pca-gaussian")()
    mean = examples.values.mean(0)
    spread = {}
    for scale in (0.0, 0.5, 2.0):
        draws = gen.sample(gen.fit(examples, {"scale": scale}), 3, SampleSpec(examples.shape), seed=4).arrays
        spread[scale] = [float(np.linalg.norm(a - mean)) for a in draws]
    assert max(spread[0.0]) < 1e-5 and gen.deterministic({"scale": 0.0}, K)
    # the same z: scale 2 goes four times as far as scale 0.5, sample by sample
    np.testing.assert_allclose(spread[2.0], [4 * d for d in spread[0.5]], rtol=1e-4)


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
    with pytest.raises(WeightsmithError, match="state of noise v2 given to permute"):
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


@pytest.mark.parametrize("generator", ALL)
def test_constant_tensors(generator: str, fixtures_dir: Path) -> None:
    """All-zero and all-one tensors (std 0) give finite samples; baselines reproduce them."""
    for name, x in load_file(fixtures_dir / CONSTANT).items():
        one = Examples.stack(name, [x])
        examples = Examples.stack(name, [x] * 3) if generator in NEEDS_ZOO else one
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
