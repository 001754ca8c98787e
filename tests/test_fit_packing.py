"""Which tensors a prediction fits together (`fit_batches`), and that packed fits split back exactly.

Generators that train fit small tensors of one role (the name without its layer index) and
shape together by default; baselines fit each tensor alone. Real tiny GPT-2, real local store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.extract import ExtractOptions, extract
from weightsmith.generators import state_from_bytes
from weightsmith.model import parse_model_url
from weightsmith.predict import (
    FitUnit,
    PredictOptions,
    _examples,
    fit_batches,
    fit_unit,
    largest_first,
    plan_fits,
    predict,
    read_values,
    role,
    select,
    split_sample,
)
from weightsmith.store import arrays

# tile-diffusion at its smallest: a fit takes a second or two
TINY_TILE = {
    "tile": 16,
    "ae_channels": 8,
    "block_out_channels": [8, 16],
    "ae_train_steps": 10,
    "unet_train_steps": 10,
    "batch_size": 8,
    "sample_steps": 2,
}


@pytest.fixture(scope="module")
def model_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("packing")
    folder = build_gpt2(root / "gpt", *SIZES["tiny"])  # 2 layers x 64
    return extract(str(folder), ExtractOptions(store=str(root / "store"), images="none")).model_url


def _names(batches: list[list[dict]]) -> list[list[str]]:
    return [[r["name"] for r in b] for b in batches]


def test_role_drops_the_layer_index() -> None:
    assert role("transformer.h.11.ln_1.weight") == "transformer.h.{i}.ln_1.weight"
    assert role("model.layers.3.mlp.experts.7.w1") == "model.layers.{i}.mlp.experts.{i}.w1"
    assert role("transformer.ln_f.weight") == "transformer.ln_f.weight"
    assert role("h2.attn.weight") == "h2.attn.weight"  # a digit inside a name is no index


def test_role_packing_groups_small_tensors_of_one_role_and_shape() -> None:
    def rec(name: str, *shape: int) -> dict:
        return {"name": name, "shape": list(shape)}

    records = [
        rec("h.0.ln_1.weight", 64),
        rec("h.0.ln_1.bias", 64),
        rec("h.0.attn.weight", 64, 192),
        rec("h.0.big.weight", 1024, 1024),  # 4 MiB: above pack_bytes, alone
        rec("h.1.ln_1.weight", 64),
        rec("h.1.ln_1.bias", 64),
        rec("h.1.attn.weight", 64, 192),
        rec("h.1.big.weight", 1024, 1024),
        rec("h.2.ln_1.weight", 32),  # same role, other shape: its own pack
        rec("ln_f.weight", 64),  # same shape, other role
    ]
    assert _names(fit_batches(records, joint=False, pack_bytes=1 << 20)) == [
        ["h.0.ln_1.weight", "h.1.ln_1.weight"],
        ["h.0.ln_1.bias", "h.1.ln_1.bias"],
        ["h.0.attn.weight", "h.1.attn.weight"],
        ["h.0.big.weight"],
        ["h.1.big.weight"],
        ["h.2.ln_1.weight"],
        ["ln_f.weight"],
    ]
    # a pack holds at most pack_bytes: two 256-byte vectors per pack here
    many = [rec(f"h.{i}.ln.weight", 64) for i in range(5)]
    assert _names(fit_batches(many, joint=False, pack_bytes=512)) == [
        ["h.0.ln.weight", "h.1.ln.weight"],
        ["h.2.ln.weight", "h.3.ln.weight"],
        ["h.4.ln.weight"],
    ]
    # pack_bytes 0: each alone; joint: every tensor of one shape, whatever its role and size
    assert _names(fit_batches(records, joint=False)) == [[r["name"]] for r in records]
    assert _names(fit_batches(records, joint=True))[0] == [
        "h.0.ln_1.weight",
        "h.0.ln_1.bias",
        "h.1.ln_1.weight",
        "h.1.ln_1.bias",
        "ln_f.weight",
    ]


def test_packed_examples_split_back_exactly(model_url: str) -> None:
    model = parse_model_url(model_url)
    records = select(model.manifest(), ("transformer.h.*.ln_1.weight", "transformer.h.*.attn.c_attn.weight"))
    for joint in (False, True):
        for batch in fit_batches(records, joint=joint, pack_bytes=1 << 20):
            assert len(batch) == 2  # the two layers of each role (and of each shape)
            examples = _examples(model, batch, None, joint)
            rows = batch[0]["shape"][0]
            # vectors: one row per layer; matrices: rows stacked (role) or a new axis (joint)
            expected = {1: (2, rows), 2: (2 * rows, 192) if not joint else (2, rows, 192)}[len(batch[0]["shape"])]
            assert examples.shape == expected
            for j, record in enumerate(batch):
                np.testing.assert_array_equal(split_sample(examples.values[0], batch, j), read_values(model, record))


def test_generators_that_train_pack_by_role_baselines_do_not(model_url: str) -> None:
    torch.set_num_threads(1)
    model = parse_model_url(model_url)
    layer = ("transformer.h.*.ln_1.*", "transformer.h.*.attn.c_proj.weight")
    options = PredictOptions(
        layer=layer, generator="tile-diffusion", config=TINY_TILE, images="none", device="cpu", samples=2
    )
    units = [
        FitUnit(("transformer.h.0.ln_1.weight", "transformer.h.1.ln_1.weight")),
        FitUnit(("transformer.h.0.ln_1.bias", "transformer.h.1.ln_1.bias")),
        FitUnit(("transformer.h.0.attn.c_proj.weight", "transformer.h.1.attn.c_proj.weight")),
    ]
    assert sorted(plan_fits(model_url, options), key=units.index) == units
    assert plan_fits(model_url, options)[0] == units[2]  # the largest fit first (workers finish together)
    # a fit made as its own unit (as the flow's tasks do) is the state predict then finds
    first = fit_unit(model_url, options, units[0], threads=1)
    assert not first.reused
    result = predict(model_url, options)
    facts = model.store.read_json(model.key("predictions", result.run_id, "prediction.json"))
    entries = facts["tensors"]
    assert len(entries) == 6 and len({e["generator_state"] for e in entries.values()}) == 3
    for unit in units:
        for name in unit.names:
            assert entries[name]["fitted_with"] == list(unit.names)
    assert entries[units[0].names[0]]["reused_state"] is True  # fitted by fit_unit above
    assert entries[units[2].names[0]]["reused_state"] is False
    matrices = state_from_bytes(model.store.read_bytes(entries[units[2].names[0]]["generator_state"]))
    assert matrices.shape == (128, 64) and matrices.tensor == " + ".join(units[2].names)  # rows stacked
    for e in entries.values():
        values = np.asarray(arrays.open_array(model.store, e["zarr"])[...])
        assert values.shape == (2, *e["shape"]) and np.isfinite(values).all()
    a, b = (np.asarray(arrays.open_array(model.store, entries[n]["zarr"])[...]) for n in units[0].names)
    assert not np.array_equal(a, b)  # two layers' rows of one sample, not one row twice

    baseline = predict(model_url, options.model_copy(update={"generator": "gaussian", "config": {}}))
    facts = model.store.read_json(model.key("predictions", baseline.run_id, "prediction.json"))
    assert all(e["fitted_with"] == [name] for name, e in facts["tensors"].items())


def test_largest_fits_start_first() -> None:
    batches = [[{"shape": [4]}], [{"shape": [8, 8]}], [{"shape": [4]}, {"shape": [4]}], [{"shape": [2, 4]}]]
    assert largest_first(batches) == [batches[1], batches[2], batches[3], batches[0]]  # stable among equals
