"""Predict on a local store with a tiny real GPT-2: one fit per tensor, or (joint) one fit per
shape with the tensors stacked, split back into each tensor's own entry.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.generators import SAMPLING_VERSION, state_from_bytes
from weightsmith.model import parse_model_url
from weightsmith.predict import PredictOptions, fit_batches, predict, read_values, zoo_is_ordered
from weightsmith.store import arrays
from weightsmith.zoo import write_zoo

LAYER_NORMS = ("transformer.h.*.ln_*", "transformer.ln_f.*")  # 10 vectors of one shape (64,)
ATTENTION = ("transformer.h.*.attn.c_attn.weight",)  # 2 matrices (64, 192) of random values


@pytest.fixture(scope="module")
def model_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("predict")
    folder = build_gpt2(root / "gpt", *SIZES["tiny"])
    return extract(str(folder), ExtractOptions(store=str(root / "store"), images="none")).model_url


def _run(url: str, **kw) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """prediction.json and each tensor's samples."""
    options = PredictOptions(**{"images": "none", "device": "cpu", **kw})
    result = predict(url, options)
    model = parse_model_url(url)
    facts = model.store.read_json(model.key("predictions", result.run_id, "prediction.json"))
    values = {
        name: list(np.asarray(arrays.open_array(model.store, e["zarr"])[...])) for name, e in facts["tensors"].items()
    }
    return facts, values


def test_fit_batches_group_by_shape_in_first_seen_order() -> None:
    records = [{"name": "a", "shape": [4]}, {"name": "m", "shape": [2, 3]}, {"name": "b", "shape": [4]}]
    assert [[r["name"] for r in b] for b in fit_batches(records, joint=False)] == [["a"], ["m"], ["b"]]
    assert [[r["name"] for r in b] for b in fit_batches(records, joint=True)] == [["a", "b"], ["m"]]


def test_joint_fits_once_per_shape_and_splits_samples(model_url: str) -> None:
    model = parse_model_url(model_url)
    facts, values = _run(model_url, layer=LAYER_NORMS, generator="permute", samples=2)
    names = list(facts["tensors"])
    assert len(names) == 10 and facts["options"]["joint"] is False
    assert len({e["generator_state"] for e in facts["tensors"].values()}) == 10  # one fit each

    joint_facts, joint_values = _run(model_url, layer=LAYER_NORMS, generator="permute", samples=2, joint=True)
    entries = joint_facts["tensors"]
    assert list(entries) == names
    assert len({e["generator_state"] for e in entries.values()}) == 1  # one fit for all ten
    assert all(e["fitted_with"] == names for e in entries.values())
    state = state_from_bytes(model.store.read_bytes(entries[names[0]]["generator_state"]))
    assert state.shape == (10, 64) and state.tensor == " + ".join(names)

    originals = {n: read_values(model, model.manifest()["tensors"][n]) for n in names}
    for i in range(2):
        # per tensor: each sample is a permutation of its own tensor (weights stay 1, biases 0);
        # jointly: values move between tensors, and all of them together are a permutation.
        for n in names:
            assert values[n][i].shape == joint_values[n][i].shape == originals[n].shape
            assert np.array_equal(np.sort(values[n][i]), np.sort(originals[n]))
        assert any(not np.array_equal(np.sort(joint_values[n][i]), np.sort(originals[n])) for n in names)
        together = np.concatenate([joint_values[n][i] for n in names])
        assert np.array_equal(np.sort(together), np.sort(np.concatenate(list(originals.values()))))


def test_joint_of_one_tensor_is_the_plain_fit(model_url: str) -> None:
    name = "transformer.h.0.mlp.c_fc.weight"
    _, plain = _run(model_url, layer=(name,), generator="noise", config={"radius": 0.3}, seed=3)
    facts, joint = _run(model_url, layer=(name,), generator="noise", config={"radius": 0.3}, seed=3, joint=True)
    assert facts["tensors"][name]["fitted_with"] == [name]
    assert all(np.array_equal(a, b) for a, b in zip(plain[name], joint[name], strict=True))


