"""Building zoos from models in a local store: provenance, exact widening, dequantised members,
mismatches that write nothing, resume after a crash, and the base model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from tiny_models import store_model

from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import MANIFEST, parse_model_url
from weightsmith.restore import restore
from weightsmith.store import Store, arrays
from weightsmith.zoo import list_zoos, read_zoo, read_zoo_base, read_zoo_tensor
from weightsmith.zoo.build import ZooOptions, base_key, build_unit, build_zoo, prepare, publish

pytestmark = pytest.mark.usefixtures("state_in_tmp")


def values(seed: int, rows: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.standard_normal((rows, 5)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(5).astype(np.float16),
        "norm.weight": rng.standard_normal(5).astype(ml_dtypes.bfloat16),
    }


def models(tmp_path: Path, store: str, k: int = 3) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    vals = [values(i) for i in range(k)]
    return [store_model(v, tmp_path / "src", f"m{i}", store) for i, v in enumerate(vals)], vals


def test_a_zoo_of_store_models(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls, vals = models(tmp_path, store)
    result = build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), ordered=True))
    assert (result.status, result.members, result.tensors, result.written) == ("created", 3, 3, 3)
    manifest = read_zoo(Store(store), "z")
    assert manifest["checkpoints"] == 3 and manifest["ordered"] is True and manifest["base"] is None
    for member, url in zip(manifest["members"], urls, strict=True):
        model = parse_model_url(url)
        assert member == {
            "url": url,
            "slug": model.slug,
            "revision": model.revision,
            "manifest_sha256": hashlib.sha256(model.store.read_bytes(model.key(MANIFEST))).hexdigest(),
        }
    for name in vals[0]:
        got = read_zoo_tensor(Store(store), "z", name)
        # F16 and BF16 are widened exactly
        np.testing.assert_array_equal(got, np.stack([v[name].astype(np.float32) for v in vals]))
    # a second build finds it complete and writes nothing
    again = build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), ordered=True))
    assert (again.status, again.written, again.skipped) == ("unchanged", 0, 3)
    with pytest.raises(WeightsmithError, match="a zoo of this id exists with other members"):
        build_zoo(ZooOptions(zoo_id="z", models=tuple(urls[:2])))
    only = build_zoo(ZooOptions(zoo_id="w", models=tuple(urls), include=("layer.*",), store=str(tmp_path / "other")))
    assert only.tensors == 2 and list_zoos(Store(str(tmp_path / "other"))) == ["w"]


def test_mismatched_members_write_nothing(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls, _ = models(tmp_path, store, k=2)
    wider = store_model(values(5, rows=7), tmp_path / "src", "wider", store)
    fewer = store_model({k: v for k, v in values(6).items() if k != "norm.weight"}, tmp_path / "src", "fewer", store)
    cases = {
        wider: f"{wider}: tensor 'layer.0.weight' has shape [7, 5], {urls[0]} has [6, 5]",
        fewer: f"{fewer}: has no tensor 'norm.weight' ({urls[0]} has it)",
    }
    for bad, message in cases.items():
        with pytest.raises(WeightsmithError) as e:
            build_zoo(ZooOptions(zoo_id="z", models=(urls[0], bad, urls[1])))
        assert str(e.value) == message
    with pytest.raises(WeightsmithError, match="has tensor 'norm.weight', which .* does not hold"):
        build_zoo(ZooOptions(zoo_id="z", models=(fewer, urls[0])))
    with pytest.raises(WeightsmithError, match="the base model"):
        build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), base=wider))
    with pytest.raises(WeightsmithError, match="no tensor matches --include nope"):
        build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), include=("nope",)))
    with pytest.raises(WeightsmithError, match="the selection holds no MLP"):
        build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), align="permutation"))
    with pytest.raises(WeightsmithError, match="given twice"):
        build_zoo(ZooOptions(zoo_id="z", models=(urls[0], urls[0])))
    with pytest.raises(WeightsmithError, match="no manifest.json"):
        build_zoo(ZooOptions(zoo_id="z", models=(urls[0], f"{store}/models/nothing/here")))
    assert Store(store).list("zoos") == []


def test_resume_after_a_crash_and_zoo_json_last(tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls, vals = models(tmp_path, store)
    plan = prepare(ZooOptions(zoo_id="z", models=tuple(urls), base=urls[0]))
    assert build_unit(plan, plan.units[0]) == 1  # then the run dies
    assert not Store(store).exists("zoos/z/zoo.json") and list_zoos(Store(store)) == []
    with pytest.raises(WeightsmithError, match="stack missing or unfinished"):
        publish(plan)
    written: list[str] = []
    real = Store.write_json

    def spy(self, key, value):
        written.append(key)
        return real(self, key, value)

    Store.write_json = spy
    try:
        result = build_zoo(ZooOptions(zoo_id="z", models=tuple(urls), base=urls[0]))
    finally:
        Store.write_json = real
    assert (result.written, result.skipped) == (2, 1)
    assert written[-1] == "zoos/z/zoo.json"
    manifest = read_zoo(Store(store), "z")
    assert manifest["base"]["url"] == urls[0] and set(manifest["base"]["tensors"]) == set(vals[0])
    base = arrays.open_array(Store(store), base_key("z", "layer.0.weight"))[...]
    np.testing.assert_array_equal(base[0], vals[0]["layer.0.weight"])


@pytest.mark.parametrize(
    "fixture", ["gptq/llama_3_2_1b_int4.safetensors", "gguf/derived_multiquant_real_blocks.gguf"], ids=["gptq", "gguf"]
)
def test_quantised_members_join_dequantised(tmp_path: Path, fixtures_dir: Path, fixture: str) -> None:
    store = str(tmp_path / "store")
    urls = [
        extract(str(fixtures_dir / fixture), ExtractOptions(store=store, name=f"q{i}", images="none")).model_url
        for i in range(2)
    ]
    build_zoo(ZooOptions(zoo_id="q", models=tuple(urls)))
    out = tmp_path / "deq.safetensors"
    restore(urls[0], str(out), dequantize=True)
    expected = load_file(str(out))
    manifest = read_zoo(Store(store), "q")
    assert set(manifest["tensors"]) == set(expected) != set()
    for tensor, want in expected.items():  # float32, as `restore --dequantize` writes them
        got = read_zoo_tensor(Store(store), "q", tensor)
        np.testing.assert_array_equal(got[1], want)


def test_predict_merges_a_zoo_with_a_base(tmp_path: Path) -> None:
    from weightsmith.predict import PredictOptions, predict

    store = str(tmp_path / "store")
    base_values = values(9)
    urls, vals = models(tmp_path, store)
    base = store_model(base_values, tmp_path / "src", "base", store)
    build_zoo(ZooOptions(zoo_id="tuned", models=tuple(urls), base=base))
    assert read_zoo_base(Store(store), "tuned", "layer.0.bias").tolist() == base_values["layer.0.bias"].tolist()
    options = PredictOptions(
        layer=("layer.0.weight",), generator="task-arithmetic", config={"scale": 1.0}, zoo="tuned", images="none"
    )
    run = predict(base, options)
    w = "layer.0.weight"
    model = parse_model_url(base)
    entry = model.store.read_json(model.key("predictions", run.run_id, "prediction.json"))["tensors"][w]
    got = arrays.open_array(model.store, entry["zarr"])[0]
    want = base_values[w] + sum(v[w] - base_values[w] for v in vals)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    build_zoo(ZooOptions(zoo_id="plain", models=tuple(urls)))
    assert read_zoo_base(Store(store), "plain", w) is None
    with pytest.raises(WeightsmithError, match="build the zoo with --base"):
        predict(base, options.model_copy(update={"zoo": "plain"}))
