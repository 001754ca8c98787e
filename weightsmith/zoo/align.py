"""Permutation alignment of MLP hidden units, so independently initialised runs line up.

Two networks that differ only by a permutation of an MLP's hidden units compute the same
function: permuting the rows of the first projection (and its bias) and the matching columns
of the second leaves every output unchanged. Runs from independent initialisations that share
the residual basis (the same embeddings, or inputs and outputs fixed by the data) differ by such
permutations plus training noise, so a zoo of them mixes unit i of one run with an unrelated
unit i of another. Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", sec.
3.2) picks, per MLP block, the permutation of a member's units that maximises the summed inner
products with a reference member's units. With the residual basis shared, blocks do not
interact, so each block is one linear assignment problem, solved exactly by
`scipy.optimize.linear_sum_assignment`. Attention heads are not permuted.

The hidden-unit axis of each tensor of a block, by name suffix (`MLP_AXES`):
    GPT-2 (Conv1D, weights stored (in, out)):  c_fc.weight (d, h) -> axis 1, c_fc.bias (h,) -> 0,
                                               c_proj.weight (h, d) -> axis 0
    Llama-style (Linear, weights (out, in)):   gate_proj / up_proj weight (h, d) and bias -> axis 0,
                                               down_proj.weight (d, h) -> axis 1
The output biases (c_proj.bias, down_proj.bias) live in the residual basis and stay as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from weightsmith.errors import WeightsmithError

MLP_AXES = {
    "mlp.c_fc.weight": 1,
    "mlp.c_fc.bias": 0,
    "mlp.c_proj.weight": 0,
    "mlp.gate_proj.weight": 0,
    "mlp.gate_proj.bias": 0,
    "mlp.up_proj.weight": 0,
    "mlp.up_proj.bias": 0,
    "mlp.down_proj.weight": 1,
}


@dataclass(frozen=True)
class MlpBlock:
    """The selected tensors of one MLP that share its hidden units."""

    prefix: str  # e.g. "transformer.h.0." (everything before "mlp.")
    names: tuple[str, ...]  # tensor names, in selection order
    axes: tuple[int, ...]  # the hidden-unit axis of each tensor


def mlp_blocks(shapes: Mapping[str, tuple[int, ...]]) -> list[MlpBlock]:
    """The MLP blocks among the selected tensors (name -> shape), in the order they first appear.

    A block whose tensors disagree on the number of hidden units is a one-line error.
    """
    found: dict[str, list[tuple[str, int]]] = {}
    for name in shapes:
        for suffix, axis in MLP_AXES.items():
            if name == suffix or name.endswith("." + suffix):
                found.setdefault(name[: len(name) - len(suffix)], []).append((name, axis))
    blocks = []
    for prefix, members in found.items():
        sizes = {shapes[n][a] if len(shapes[n]) > a else None for n, a in members}
        if len(sizes) != 1 or None in sizes:
            detail = ", ".join(f"{n} {tuple(shapes[n])}" for n, _ in members)
            raise WeightsmithError(f"{prefix}mlp", f"tensors disagree on the number of hidden units: {detail}")
        blocks.append(MlpBlock(prefix, tuple(n for n, _ in members), tuple(a for _, a in members)))
    return blocks


def _units(values: np.ndarray, axis: int) -> np.ndarray:
    """(h, rest): one row per hidden unit."""
    return np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)


def match_units(reference: Iterable[np.ndarray], member: Iterable[np.ndarray], axes: Iterable[int]) -> np.ndarray:
    """The permutation of the member's hidden units that best matches the reference's.

    Args:
        reference: the reference member's tensors of one block.
        member: the member's tensors of the same block, same shapes.
        axes: the hidden-unit axis of each tensor.

    Returns:
        perm (h,) int64: the member's unit perm[i] goes to position i.
    """
    cost = None
    for ref, mem, axis in zip(reference, member, axes, strict=True):
        # 1. similarity of reference unit i and member unit j, summed over the block: (h, h)
        sim = _units(np.asarray(ref, np.float64), axis) @ _units(np.asarray(mem, np.float64), axis).T
        cost = sim if cost is None else cost + sim
    assert cost is not None, "a block has at least one tensor"
    # 2. the assignment maximising the total similarity (Hungarian / Jonker-Volgenant)
    rows, cols = linear_sum_assignment(cost, maximize=True)
    assert np.array_equal(rows, np.arange(len(rows)))
    return cols.astype(np.int64)


def permute(values: np.ndarray, axis: int, perm: np.ndarray) -> np.ndarray:
    """The tensor with its hidden units reordered: out[..., i, ...] = values[..., perm[i], ...]."""
    return np.take(values, perm, axis=axis)


def align_block(reference: list[np.ndarray], member: list[np.ndarray], axes: tuple[int, ...]) -> list[np.ndarray]:
    """The member's block tensors, permuted to match the reference."""
    perm = match_units(reference, member, axes)
    return [permute(v, a, perm) for v, a in zip(member, axes, strict=True)]
