"""Permutation alignment: an aligned member computes the same function, a permuted copy is
recovered exactly, and alignment brings two independently trained models closer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import gpt2, llama, logits, state, store_model

from weightsmith.errors import WeightsmithError
from weightsmith.store import Store
from weightsmith.zoo import read_zoo, read_zoo_tensor
from weightsmith.zoo.align import MLP_AXES, match_units, mlp_blocks, permute
from weightsmith.zoo.build import ZooOptions, build_zoo

pytestmark = pytest.mark.usefixtures("one_thread", "state_in_tmp")


def mlp_names(values: dict[str, np.ndarray]) -> list[str]:
    return [n for n in values if any(n.endswith(s) for s in MLP_AXES)]


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_an_aligned_member_computes_the_same_function(tmp_path: Path, make) -> None:
    store = str(tmp_path / "store")
    reference, member = make(0), make(1)
    ref_values, member_values = state(reference), state(member)
    urls = [store_model(v, tmp_path / "src", n, store) for n, v in (("a", ref_values), ("b", member_values))]
    build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), align="permutation"))
    manifest = read_zoo(Store(store), "z")
    assert manifest["align"] == "permutation" and [m["url"] for m in manifest["members"]] == urls

    aligned = {n: read_zoo_tensor(Store(store), "z", n)[1] for n in member_values}
    names = mlp_names(member_values)
    assert len(names) == 6  # two layers of three MLP tensors
    assert any(not np.array_equal(aligned[n], member_values[n]) for n in names), "alignment permuted nothing"
    for n in set(member_values) - set(names):  # everything else is the member as it was
        np.testing.assert_array_equal(aligned[n], member_values[n])
    np.testing.assert_array_equal(read_zoo_tensor(Store(store), "z", names[0])[0], ref_values[names[0]])

    tokens = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    before = logits(member, member_values, tokens)
    after = logits(member, aligned, tokens)
    assert np.abs(after - before).max() <= 1e-5 * np.abs(before).max()
    # and the check can fail: the unaligned member's MLP in the reference's order is another function
    mixed = {**member_values, **{n: aligned[n] for n in names if n.endswith(("c_fc.weight", "gate_proj.weight"))}}
    assert np.abs(logits(member, mixed, tokens) - before).max() > 1e-3 * np.abs(before).max()


def test_align_to_matches_a_model_outside_the_zoo(tmp_path: Path) -> None:
    """Held-out models aligned to a zoo's member 0 (--align-to): every member, the first too, is
    permuted to the outside model's order of units, and computes what it computed before."""
    store = str(tmp_path / "store")
    values = [state(gpt2(seed)) for seed in (0, 1, 2)]
    urls = [store_model(v, tmp_path / "src", f"m{i}", store) for i, v in enumerate(values)]
    build_zoo(ZooOptions(zoo_id="gold", models=tuple(urls[1:]), align="permutation", align_to=urls[0]))
    manifest = read_zoo(Store(store), "gold")
    assert manifest["align_to"]["url"] == urls[0] and manifest["checkpoints"] == 2
    names = mlp_names(values[0])
    stacks = {n: read_zoo_tensor(Store(store), "gold", n) for n in names}
    build_zoo(ZooOptions(zoo_id="self", models=tuple(urls[1:]), align="permutation"))  # to their own first
    alone = {n: read_zoo_tensor(Store(store), "self", n) for n in names}
    assert any(not np.array_equal(stacks[n][0], values[1][n]) for n in names), "member 0 was not aligned"
    assert any(not np.array_equal(stacks[n], alone[n]) for n in names)
    model, tokens = gpt2(1), torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(5))
    aligned = {**values[1], **{n: stacks[n][0] for n in names}}
    before = logits(model, values[1], tokens)
    assert np.abs(logits(model, aligned, tokens) - before).max() <= 1e-5 * np.abs(before).max()
    with pytest.raises(WeightsmithError, match="needs --align permutation"):
        build_zoo(ZooOptions(zoo_id="bad", models=tuple(urls[1:]), align_to=urls[0]))


