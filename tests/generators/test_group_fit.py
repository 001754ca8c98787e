"""Group fits: zoo-diffusion fits tensors of any shapes as one object (`group_examples`), so a
sample's tensors come from one latent; its latent width and latent noise follow the zoo.

Library level on small synthetic zoos whose structure is known (a few shared factors), then
`predict --joint` end to end on a real tiny GPT-2 with a zoo of one MLP block and its LayerNorm.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_zoo_diffusion import TINY  # the same small networks as zoo-diffusion's own tests

from weightsmith.codec import chunk_region
from weightsmith.demo import SIZES, build_gpt2
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.generators import Examples, SampleSpec, get, state_from_bytes
from weightsmith.generators.base import group_examples, split_group
from weightsmith.model import parse_model_url
from weightsmith.predict import PredictOptions, _examples, plan_fits, predict, read_values, select
from weightsmith.store import arrays
from weightsmith.zoo import write_zoo

K, R = 24, 3  # members, shared factors
SHAPES = {"ln": (6,), "a": (12, 6), "b": (6, 20)}


def factor_zoo(k: int = K, rank: int = R, seed: int = 0) -> tuple[dict[str, Examples], dict[str, np.ndarray]]:
    """A LayerNorm near 1 and two matrices near 0, all moved by the same `rank` factors per member:
    piece = base + sum_i f_ki dir_i. Returns the examples and each piece's (base, dirs)."""
    rng = np.random.default_rng(seed)
    f = rng.standard_normal((k, rank))
    parts = {
        "ln": (1 + 0.05 * rng.standard_normal(SHAPES["ln"]), 0.01 * rng.standard_normal((rank, *SHAPES["ln"]))),
        "a": (0.02 * rng.standard_normal(SHAPES["a"]), 0.01 * rng.standard_normal((rank, *SHAPES["a"]))),
        "b": (0.02 * rng.standard_normal(SHAPES["b"]), 0.01 * rng.standard_normal((rank, *SHAPES["b"]))),
    }
    examples = {n: Examples(n, base + np.tensordot(f, dirs, axes=1)) for n, (base, dirs) in parts.items()}
    return examples, parts


def test_a_group_of_mixed_shapes_fits_and_splits_back_exactly() -> None:
    ex, _ = factor_zoo()
    group = group_examples([ex["ln"], ex["a"], ex["b"]])
    assert group.shape == (6 + 72 + 120,) and group.parts == ("ln", "a", "b") and group.sizes == (6, 72, 120)
    assert group.offsets == [0, 6, 78, 198]
    for k in (0, 17):  # the members themselves split back exactly
        pieces = split_group(group.values[k], group.offsets, list(SHAPES.values()))
        for piece, name in zip(pieces, SHAPES, strict=True):
            np.testing.assert_array_equal(piece, ex[name].values[k])

    gen = get("zoo-diffusion")()
    state = gen.fit(group, TINY)
    assert state.parts == ("ln", "a", "b") and state.shape == (198,) and state.info["pieces"] == 3
    draws = gen.sample(state, 3, SampleSpec(group.shape), seed=0).arrays
    for d in draws:
        pieces = split_group(d, group.offsets, list(SHAPES.values()))
        assert [p.shape for p in pieces] == list(SHAPES.values())
        assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in pieces)
    # a chunk across two pieces is that run of the whole sample (each piece de-normalised on its own)
    chunk = gen.sample(state, 3, SampleSpec(group.shape, chunk_region(group.shape, 4 * 20, 70)), seed=0).arrays
    for c, whole in zip(chunk, draws, strict=True):
        np.testing.assert_allclose(c, whole[70:90], rtol=1e-5, atol=1e-6)

    # a group is not a stack: another fingerprint than the same-shape stacks had
    stack = Examples("a + a", np.stack([ex["a"].values, ex["a"].values], axis=1), parts=("a", "a"))
    pair = group_examples([ex["a"], ex["a"]], "a + a")
    assert gen.fingerprint(pair, TINY) != gen.fingerprint(stack, TINY)
    # generators that do not fit groups refuse one (their noise streams assume a same-shape stack)
    assert not get("tile-diffusion").fits_groups and not get("gaussian").fits_groups
    with pytest.raises(WeightsmithError, match="gaussian fits one tensor or a same-shape stack, not a group"):
        get("gaussian")().fit(group)
    with pytest.raises(WeightsmithError, match="different checkpoint counts"):
        group_examples([ex["a"], factor_zoo(k=5)[0]["b"]])


