"""The build-zoo flow under a real Prefect server (session harness), members and zoo on a real
S3 server (SeaweedFS): it writes what the library writes, and a re-run after a lost stack
rewrites only that stack."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_models import gpt2, state, store_model

from weightsmith.store import Store, arrays
from weightsmith.zoo import read_zoo, zoo_tensor_key
from weightsmith.zoo.build import ZooOptions, build_zoo
from weightsmith_flows.zoo import build_zoo as build_zoo_flow

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_harness", "one_thread", "state_in_tmp")]


def test_flow_writes_what_the_library_writes(tmp_path: Path, s3_bucket: str) -> None:
    lake = f"s3://{s3_bucket}/lake"
    urls = [store_model(state(gpt2(seed)), tmp_path / "src", f"g{seed}", lake) for seed in range(3)]
    params = dict(zoo_id="z", models=urls, include=["*.mlp.*", "*ln_f*"], align="permutation", base=urls[0])
    run = build_zoo_flow(**params, return_state=True)
    assert run.is_completed(), run
    assert run.result() == f"{lake}/zoos/z"

    library = f"s3://{s3_bucket}/library"
    options = ZooOptions(**{**params, "models": tuple(urls), "include": tuple(params["include"])}, store=library)
    build_zoo(options)
    flow_store, lib_store = Store(lake), Store(library)
    assert flow_store.read_bytes("zoos/z/zoo.json") == lib_store.read_bytes("zoos/z/zoo.json")
    manifest = read_zoo(flow_store, "z")
    assert manifest["checkpoints"] == 3 and len(manifest["tensors"]) == 10  # 2 x (4 mlp tensors) + ln_f (2)

    # A lost stack (its record gone, as after a crash) is the only one the next run writes.
    lost = zoo_tensor_key("z", "transformer.h.1.mlp.c_proj.bias")
    record = arrays.read_record(flow_store, lost)
    flow_store.delete(f"{lost}/zarr.json")
    flow_store.delete("zoos/z/zoo.json")
    kept = zoo_tensor_key("z", "transformer.ln_f.weight")
    flow_store.write_bytes(f"{kept}/marker", b"a rewrite deletes the array's folder first")
    run = build_zoo_flow(**params, return_state=True)
    assert run.is_completed(), run
    assert arrays.read_record(flow_store, lost) == record
    assert flow_store.exists(f"{kept}/marker")  # a complete stack is not rewritten
    assert flow_store.read_bytes("zoos/z/zoo.json") == lib_store.read_bytes("zoos/z/zoo.json")


def test_flow_fails_on_a_mismatch_and_writes_nothing(tmp_path: Path, s3_bucket: str) -> None:
    lake = f"s3://{s3_bucket}/lake"
    a = store_model({"w": np.zeros((2, 3), np.float32)}, tmp_path / "src", "a", lake)
    b = store_model({"w": np.zeros((2, 4), np.float32)}, tmp_path / "src", "b", lake)
    run = build_zoo_flow(zoo_id="z", models=[a, b], return_state=True)
    assert run.is_failed()
    with pytest.raises(Exception, match="tensor 'w' has shape"):
        run.result()
    assert Store(lake).list("zoos") == []