def test_noise_is_each_tensors_own_and_the_examples_are_recorded(model_url: str) -> None:
    model = parse_model_url(model_url)
    facts, plain = _run(model_url, layer=ATTENTION, generator="noise", config={"radius": 1.0}, seed=2)
    assert facts["sampling"] == SAMPLING_VERSION
    names = list(facts["tensors"])
    originals = {n: read_values(model, model.manifest()["tensors"][n]) for n in names}
    for n in names:
        examples = facts["tensors"][n]["examples"]
        state = state_from_bytes(model.store.read_bytes(facts["tensors"][n]["generator_state"]))
        assert examples == {"zoo": None, "k": 1, "ordered": False, "sha256": state.info["examples"]["sha256"]}
    # the two tensors get independent noise (sampling version 1 gave both the same numbers)
    a, b = ((plain[n][0] - originals[n]).reshape(-1) for n in names)
    assert a.size >= 10_000 and abs(np.corrcoef(a, b)[0, 1]) < 0.05
    # fitted jointly, each tensor draws exactly the noise it draws alone
    joint_facts, joint = _run(model_url, layer=ATTENTION, generator="noise", config={"radius": 1.0}, seed=2, joint=True)
    assert len({e["generator_state"] for e in joint_facts["tensors"].values()}) == 1
    for n in names:
        np.testing.assert_allclose(joint[n][0], plain[n][0], rtol=1e-6, atol=1e-7)


def test_ordered_baselines_need_an_ordered_zoo(model_url: str) -> None:
    model = parse_model_url(model_url)
    names = [r["name"] for r in model.manifest()["tensors"].values() if r["name"].endswith("attn.c_attn.weight")]
    originals = {n: read_values(model, model.manifest()["tensors"][n]) for n in names}
    run = {n: np.stack([originals[n] * (1 + 0.1 * k) for k in range(4)]) for n in names}  # a "training run"
    write_zoo(model.store, "run-ordered", run, {"ordered": True}, overwrite=True)
    write_zoo(model.store, "run-unordered", run, overwrite=True)
    assert zoo_is_ordered(model, "run-ordered") and not zoo_is_ordered(model, "run-unordered")
    assert not zoo_is_ordered(model, None)
    manifest = write_zoo(model.store, "run-top", run, overwrite=True)  # `ordered` at the top level
    model.store.write_json("zoos/run-top/zoo.json", {**manifest, "ordered": True})
    assert zoo_is_ordered(model, "run-top")
    with pytest.raises(WeightsmithError, match="extrapolate: needs an ordered zoo.*'run-unordered'"):
        _run(model_url, layer=ATTENTION, generator="extrapolate", zoo="run-unordered")
    with pytest.raises(WeightsmithError, match="latest: needs an ordered zoo.*the model alone"):
        _run(model_url, layer=ATTENTION, generator="latest")
    facts, values = _run(model_url, layer=ATTENTION, generator="extrapolate", config={"t": 0.5}, zoo="run-ordered")
    for n in names:
        assert facts["tensors"][n]["examples"]["zoo"] == "run-ordered"
        assert facts["tensors"][n]["examples"]["k"] == 4 and facts["tensors"][n]["examples"]["ordered"] is True
        np.testing.assert_allclose(values[n][0], run[n][3] + 0.5 * (run[n][3] - run[n][0]), rtol=1e-6)
    # baselines fitted on a zoo start from one member per sample, the same for every tensor
    facts, values = _run(
        model_url, layer=ATTENTION, generator="noise", config={"radius": 0.0}, zoo="run-ordered", samples=6
    )
    chosen = []
    for n in names:
        assert facts["tensors"][n]["examples"]["k"] == 4
        chosen.append([next(k for k in range(4) if np.array_equal(v, run[n][k])) for v in values[n]])
    assert chosen[0] == chosen[1] and len(set(chosen[0])) > 1


def test_joint_refuses_a_chunk(model_url: str) -> None:
    model = parse_model_url(model_url)
    before = set(model.store.list(model.key("predictions")))
    with pytest.raises(WeightsmithError, match="--joint.*--chunk-size"):
        predict(
            model_url,
            PredictOptions(
                layer=LAYER_NORMS, generator="noise", joint=True, chunk_size="128B", images="none", device="cpu"
            ),
        )
    assert set(model.store.list(model.key("predictions"))) == before  # nothing written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_on_cuda(model_url: str) -> None:
    tiny = {
        "tile": 16,
        "ae_channels": 16,
        "block_out_channels": [16, 32],
        "ae_train_steps": 20,
        "unet_train_steps": 40,
        "batch_size": 16,
        "sample_steps": 4,
    }
    facts, values = _run(
        model_url, layer=LAYER_NORMS, generator="tile-diffusion", config=tiny, samples=2, joint=True, device="auto"
    )
    assert facts["device"]["resolved"] == "cuda"
    assert {d for e in facts["tensors"].values() for d in e["devices"]} == {"cuda:0"}
    assert all(np.isfinite(v).all() and v.shape == (64,) for vs in values.values() for v in vs)
