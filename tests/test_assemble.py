"""Assemble on a local store with tiny real models: an untouched candidate is byte-identical to
its base, predicted tensors land cast to the base dtype, shards and GPTQ bases load in
transformers, and outputs are never half-written or overwritten.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from weightsmith import dtypes
from weightsmith.assemble import (
    CANDIDATE,
    AssembleOptions,
    assemble,
    base_tensors,
    load_candidate_state,
    plan,
)
from weightsmith.demo import SIZES, build_gpt2
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith.predict import PredictOptions, predict, read_values
from weightsmith.restore import float_values
from weightsmith.store import Store, arrays

PREDICTED = ("transformer.h.0.ln_1.*", "transformer.h.0.mlp.c_fc.weight")
GPTQ_WEIGHT = "model.layers.0.mlp.gate_proj.weight"
GPTQ_GOLDEN = "model.layers.0.mlp.gate_proj.weight_dequant_in_out"


def _header(path: Path) -> tuple[dict, list[tuple[str, str, list[int]]]]:
    """(__metadata__, [(name, dtype, shape)] in data order) of a safetensors file."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"])
    return meta, [(k, v["dtype"], v["shape"]) for k, v in entries]


def _generate(folder: Path) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    return out[0].tolist()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny GPT-2 extracted into a store, plus a noise prediction of three of its tensors."""
    root = tmp_path_factory.mktemp("assemble")
    folder = build_gpt2(root / "gpt", *SIZES["tiny"])
    url = extract(str(folder), ExtractOptions(store=str(root / "store"), images="none")).model_url
    pred = predict(
        url,
        PredictOptions(
            layer=PREDICTED,
            generator="noise",
            config={"radius": 0.5},
            samples=2,
            images="none",
            device="cpu",
        ),
    )
    return {"root": root, "folder": folder, "url": url, "run": pred.run_id}


def _sample(url: str, run: str, name: str, i: int) -> np.ndarray:
    model = parse_model_url(url)
    entry = model.store.read_json(model.key("predictions", run, "prediction.json"))["tensors"][name]
    return np.asarray(arrays.open_array(model.store, entry["zarr"])[i])


def test_untouched_candidate_is_byte_identical_and_generates(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "candidate"
    result = assemble(tiny["url"], AssembleOptions(out=str(out)))
    assert result.location == str(out) and result.replaced == []
    assert sorted(p.name for p in out.iterdir()) == sorted(result.files)
    assert result.files[-1] == CANDIDATE
    assert not list(tmp_path.glob("*.partial*"))

    base, cand = tiny["folder"] / "model.safetensors", out / "model.safetensors"
    assert _header(cand)[1] == _header(base)[1]  # names, dtypes, shapes and order
    expected, got = load_file(base), load_file(cand)
    assert list(got) == list(expected)
    assert all(_same_bytes(got[k], expected[k]) for k in expected)
    state = load_candidate_state(str(out))
    assert all(_same_bytes(state[k], expected[k]) for k in expected)
    for sidecar in ("config.json", "generation_config.json"):
        assert (out / sidecar).read_bytes() == (tiny["folder"] / sidecar).read_bytes()

    meta = _header(cand)[0]
    model = parse_model_url(tiny["url"])
    assert meta["format"] == "pt"
    assert meta["weightsmith.base"] == f"{model.slug}@{model.revision}"
    assert meta["weightsmith.prediction"] == "" and meta["weightsmith.replaced"] == ""
    candidate = json.loads((out / CANDIDATE).read_text())
    assert candidate["files"]["model.safetensors"]["size"] == cand.stat().st_size
    assert _generate(out) == _generate(tiny["folder"])


def test_predicted_tensors_replace_the_base(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "candidate"
    options = AssembleOptions(prediction=tiny["run"], sample=1, replace=("*.weight",), out=str(out))
    result = assemble(tiny["url"], options)
    taken = ["transformer.h.0.ln_1.weight", "transformer.h.0.mlp.c_fc.weight"]
    assert sorted(result.replaced) == taken  # ln_1.bias is predicted but not taken

    base = load_file(tiny["folder"] / "model.safetensors")
    cand = load_file(out / "model.safetensors")
    assert _header(out / "model.safetensors")[1] == _header(tiny["folder"] / "model.safetensors")[1]
    for name in base:
        if name in taken:
            sample = _sample(tiny["url"], tiny["run"], name, 1)
            assert _same_bytes(cand[name], sample.astype(base[name].dtype))
        else:
            assert _same_bytes(cand[name], base[name]), name
    assert not np.array_equal(cand[taken[1]], base[taken[1]])  # the noise did change it

    meta = _header(out / "model.safetensors")[0]
    assert meta["weightsmith.prediction"] == tiny["run"]
    assert meta["weightsmith.generator"] == "noise"
    assert meta["weightsmith.seed"] == "0" and meta["weightsmith.sample"] == "1"
    assert meta["weightsmith.replaced"].split(",") == result.replaced
    assert result.provenance["prediction"]["config"]["radius"] == 0.5
    assert len(_generate(out)) == 9


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_predictions_are_cast_to_a_half_precision_base(tiny: dict, tmp_path: Path, dtype: str) -> None:
    import torch
    from transformers import GPT2LMHeadModel

    folder = tmp_path / f"gpt-{dtype}"
    model = GPT2LMHeadModel.from_pretrained(tiny["folder"], dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    url = extract(str(folder), ExtractOptions(store=str(tmp_path / "store"), images="none")).model_url
    name = "transformer.h.1.attn.c_attn.weight"
    run = predict(url, PredictOptions(layer=(name,), generator="noise", images="none", device="cpu")).run_id
    zeros = np.zeros((128, 64), np.float32)
    out = tmp_path / "candidate"
    result = assemble(
        url,
        AssembleOptions(prediction=run, out=str(out)),
        replacements={"transformer.wpe.weight": zeros},
    )
    assert sorted(result.replaced) == [name, "transformer.wpe.weight"]
    assert result.provenance["from_memory"] == ["transformer.wpe.weight"]

    want = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype("<f2")
    st = {"float16": "F16", "bfloat16": "BF16"}[dtype]
    _, entries = _header(out / "model.safetensors")
    assert entries == _header(folder / "model.safetensors")[1]
    assert {d for _, d, _ in entries} == {st}
    state = load_candidate_state(str(out))
    sample = _sample(url, run, name, 0)
    assert _same_bytes(state[name], sample.astype(want))  # round to nearest
    assert _same_bytes(state["transformer.wpe.weight"], zeros.astype(want))
    base = parse_model_url(url)
    kept = "transformer.h.0.attn.c_attn.weight"
    record = base.manifest()["tensors"][kept]
    assert _same_bytes(state[kept], read_values(base, record).astype(want))
    assert len(_generate(out)) == 9


def test_sharded_output_has_an_index_and_loads(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "candidate"
    result = assemble(tiny["url"], AssembleOptions(shard_bytes=100_000, out=str(out)))
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert result.files[-2:] == ["model.safetensors.index.json", CANDIDATE]

    index = json.loads((out / "model.safetensors.index.json").read_text())
    base = load_file(tiny["folder"] / "model.safetensors")
    assert list(index["weight_map"]) == list(base)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in base.values())
    for shard in shards:
        meta, entries = _header(shard)
        assert meta["format"] == "pt"
        size = sum(base[n].nbytes for n, _, _ in entries)
        assert size <= 100_000 or len(entries) == 1
        assert all(index["weight_map"][n] == shard.name for n, _, _ in entries)
    state = load_candidate_state(str(out))
    assert list(state) == list(base)
    assert all(_same_bytes(state[k], base[k]) for k in base)
    assert _generate(out) == _generate(tiny["folder"])


def test_gptq_base_gives_a_dequantised_f16_model(fixtures_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "gptq"
    src.mkdir()
    shutil.copy(fixtures_dir / "gptq/llama_3_2_1b_int4.safetensors", src / "model.safetensors")
    quant = {"bits": 4, "group_size": 128, "desc_act": False, "quant_method": "gptq"}
    config = {"model_type": "llama", "dtype": "bfloat16", "quantization_config": quant}
    (src / "config.json").write_text(json.dumps(config))
    (src / "quantize_config.json").write_text(json.dumps(quant))
    url = extract(str(src), ExtractOptions(store=str(tmp_path / "store"), images="none")).model_url

    out = tmp_path / "candidate"
    result = assemble(url, AssembleOptions(out=str(out)))
    assert sorted(result.files) == sorted(["model.safetensors", "config.json", CANDIDATE])
    _, entries = _header(out / "model.safetensors")
    assert entries == [(GPTQ_WEIGHT, "F16", [256, 256])]  # no qweight, qzeros, scales, g_idx
    weight = load_file(out / "model.safetensors")[GPTQ_WEIGHT]
    golden = load_file(fixtures_dir / "gptq/llama_3_2_1b_int4.expected.safetensors")[GPTQ_GOLDEN].T
    # the golden is BF16-rounded (2**-8 relative), the output F16-rounded (2**-11)
    np.testing.assert_allclose(weight.astype(np.float32), golden, rtol=2**-7 + 2**-10, atol=1e-6)
    model = parse_model_url(url)
    record = model.manifest()["tensors"][GPTQ_WEIGHT]
    exact = np.concatenate([b.ravel() for b in float_values(model, record)]).reshape(256, 256)
    assert _same_bytes(weight, exact.astype(np.float16))

    written = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in written and written["dtype"] == "float16"
    assert written["model_type"] == "llama"


def test_gguf_base_gives_float_tensors_under_gguf_names(fixtures_dir: Path, tmp_path: Path) -> None:
    path = fixtures_dir / "gguf/ollama_llama-2-tiny-random.gguf"
    url = extract(str(path), ExtractOptions(store=str(tmp_path / "store"), images="none")).model_url
    out = tmp_path / "candidate"
    assemble(url, AssembleOptions(out=str(out)))
    model = parse_model_url(url)
    base = base_tensors(model.manifest())
    state = load_candidate_state(str(out))
    assert list(state) == [r["name"] for r in base]
    for r in base:
        values = np.concatenate([np.ravel(b) for b in float_values(model, r)]).reshape(r["shape"])
        dtype = "F32" if r["encoding"] == "gguf" else r["dtype"]  # raw ones keep their dtype
        want = values.astype(dtypes.numpy_dtype(dtype))
        assert _same_bytes(state[r["name"]], want), r["name"]


def test_store_output_writes_candidate_json_last(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = extract(str(tiny["folder"]), ExtractOptions(store=str(tmp_path / "store"), images="none")).model_url
    writes: list[str] = []
    for method in ("put_file", "write_bytes", "create_if_absent"):
        original = getattr(Store, method)

        def spy(self, *args, _original=original, _method=method):
            writes.append(args[1] if _method == "put_file" else args[0])
            return _original(self, *args)

        monkeypatch.setattr(Store, method, spy)
    result = assemble(url, AssembleOptions(candidate_id="c1", shard_bytes=200_000))
    model = parse_model_url(url)
    prefix = model.key("candidates", "c1")
    assert result.location == model.store.url_of(prefix)
    assert writes[-2:] == [f"{prefix}/model.safetensors.index.json", f"{prefix}/{CANDIDATE}"]
    assert sorted(writes) == sorted(f"{prefix}/{name}" for name in result.files)
    assert not model.store.list(".tmp")  # the staging folder is gone

    candidate = model.store.read_json(f"{prefix}/{CANDIDATE}")
    assert candidate["candidate_id"] == "c1"
    for name, entry in candidate["files"].items():
        assert model.store.read_bytes(f"{prefix}/{name}") != b""
        assert entry["size"] == len(model.store.read_bytes(f"{prefix}/{name}"))
    base = load_file(tiny["folder"] / "model.safetensors")
    state = load_candidate_state(result.location)
    assert all(_same_bytes(state[k], base[k]) for k in base)

    with pytest.raises(WeightsmithError, match="already exists"):
        assemble(url, AssembleOptions(candidate_id="c1"))


def test_an_existing_output_folder_is_never_overwritten(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "candidate"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(WeightsmithError, match="not empty"):
        assemble(tiny["url"], AssembleOptions(out=str(out)))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["candidate"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assemble(tiny["url"], AssembleOptions(out=str(empty)))  # an empty folder is fine
    assert (empty / "model.safetensors").exists()


def test_bad_requests_are_user_errors(tiny: dict, tmp_path: Path) -> None:
    url, out = tiny["url"], str(tmp_path / "candidate")
    cases = [
        (AssembleOptions(prediction="nope", out=out), None, "no such prediction run"),
        (AssembleOptions(prediction=tiny["run"], sample=2, out=out), None, "has 2 samples"),
        (
            AssembleOptions(prediction=tiny["run"], replace=("lm_head.*",), out=out),
            None,
            "no tensor of prediction run",
        ),
        (
            AssembleOptions(out=out),
            {"transformer.wte.weight": np.zeros((64, 256))},
            r"shape \[64, 256\], the base \[256, 64\]",
        ),
        (AssembleOptions(out=out), {"no.such.tensor": np.zeros(3)}, "no such tensor"),
        (
            AssembleOptions(prediction=tiny["run"], out=out),
            {"transformer.h.0.ln_1.bias": np.zeros(64)},
            "pick one",
        ),
    ]
    for options, replacements, message in cases:
        with pytest.raises(WeightsmithError, match=message):
            assemble(url, options, replacements)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written


def test_plan_packs_shards_greedily() -> None:
    records = [
        {"name": n, "dtype": "F32", "shape": [s], "encoding": "raw", "role": "tensor"}
        for n, s in [("a", 10), ("b", 10), ("c", 40), ("d", 5), ("e", 5)]
    ]
    planned = plan(records, {"c": "prediction"}, shard_bytes=80)
    assert [(t.name, t.shard, t.source) for t in planned] == [
        ("a", 0, "base"),
        ("b", 0, "base"),
        ("c", 1, "prediction"),
        ("d", 2, "base"),
        ("e", 2, "base"),
    ]
    assert {t.shard for t in plan(records, {}, shard_bytes=10_000)} == {0}


def test_a_failure_part_way_leaves_nothing(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args):
        yield np.zeros(1, np.float32)
        raise OSError("disk on fire")

    monkeypatch.setattr("weightsmith.assemble._sample_blocks", broken)
    out = tmp_path / "candidate"
    with pytest.raises(OSError, match="disk on fire"):
        assemble(tiny["url"], AssembleOptions(prediction=tiny["run"], out=str(out)))
    assert list(tmp_path.iterdir()) == []  # no candidate, no staging folder