def test_a_samples_pieces_come_from_one_latent() -> None:
    # b is a fixed linear function of a in every member (both are moved by the same 3 factors):
    # recover a sample's factors from its a, predict its b, and measure how far the drawn b is
    ex, parts = factor_zoo()
    (a0, da), (b0, db) = parts["a"], parts["b"]
    spread_b = float(np.linalg.norm(ex["b"].values - ex["b"].values.mean(0), axis=(1, 2)).mean())

    def mismatch(a: np.ndarray, b: np.ndarray) -> float:
        f = np.linalg.lstsq(da.reshape(R, -1).T, (a - a0).reshape(-1), rcond=None)[0]
        return float(np.linalg.norm(b - b0 - np.tensordot(f, db, axes=1))) / spread_b

    gen, n = get("zoo-diffusion")(), 12
    group = group_examples([ex["a"], ex["b"]])
    drawn = gen.sample(gen.fit(group, TINY), n, SampleSpec(group.shape), seed=0).arrays
    together = [mismatch(*split_group(d, group.offsets, [SHAPES["a"], SHAPES["b"]])) for d in drawn]
    # fitted apart (as per-shape stacks were), with the same sampling seed
    alone = {name: gen.sample(gen.fit(ex[name], TINY), n, SampleSpec(SHAPES[name]), seed=0).arrays for name in "ab"}
    apart = [mismatch(a, b) for a, b in zip(alone["a"], alone["b"], strict=True)]
    assert max(together) < 1e-3, together  # measured ~2e-7: exactly one member of the family
    assert float(np.median(apart)) > 0.3, apart  # measured ~0.9: a and b of different members


def test_each_piece_is_normalised_on_its_own_scale() -> None:
    # a LayerNorm weight near 1 moving by 1e-4 and a matrix near 0 moving by 1e-2, along two
    # independent factors: one shared mean/std would leave the LayerNorm's factor with ~1e-5 of
    # the variance, below latent_variance, and its variation would be lost
    rng = np.random.default_rng(1)
    f = rng.standard_normal((K, 2))
    ln = 1 + 1e-4 * f[:, :1] * rng.standard_normal(64)  # (K, 64)
    mat = 0.02 * rng.standard_normal((32, 16)) + 1e-2 * f[:, 1, None, None] * rng.standard_normal((32, 16))
    group = group_examples([Examples("ln", ln), Examples("mat", mat)])
    gen = get("zoo-diffusion")()
    state = gen.fit(group, TINY)
    norm = state.arrays["norm"]
    assert norm.shape == (2, 2) and state.arrays["norm.sizes"].tolist() == [64, 512]
    assert norm[0, 0] == pytest.approx(1, abs=1e-3) and abs(norm[1, 0]) < 1e-2  # each piece's own mean
    assert state.info["latent"] == 2 and state.info["explained_variance"][1] > 0.2

    drawn = np.stack(gen.sample(state, 16, SampleSpec(group.shape), seed=0).arrays)  # (16, D)
    for name, cols, zoo in (("ln", slice(0, 64), ln), ("mat", slice(64, None), mat.reshape(K, -1))):
        got = drawn[:, cols]
        zoo_spread = float(np.linalg.norm(zoo - zoo.mean(0), axis=1).mean())
        got_spread = float(np.linalg.norm(got - zoo.mean(0), axis=1).mean())
        assert 0.3 * zoo_spread < got_spread < 3 * zoo_spread, (name, got_spread, zoo_spread)
        nearest = np.linalg.norm(got[:, None] - zoo[None], axis=-1).min(1)
        assert float(np.median(nearest)) < 0.5 * zoo_spread, (name, nearest, zoo_spread)


