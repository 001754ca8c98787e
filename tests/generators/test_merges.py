"""The merge baselines `task-arithmetic` and `ties` against hand-computed cases, their member
subsets, chunks that agree with whole samples, and the base they need."""

from __future__ import annotations

import numpy as np
import pytest

from weightsmith.codec import Chunk
from weightsmith.errors import WeightsmithError
from weightsmith.generators import Examples, SampleSpec, get
from weightsmith.generators.registry import GENERATORS, MERGE_BASELINES
from weightsmith.generators.task_arithmetic import SWEEP as TA_SWEEP
from weightsmith.generators.task_arithmetic import subset
from weightsmith.generators.ties import SWEEP as TIES_SWEEP

BASE = np.array([1.0, 2.0, 3.0, 1.0], np.float32)
DELTAS = np.array(
    [
        [3.0, -1.0, 0.5, -2.0],
        [-1.0, -4.0, 1.0, 2.5],
        [2.0, 1.0, -3.0, 0.125],
    ],
    np.float32,
)


def examples() -> Examples:
    return Examples("w", BASE[None] + DELTAS, base=BASE)


def one(generator: str, config: dict, seed: int = 0) -> np.ndarray:
    gen = get(generator)()
    return gen.sample(gen.fit(examples(), config), 1, SampleSpec((4,)), seed).arrays[0]


def test_registered() -> None:
    assert set(MERGE_BASELINES) <= set(GENERATORS)
    assert {None, 0.5, 1.0} == {c["scale"] for c in TA_SWEEP} and {2, 4, None} == {c["k"] for c in TA_SWEEP}
    assert {0.2, 0.5} == {c["density"] for c in TIES_SWEEP}


def test_task_arithmetic_by_hand() -> None:
    # all three members: base + scale * (3 - 1 + 2, -1 - 4 + 1, 0.5 + 1 - 3, -2 + 2.5 + 0.125)
    total = np.array([4.0, -4.0, -1.5, 0.625])
    np.testing.assert_allclose(one("task-arithmetic", {"scale": 1.0}), BASE + total, rtol=1e-6)
    np.testing.assert_allclose(one("task-arithmetic", {"scale": 0.5}), BASE + 0.5 * total, rtol=1e-6)
    np.testing.assert_allclose(one("task-arithmetic", {}), BASE + total / 3, rtol=1e-6)  # 1/k: the average


def test_ties_by_hand() -> None:
    # density 0.5 keeps 2 of 4 per member: [3, 0, 0, -2], [0, -4, 0, 2.5], [2, 0, -3, 0]
    # elected signs (+, -, -, +); agreeing means: (3 + 2) / 2, -4, -3, 2.5 (member 0's -2 disagrees)
    np.testing.assert_allclose(one("ties", {"density": 0.5}), BASE + [2.5, -4.0, -3.0, 2.5], rtol=1e-6)
    # density 1 keeps all: sums (4, -4, -1.5, 0.625) -> means (2.5, -2.5, -3, (2.5 + 0.125) / 2)
    np.testing.assert_allclose(one("ties", {"density": 1.0}), BASE + [2.5, -2.5, -3.0, 1.3125], rtol=1e-6)
    np.testing.assert_allclose(
        one("ties", {"density": 1.0, "scale": 0.5}), BASE + 0.5 * np.array([2.5, -2.5, -3.0, 1.3125]), rtol=1e-6
    )
    # density 0.2 keeps max(1, int(0.8)) = 1 each: 3, -4, -3 in different places
    np.testing.assert_allclose(one("ties", {"density": 0.2}), BASE + [3.0, -4.0, -3.0, 0.0], rtol=1e-6)


def test_ties_sign_tie_is_positive() -> None:
    base = np.zeros(2, np.float32)
    ex = Examples("w", np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32), base=base)
    gen = get("ties")()
    got = gen.sample(gen.fit(ex, {"density": 1.0}), 1, SampleSpec((2,)), 0).arrays[0]
    np.testing.assert_array_equal(got, [1.0, 0.0])  # the sum 0 elects +: member 0's +1 alone


@pytest.mark.parametrize("generator", ["task-arithmetic", "ties"])
def test_subsets_chunks_and_seeds(generator: str) -> None:
    rng = np.random.default_rng(0)
    k_total, shape = 6, (5, 8)
    base = rng.standard_normal(shape).astype(np.float32)
    values = base[None] + rng.standard_normal((k_total, *shape)).astype(np.float32)
    ex = Examples("w", values, base=base)
    gen = get(generator)()
    state = gen.fit(ex, {"k": 2})
    spec = SampleSpec(shape)
    samples = gen.sample(state, 6, spec, seed=3).arrays
    chosen = [tuple(subset(k_total, 2, 3, i)) for i in range(6)]
    assert len(set(chosen)) > 1  # samples merge different members
    for i, members in enumerate(chosen):
        alone = get(generator)()
        sub = Examples("w", values[list(members)], base=base)
        want = alone.sample(alone.fit(sub, {}), 1, spec, seed=0).arrays[0]
        np.testing.assert_allclose(samples[i], want, rtol=1e-6, atol=1e-6)
    # a chunk of a sample is that part of the whole sample (the same members, the same threshold)
    part = gen.sample(state, 6, SampleSpec(shape, Chunk(offset=7, size=20)), seed=3).arrays
    for whole, piece in zip(samples, part, strict=True):
        np.testing.assert_array_equal(whole.reshape(-1)[7:27], piece)
    assert gen.sample(state, 6, spec, seed=3).arrays[0].tobytes() == samples[0].tobytes()


def test_merges_need_a_base_and_enough_members() -> None:
    for generator in ("task-arithmetic", "ties"):
        gen = get(generator)()
        with pytest.raises(WeightsmithError, match="build the zoo with --base"):
            gen.fit(Examples("w", DELTAS), {})
        with pytest.raises(WeightsmithError, match="k=4 needs that many members, got 3"):
            gen.fit(examples(), {"k": 4})
    with pytest.raises(WeightsmithError, match="base of shape"):
        Examples("w", DELTAS, base=np.zeros(3))
    # the base is part of the fingerprint: another base is another fit
    gen = get("ties")()
    assert gen.fingerprint(examples()) != gen.fingerprint(Examples("w", BASE[None] + DELTAS, base=BASE + 1))
    assert gen.fingerprint(Examples("w", DELTAS)) == get("ties")().fingerprint(Examples("w", DELTAS.copy()))
