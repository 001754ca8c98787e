"""Family zoos grown by leaderboard batches: the family comes from the manifest entry, a
README.md model card beside the weights, or the hub's card data; each newly processed model of
a family is appended to its zoo (earlier members' chunks untouched), a mismatch or an
oversized model is skipped with the reason in the catalogue, and a second run adds nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hubserver import HubModel, start_hub, stop_hub
from safetensors.numpy import save_file

from weightsmith import catalog
from weightsmith.leaderboard import SourceQuery, ZooGrowth, extract_only, plan_batch, read_source, run_batch
from weightsmith.leaderboard.hf_hub import base_model_of
from weightsmith.model import parse_model_url
from weightsmith.store import Store
from weightsmith.zoo import read_zoo, read_zoo_tensor, zoo_tensor_key
from weightsmith.zoo.grow import family_zoo_id

pytestmark = pytest.mark.usefixtures("state_in_tmp")
ZOO = "family-acme--base"


def weights(seed: int, cols: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((3, cols)).astype(np.float32), "b": rng.standard_normal(cols).astype(np.float16)}


def model_file(folder: Path, name: str, values: dict[str, np.ndarray], card: str | None = None) -> Path:
    path = folder / name / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(values, str(path))
    if card is not None:
        (path.parent / "README.md").write_text(card)
    return path


def batch(manifest: Path, store: str, growth: ZooGrowth):
    decisions = plan_batch(read_source(str(manifest), SourceQuery()), catalog.load(store)[0], catalog.now_utc())
    return run_batch(decisions, store, extract_only(store), growth=growth)


def test_family_zoos_grow_from_a_manifest(tmp_path: Path) -> None:
    src, store = tmp_path / "src", str(tmp_path / "store")
    model_file(src, "base", weights(0))
    model_file(src, "t1", weights(1))
    model_file(src, "t2", weights(2), card="---\nlicense: mit\nbase_model:\n- acme/base\n---\n# a fine-tune\n")
    model_file(src, "odd", weights(3, cols=5))
    model_file(src, "plain", weights(4), card="# no front matter\nbase_model: acme/base\n")
    items = [
        {"id": "acme/base", "source": "base/model.safetensors", "revision": "r1"},
        {"id": "acme/t1", "source": "t1/model.safetensors", "revision": "r1", "base_model": "acme/base"},
        {"id": "acme/t2", "source": "t2/model.safetensors", "revision": "r1"},
        {"id": "acme/odd", "source": "odd/model.safetensors", "revision": "r1", "base_model": "acme/base"},
        {"id": "acme/plain", "source": "plain/model.safetensors", "revision": "r1"},
    ]
    manifest = src / "leaderboard.yaml"
    manifest.write_text(yaml.safe_dump(items))
    entries = read_source(str(manifest), SourceQuery())
    assert [e.family for e in entries] == [None, "acme/base", "acme/base", "acme/base", None]

    growth = ZooGrowth(zoo="family")
    first = batch(manifest, store, growth)
    assert len(first.processed) == 5
    assert [(z["model"], z["status"]) for z in first.zoos] == [
        ("acme/t1@r1", "appended"),
        ("acme/t2@r1", "appended"),
        ("acme/odd@r1", "skipped"),
    ]
    models = catalog.load(store)[0]["models"]
    assert models["acme/t2@r1"]["family"] == "acme/base" and models["acme/base@r1"]["family"] is None
    assert models["acme/odd@r1"]["zoo"] == {
        "id": ZOO,
        "status": "skipped",
        "reason": "tensor 'b' has shape [5], the zoo has [4]",  # the first tensor that differs
        "checkpoints": 2,
    }
    assert "zoo" not in models["acme/plain@r1"]
    zoo = read_zoo(Store(store), ZOO)
    assert zoo["checkpoints"] == 2 and zoo["family"] == "acme/base"
    assert [m["url"] for m in zoo["members"]] == [models[k]["model_url"] for k in ("acme/t1@r1", "acme/t2@r1")]
    np.testing.assert_array_equal(
        read_zoo_tensor(Store(store), ZOO, "b"), np.stack([weights(i)["b"].astype(np.float32) for i in (1, 2)])
    )

    # A second run adds nothing.
    zoo_json = Store(store).read_bytes(f"zoos/{ZOO}/zoo.json")
    second = batch(manifest, store, growth)
    assert second.processed == [] and second.zoos == []
    assert Store(store).read_bytes(f"zoos/{ZOO}/zoo.json") == zoo_json

    # A new fine-tune is appended as member 3; the chunks of members 1 and 2 are not rewritten.
    chunks = Path(store) / zoo_tensor_key(ZOO, "w")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks.glob("c.*")}
    assert sorted(before) == ["c.0.0.0", "c.1.0.0"]
    model_file(src, "t3", weights(5))
    manifest.write_text(yaml.safe_dump([*items, {**items[1], "id": "acme/t3", "source": "t3/model.safetensors"}]))
    third = batch(manifest, store, growth)
    assert [(z["model"], z["status"], z["checkpoints"]) for z in third.zoos] == [("acme/t3@r1", "appended", 3)]
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in chunks.glob("c.*")}
    assert {k: after[k] for k in before} == before and "c.2.0.0" in after
    stacked = read_zoo_tensor(Store(store), ZOO, "w")
    np.testing.assert_array_equal(stacked, np.stack([weights(i)["w"] for i in (1, 2, 5)]))
    record = read_zoo(Store(store), ZOO)["tensors"]["w"]  # the record covers the 3 rows
    assert record["sha256"] == hashlib.sha256(stacked.tobytes()).hexdigest()
    assert record["stats"]["mean"] == pytest.approx(float(stacked.mean(dtype=np.float64)))


def test_tensor_selection_and_the_size_cap(tmp_path: Path) -> None:
    src, store = tmp_path / "src", str(tmp_path / "store")
    model_file(src, "t1", weights(1))
    model_file(src, "big", {**weights(2), "w": np.zeros((30, 4), np.float32)})
    items = [
        {"id": "acme/t1", "source": "t1/model.safetensors", "revision": "r1", "base_model": "acme/base"},
        {"id": "acme/big", "source": "big/model.safetensors", "revision": "r1", "base_model": "acme/base"},
    ]
    manifest = src / "m.yaml"
    manifest.write_text(yaml.safe_dump(items))
    result = batch(manifest, store, ZooGrowth(zoo="family", include=("w",), max_member_bytes=100))
    assert [(z["status"], z["reason"]) for z in result.zoos] == [
        ("appended", ""),
        ("skipped", "selected tensors are 480 float32 bytes (cap 100)"),
    ]
    assert list(read_zoo(Store(store), ZOO)["tensors"]) == ["w"]
    # without --zoo family no zoo grows
    assert batch(manifest, tmp_path / "other", ZooGrowth()).zoos == []
    assert Store(str(tmp_path / "other")).list("zoos") == []


def test_family_names() -> None:
    assert family_zoo_id("meta-llama/Llama-3.2-1B") == "family-meta-llama--Llama-3.2-1B"
    assert family_zoo_id("org/name with spaces+x") == "family-org--name-with-spaces-x"
    assert base_model_of({"base_model": ["a/b", "c/d"]}) == "a/b"
    assert base_model_of({"base_model": " a/b "}) == "a/b"
    assert base_model_of({"license": "mit"}) is None and base_model_of(None) is None


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_grows_a_family_zoo_from_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from weightsmith_flows.leaderboard import leaderboard_batch

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    src = tmp_path / "src"
    hub = start_hub(
        [
            HubModel("acme/t1", {"model.safetensors": model_file(src, "t1", weights(1))}, 30, base_model="acme/base"),
            HubModel("acme/t2", {"model.safetensors": model_file(src, "t2", weights(2))}, 20, base_model=["acme/base"]),
            HubModel(
                "acme/odd", {"model.safetensors": model_file(src, "odd", weights(3, 5))}, 10, base_model="acme/base"
            ),
            HubModel("acme/solo", {"model.safetensors": model_file(src, "solo", weights(4))}, 5),
        ]
    )
    store = str(tmp_path / "store")
    try:

        def run() -> dict:
            return leaderboard_batch(
                source="hf-hub", endpoint=hub.url, store=store, pipeline="extract-model", zoo="family", limit=10
            )

        first = run()
        assert len(first["processed"]) == 4 and first["failed"] == []
        assert [(z["model"].split("@")[0], z["status"]) for z in first["zoos"]] == [
            ("acme/t1", "appended"),
            ("acme/t2", "appended"),
            ("acme/odd", "skipped"),
        ]
        models = catalog.load(store)[0]["models"]
        odd = next(m for m in models.values() if m["id"] == "acme/odd")
        assert odd["family"] == "acme/base" and odd["zoo"]["reason"] == "tensor 'b' has shape [5], the zoo has [4]"
        zoo = read_zoo(Store(store), ZOO)
        assert zoo["checkpoints"] == 2
        assert {parse_model_url(m["url"]).slug for m in zoo["members"]} == {"acme--t1", "acme--t2"}
        second = run()
        assert second["processed"] == [] and second["zoos"] == []
        assert read_zoo(Store(store), ZOO) == zoo
    finally:
        stop_hub(hub)


def test_the_cli_grows_family_zoos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from weightsmith.cli import app

    monkeypatch.setenv("COLUMNS", "200")
    src, store = tmp_path / "src", str(tmp_path / "store")
    model_file(src, "t1", weights(1))
    model_file(src, "odd", weights(3, cols=5))
    manifest = src / "m.yaml"
    manifest.write_text(
        yaml.safe_dump(
            [
                {"id": "acme/t1", "source": "t1/model.safetensors", "revision": "r1", "base_model": "acme/base"},
                {"id": "acme/odd", "source": "odd/model.safetensors", "revision": "r1", "base_model": "acme/base"},
            ]
        )
    )
    args = ["leaderboard", "--source", str(manifest), "--store", store, "--no-prefect", "--zoo", "family"]
    result = CliRunner().invoke(app, [*args, "--zoo-include", "w"])
    assert result.exit_code == 0, result.stderr
    assert f"zoo {ZOO}: acme/t1@r1 appended" in result.stderr
    assert f"zoo {ZOO}: acme/odd@r1 skipped (tensor 'w' has shape [3, 5], the zoo has [3, 4])" in result.stderr
    assert list(read_zoo(Store(store), ZOO)["tensors"]) == ["w"]
    shown = CliRunner().invoke(app, ["zoo", "show", ZOO, "--store", store])
    assert shown.exit_code == 0 and "family: fine-tunes of acme/base" in shown.stdout, shown.stdout
    bad = CliRunner().invoke(app, [*args[:-1], "sideways"])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: --zoo:"), bad.stderr