def test_latent_width_is_what_the_zoo_supports() -> None:
    gen = get("zoo-diffusion")()
    rng = np.random.default_rng(2)
    # a zoo on a 2-D subspace (plus noise of 1e-3 of its spread): every direction is a component,
    # two hold > 99% of the variance
    base, dirs = rng.standard_normal(300), rng.standard_normal((2, 300))
    flat = base + rng.standard_normal((K, 2)) @ dirs + 1e-3 * rng.standard_normal((K, 300))
    state = gen.fit(Examples("plane", flat), TINY)
    info = state.info
    assert info["components"] == K - 1 and len(info["explained_variance"]) == K - 1
    assert info["latent"] == 2 and info["latent_explained"] > 0.99
    assert sum(info["explained_variance"]) == pytest.approx(1.0)
    assert info["latent_explained"] == pytest.approx(sum(info["explained_variance"][:2]))
    assert state.arrays["latent_mean"].shape == (2,)
    # a higher threshold asks for more (noise) components, up to max_latent
    assert gen.fit(Examples("plane", flat), {**TINY, "latent_variance": 1.0}).info["latent"] == TINY["max_latent"]

    # 4 members in general position need 3 components, but if the nets train on 3 (one held out:
    # min_held_out=1) L = K_train - 1 = 2; trained on all 4 (the default for so small a zoo): L = 3
    four = Examples("four", rng.standard_normal((4, 50)))
    held = gen.fit(four, {**TINY, "min_held_out": 1}).info
    assert held["held_out"] == 1 and held["components"] == 3 and held["latent"] == 2
    assert held["latent_explained"] < 0.99
    assert gen.fit(four, TINY).info["held_out"] == 0  # one held-out member is too few to stop on
    assert gen.fit(four, {**TINY, "early_stop": False}).info["latent"] == 3


def test_latent_noise_is_a_fraction_of_the_latents_spread() -> None:
    ex, _ = factor_zoo()
    gen = get("zoo-diffusion")()
    infos = {noise: gen.fit(ex["a"], {**TINY, "latent_noise": noise}).info for noise in (0.1, 0.3)}
    for noise, info in infos.items():
        assert info["latent_std"] > 0 and info["latent_noise_abs"] == pytest.approx(noise * info["latent_std"])
    # the encoder's scale is its own (not ~1): an absolute noise would not follow it
    assert any(abs(info["latent_std"] - 1) > 0.2 for info in infos.values()), infos


# -- predict --joint ------------------------------------------------------------------------

BLOCK = (
    "transformer.h.0.ln_2.weight",
    "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight",
    "transformer.h.0.mlp.c_proj.bias",
)


@pytest.fixture(scope="module")
def block_zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    """A tiny GPT-2 and a zoo of 6 members of its h.0 MLP block (the model moved along 3 factors)."""
    root = tmp_path_factory.mktemp("group")
    folder = build_gpt2(root / "gpt", *SIZES["tiny"])  # 2 layers x 64
    url = extract(str(folder), ExtractOptions(store=str(root / "store"), images="none")).model_url
    model = parse_model_url(url)
    rng = np.random.default_rng(3)
    f = rng.standard_normal((6, 3))
    zoo = {}
    for name in BLOCK:
        x = read_values(model, model.manifest()["tensors"][name])
        scale = 0.05 * (float(x.std()) or 1.0)
        zoo[name] = x + np.tensordot(f, scale * rng.standard_normal((3, *x.shape)), axes=1)
    write_zoo(model.store, "block", zoo, overwrite=True)
    return url, zoo