def test_a_permuted_copy_is_recovered_exactly() -> None:
    rng = np.random.default_rng(0)
    fc, bias, proj = rng.standard_normal((8, 24)), rng.standard_normal(24), rng.standard_normal((24, 8))
    perm = rng.permutation(24)
    shuffled = [permute(fc, 1, perm), permute(bias, 0, perm), permute(proj, 0, perm)]
    found = match_units([fc, bias, proj], shuffled, (1, 0, 0))
    np.testing.assert_array_equal(permute(shuffled[0], 1, found), fc)
    np.testing.assert_array_equal(permute(shuffled[2], 0, found), proj)


def test_blocks_and_their_errors() -> None:
    shapes = {
        "h.0.mlp.c_fc.weight": (8, 32),
        "h.0.mlp.c_fc.bias": (32,),
        "h.0.mlp.c_proj.weight": (32, 8),
        "h.0.mlp.c_proj.bias": (8,),
        "h.0.attn.c_attn.weight": (8, 24),
        "model.layers.3.mlp.down_proj.weight": (8, 40),
        "model.layers.3.mlp.up_proj.weight": (40, 8),
    }
    blocks = mlp_blocks(shapes)
    assert [(b.prefix, b.names, b.axes) for b in blocks] == [
        ("h.0.", ("h.0.mlp.c_fc.weight", "h.0.mlp.c_fc.bias", "h.0.mlp.c_proj.weight"), (1, 0, 0)),
        ("model.layers.3.", ("model.layers.3.mlp.down_proj.weight", "model.layers.3.mlp.up_proj.weight"), (1, 0)),
    ]
    with pytest.raises(WeightsmithError, match=r"h\.0\.mlp: tensors disagree on the number of hidden units"):
        mlp_blocks({"h.0.mlp.c_fc.weight": (8, 32), "h.0.mlp.c_proj.weight": (31, 8)})


def _train(seed: int, x: torch.Tensor, y: torch.Tensor, hidden: int = 32, steps: int = 300) -> dict[str, np.ndarray]:
    """A one-hidden-layer MLP fitted to (x, y) from its own initialisation, in GPT-2 Conv1D layout."""
    torch.manual_seed(seed)
    fc, proj = torch.nn.Linear(x.shape[1], hidden), torch.nn.Linear(hidden, y.shape[1])
    opt = torch.optim.Adam([*fc.parameters(), *proj.parameters()], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(proj(torch.nn.functional.gelu(fc(x))), y)
        loss.backward()
        opt.step()
    return {
        "h.0.mlp.c_fc.weight": fc.weight.detach().numpy().T.copy(),  # (in, hidden): Conv1D
        "h.0.mlp.c_fc.bias": fc.bias.detach().numpy().copy(),
        "h.0.mlp.c_proj.weight": proj.weight.detach().numpy().T.copy(),  # (hidden, out)
        "h.0.mlp.c_proj.bias": proj.bias.detach().numpy().copy(),
    }


def test_alignment_brings_independent_runs_closer(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    with torch.no_grad():
        y = teacher(x)
    a, b = _train(1, x, y), _train(2, x, y)
    store = str(tmp_path / "store")
    urls = [store_model(v, tmp_path / "src", n, store) for n, v in (("a", a), ("b", b))]
    build_zoo(ZooOptions(zoo_id="plain", models=tuple(urls)))
    build_zoo(ZooOptions(zoo_id="aligned", models=tuple(urls), align="permutation"))

    def distance(zoo: str) -> float:
        stacks = [read_zoo_tensor(Store(store), zoo, n) for n in a if "c_proj.bias" not in n]
        return float(np.sqrt(sum(((s[0] - s[1]) ** 2).sum() for s in stacks)))

    plain, aligned = distance("plain"), distance("aligned")
    print(f"distance between the two runs' MLP tensors: {plain:.3f} unaligned, {aligned:.3f} aligned")
    assert aligned < 0.9 * plain
