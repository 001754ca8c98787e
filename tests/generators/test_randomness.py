"""Independent, reproducible randomness of samples (weightsmith.generators.base, SAMPLING_VERSION 2).

Two identical tensors under different names stand for two tensors of one group that happen to
be alike (the 18 LayerNorm tensors of the demo, which version 1 gave the same noise): each
baseline is fitted on each alone and sampled with the same seed, and the random part of their
samples must be uncorrelated. The tensor is one real trained LoRA matrix tiled to 200 x 200
(40,000 values), and zoos are it plus small perturbations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from weightsmith.codec import Chunk
from weightsmith.generators import Examples, SampleSpec, State, Streams, get
from weightsmith.generators.base import NOISE_BLOCK, sample_seed, standard_normal

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
UP = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.up.weight"  # (320, 4)
A, B = "model.layers.0.ln.weight", "model.layers.1.ln.weight"  # the two names of one tensor


@pytest.fixture(scope="module")
def tensor(fixtures_dir: Path) -> np.ndarray:
    x = load_file(fixtures_dir / LORA)[UP]  # (320, 4)
    return np.tile(x.reshape(-1), 32)[: 200 * 200].reshape(200, 200)


def zoo(name: str, x: np.ndarray, k: int, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    return Examples.stack(name, [x] + [x + 0.05 * float(x.std()) * rng.standard_normal(x.shape) for _ in range(k - 1)])


def _noise_part(generator: str, state: State, sample: np.ndarray) -> np.ndarray:
    """The random part of one sample, flat."""
    a = state.arrays
    x = sample.reshape(-1).astype(np.float64)
    if generator == "noise":  # K = 1: x - source
        return x - a["checkpoints"][0]
    if generator == "gaussian":
        return x - a["mean"][0, 0]
    if generator == "coord-gaussian":
        return (x - a["mean"]) / a["std"]
    if generator == "permute":  # the values themselves, in their drawn order
        return x - x.mean()
    assert generator == "pca-gaussian"  # the drawn coefficients, one per component
    return a["components"] @ (x - a["mean"]) / np.sqrt(a["variances"])


@pytest.mark.parametrize("generator", ["noise", "gaussian", "coord-gaussian", "permute", "pca-gaussian"])
def test_two_identical_tensors_get_independent_noise(generator: str, tensor: np.ndarray) -> None:
    gen = get(generator)()
    config = {"radius": 1.0} if generator == "noise" else {}
    if generator == "pca-gaussian":  # 100 coefficients per sample: 100 samples give 10,000
        config = {"components": 100}
        small = tensor[:50, :50]
        fits = [gen.fit(zoo(name, small, 101), config) for name in (A, B)]
        n, spec = 100, SampleSpec(small.shape)
    elif generator == "coord-gaussian":
        fits = [gen.fit(zoo(name, tensor, 4), config) for name in (A, B)]
        n, spec = 1, SampleSpec(tensor.shape)
    else:
        fits = [gen.fit(Examples.stack(name, [tensor]), config) for name in (A, B)]
        n, spec = 1, SampleSpec(tensor.shape)
    parts = []
    for state in fits:
        draws = gen.sample(state, n, spec, seed=11).arrays
        parts.append(np.concatenate([_noise_part(generator, state, d) for d in draws]))
    a, b = parts
    assert a.size >= 10_000 and a.std() > 0
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05
    # the same request again: bit-identical, from a fresh generator object
    again = get(generator)().sample(fits[0], n, spec, seed=11).arrays
    for x, y in zip(again, gen.sample(fits[0], n, spec, seed=11).arrays, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("generator", ["noise", "gaussian", "coord-gaussian", "permute", "pca-gaussian", "average"])
def test_a_chunk_is_the_slice_of_the_whole_draw(generator: str, tensor: np.ndarray) -> None:
    """Chunks equal the same run of the whole sample, bit for bit, also where they cross the
    boundaries of the noise blocks (the tensor is tiled to just over 3 blocks)."""
    big = np.tile(tensor.reshape(-1), 5)[: 3 * NOISE_BLOCK + 123]
    examples = zoo(A, big, 3) if generator in ("coord-gaussian", "pca-gaussian", "average") else Examples(A, big[None])
    gen = get(generator)()
    state = gen.fit(examples)
    whole = gen.sample(state, 2, SampleSpec(big.shape), seed=5).arrays
    for offset, size in [(0, 10), (NOISE_BLOCK - 7, 20), (NOISE_BLOCK + 3, 2 * NOISE_BLOCK), (big.size - 9, 9)]:
        part = gen.sample(state, 2, SampleSpec(big.shape, Chunk(offset, size)), seed=5).arrays
        for p, w in zip(part, whole, strict=True):
            np.testing.assert_array_equal(p, w[offset : offset + size])


def test_standard_normal_streams() -> None:
    whole = standard_normal(3, 0, A, 0, 2 * NOISE_BLOCK + 50)
    assert whole.dtype == np.float32 and whole.shape == (2 * NOISE_BLOCK + 50,)
    assert abs(float(whole.mean())) < 0.02 and float(whole.std()) == pytest.approx(1.0, abs=0.02)
    for start, stop in [(5, 9), (NOISE_BLOCK - 1, NOISE_BLOCK + 1), (10, 2 * NOISE_BLOCK + 50), (7, 7)]:
        np.testing.assert_array_equal(standard_normal(3, 0, A, start, stop), whole[start:stop])
    # another name, sample, seed or stream: another stream
    for other in [
        standard_normal(3, 0, B, 0, 1000),
        standard_normal(3, 1, A, 0, 1000),
        standard_normal(4, 0, A, 0, 1000),
    ]:
        assert abs(np.corrcoef(other, whole[:1000])[0, 1]) < 0.15
    assert not np.array_equal(standard_normal(3, 0, A, 0, 1000, stream="latent"), whole[:1000])
    # torch seeds: per sample, per tensor, 63 bits
    seeds = {sample_seed(0, 0), sample_seed(0, 1), sample_seed(1, 0), sample_seed(0, 0, A), sample_seed(0, 0, B)}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_per_sample_choices_are_shared_by_the_tensors_of_a_sample() -> None:
    spec = SampleSpec((10,))
    members = [Streams(7, i, (A,), spec).member(8) for i in range(40)]
    assert members == [Streams(7, i, (B,), SampleSpec((3, 4))).member(8) for i in range(40)]
    assert len(set(members)) > 4
    assert Streams(7, 0, (A,), spec).normal().tolist() != Streams(7, 0, (B,), spec).normal().tolist()


def test_a_joint_stack_gives_each_tensor_its_own_stream(tensor: np.ndarray) -> None:
    """Baselines fitted on a stack of two tensors (Examples.parts) draw for each exactly what a
    fit on that tensor alone draws; the same stack without part names draws other values."""
    for generator, k in [("noise", 1), ("gaussian", 1), ("coord-gaussian", 3)]:
        gen = get(generator)()
        alone = {
            name: zoo(name, tensor * s, k) if k > 1 else Examples(name, (tensor * s)[None])
            for name, s in [(A, 1), (B, 2)]
        }
        values = np.stack([alone[A].values, alone[B].values], axis=1)  # (k, 2, 200, 200)
        stack = Examples(f"{A} + {B}", values, parts=(A, B))
        joint = gen.sample(gen.fit(stack), 2, SampleSpec(stack.shape), seed=9).arrays
        for j, name in enumerate((A, B)):
            single = gen.sample(gen.fit(alone[name]), 2, SampleSpec(tensor.shape), seed=9).arrays
            for x, y in zip(joint, single, strict=True):
                np.testing.assert_allclose(x[j], y, rtol=1e-6, atol=1e-6)
        unnamed = gen.sample(gen.fit(Examples(stack.name, values)), 1, SampleSpec(stack.shape), seed=9).arrays
        assert not np.allclose(unnamed[0][0], joint[0][0])
        if generator != "gaussian":  # the random parts of the two tensors are uncorrelated
            a, b = (joint[0][j] - values[:, j].mean(0) for j in (0, 1))
            assert abs(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]) < 0.05