def test_predict_joint_fits_a_block_as_one_group(block_zoo: tuple[str, dict[str, np.ndarray]]) -> None:
    torch.set_num_threads(1)
    url, zoo = block_zoo
    model = parse_model_url(url)
    layer = ("transformer.h.0.ln_2.*", "transformer.h.0.mlp.*")
    options = PredictOptions(
        layer=layer, generator="zoo-diffusion", config=TINY, zoo="block", joint=True, images="none", samples=2
    )
    records = select(model.manifest(), layer)
    names = tuple(r["name"] for r in records)  # manifest order
    assert sorted(names) == sorted(BLOCK)
    assert [u.names for u in plan_fits(url, options)] == [names]  # one fit
    result = predict(url, options)
    facts = model.store.read_json(model.key("predictions", result.run_id, "prediction.json"))
    entries = facts["tensors"]
    assert tuple(entries) == names
    assert len({e["generator_state"] for e in entries.values()}) == 1
    assert all(tuple(e["fitted_with"]) == names and e["examples"]["k"] == 6 for e in entries.values())
    state = state_from_bytes(model.store.read_bytes(entries[names[0]]["generator_state"]))
    sizes = [int(np.prod(zoo[n].shape[1:])) for n in names]
    assert state.parts == names and state.shape == (sum(sizes),)
    assert state.arrays["norm.sizes"].tolist() == sizes
    assert state.info["latent"] <= 6 - 1 - state.info["held_out"]  # at most K_train - 1
    # every sample of every tensor has its shape, and a sample's tensors are one draw: its
    # pieces, concatenated, are the state's sample i
    draws = get("zoo-diffusion")().sample(state, 2, SampleSpec(state.shape), seed=0).arrays
    for name, entry in entries.items():
        values = np.asarray(arrays.open_array(model.store, entry["zarr"])[...])
        assert values.shape == (2, *zoo[name].shape[1:])
        j = names.index(name)
        lo = sum(sizes[:j])
        for i in range(2):
            np.testing.assert_array_equal(values[i].reshape(-1), draws[i][lo : lo + sizes[j]])

    # tile-diffusion keeps its same-shape stacks under joint (it needs 2-D tiles): the three
    # (64,) vectors together, each other shape alone
    tile = PredictOptions(layer=layer, generator="tile-diffusion", zoo="block", joint=True, images="none")
    by_shape: dict[tuple, list[str]] = {}
    for r in records:
        by_shape.setdefault(tuple(r["shape"]), []).append(r["name"])
    assert sorted(u.names for u in plan_fits(url, tile)) == sorted(tuple(v) for v in by_shape.values())
    assert len(by_shape) == 4 and len(by_shape[(64,)]) == 3
    # the group's examples are one flat vector per member; a stack's are not
    vectors = [r for r in records if tuple(r["shape"]) == (64,)]
    grouped, stacked = _examples(model, vectors, "block", True, True), _examples(model, vectors, "block", True)
    assert grouped.values.shape == (6, 3 * 64) and grouped.sizes == (64, 64, 64)
    assert stacked.values.shape == (6, 3, 64) and not stacked.sizes
    gen = get("zoo-diffusion")()
    assert gen.fingerprint(grouped, TINY) != gen.fingerprint(stacked, TINY)
    np.testing.assert_array_equal(grouped.values, stacked.values.reshape(6, -1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_group_fitted_on_cpu_samples_on_cuda() -> None:
    ex, _ = factor_zoo()
    group = group_examples([ex["ln"], ex["a"], ex["b"]])
    state = get("zoo-diffusion")().fit(group, TINY)
    cpu = get("zoo-diffusion")().sample(state, 3, SampleSpec(group.shape), seed=0).arrays
    result = get("zoo-diffusion")(device="cuda").sample(state, 3, SampleSpec(group.shape), seed=0)
    assert result.devices == ["cuda:0"] * 3
    for a, b in zip(result.arrays, cpu, strict=True):  # per-piece de-normalisation on the GPU
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))
