"""The model lease (one writer per model) and forced runs into a new generation.

Races between processes are in tests/faults/test_concurrent_runs.py; these pin the rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith import lease
from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.restore import restore
from weightsmith.store import Store
from weightsmith.upkeep import gc, list_models
from weightsmith.verify import verify


@pytest.fixture
def source(tmp_path: Path) -> str:
    rng = np.random.default_rng(5)
    path = tmp_path / "src" / "leased" / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({f"l.{i}.weight": rng.standard_normal((64, 32)).astype(np.float32) for i in range(3)}, str(path))
    return str(path)


def model_in(tmp_path: Path) -> ModelRef:
    return ModelRef(Store(str(tmp_path / "store")), "m", "r")


def test_a_held_lease_turns_a_second_run_away_and_is_released(tmp_path: Path) -> None:
    model = model_in(tmp_path)
    with lease.acquire(model, "run-a") as held:
        assert lease.holder(model)["run_id"] == "run-a"
        assert [(i.slug, i.status) for i in list_models(model.store)] == [("m", "writing")]
        with pytest.raises(WeightsmithError, match="another run is writing this model .run run-a on "):
            lease.acquire(model, "run-b")
        held.check()
    assert lease.holder(model) is None
    assert not model.store.exists(model.key(lease.LEASE))
    with lease.acquire(model, "run-b"):  # free again
        pass


def test_waiting_gets_the_lease_once_the_holder_ends(tmp_path: Path) -> None:
    model = model_in(tmp_path)
    held = lease.acquire(model, "run-a")
    import threading

    threading.Timer(1.0, held.release).start()
    with lease.acquire(model, "run-b", wait_s=30) as second:
        assert lease.holder(model)["run_id"] == "run-b"
        second.check()


def test_a_lease_of_a_dead_process_or_past_its_expiry_is_taken_over(tmp_path: Path) -> None:
    model = model_in(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = {
        "run_id": "killed",
        "host": os.uname().nodename,
        "pid": dead.pid,
        "renewed": time.time(),
        "expires": time.time() + 3600,
    }
    model.store.write_json(model.key(lease.LEASE), body)
    with lease.acquire(model, "next"):
        assert lease.holder(model)["run_id"] == "next"
    # Another host's lease counts until it expires.
    model.store.write_json(model.key(lease.LEASE), {**body, "host": "elsewhere", "expires": time.time() + 3600})
    with pytest.raises(WeightsmithError, match="run killed on elsewhere"):
        lease.acquire(model, "next")
    model.store.write_json(model.key(lease.LEASE), {**body, "host": "elsewhere", "expires": time.time() - 1})
    with lease.acquire(model, "next"):
        pass
    model.store.write_bytes(model.key(lease.LEASE), b"not json")  # edited by hand: not a holder
    with lease.acquire(model, "next"):
        pass


def test_the_heartbeat_renews_and_notices_a_takeover(tmp_path: Path) -> None:
    model = model_in(tmp_path)
    held = lease.acquire(model, "run-a", ttl_s=0.4)
    first = json.loads(model.store.read_bytes(model.key(lease.LEASE)))
    time.sleep(0.5)
    renewed = json.loads(model.store.read_bytes(model.key(lease.LEASE)))
    assert renewed["expires"] > first["expires"] and held.lost is None  # still ours after the TTL
    model.store.write_json(model.key(lease.LEASE), {**renewed, "run_id": "thief"})
    time.sleep(0.4)
    with pytest.raises(WeightsmithError, match="took this model's lease over"):
        held.check()
    held.release()
    assert json.loads(model.store.read_bytes(model.key(lease.LEASE)))["run_id"] == "thief"  # not ours to delete


def test_a_forced_run_replaces_a_published_model_through_a_new_generation(source: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    first = extract(source, ExtractOptions(store=store))
    model = parse_model_url(first.model_url)
    original = model.store.read_bytes(model.key(MANIFEST))
    assert b'"generation"' not in original

    forced = extract(source, ExtractOptions(store=store, force=True))
    assert (forced.status, forced.written) == ("replaced", 3)
    manifest = model.manifest()
    generation = manifest["generation"]
    assert generation == forced.run_id
    for record in manifest["tensors"].values():
        assert all(
            k.startswith(model.key("generations", generation) + "/")
            for k in (record["artifacts"]["zarr"], record["artifacts"]["tiff"], record["artifacts"]["png"])
        )
    assert verify(model.url).ok

    # A plain re-run uses the published generation: nothing written, the same manifest.
    again = extract(source, ExtractOptions(store=store))
    assert (again.status, again.written) == ("unchanged", 0)

    # gc removes the replaced top-level artifacts; the model stays whole and restores exactly.
    report = gc(Store(store), dry_run=False, older_than_s=0)
    removed = {i.key for i in report.items}
    assert {model.key(d) for d in ("tensors", "images", "previews")} <= {k.rsplit("/", 1)[0] for k in removed}
    assert not any(k.startswith(model.key("generations")) for k in removed), removed
    assert verify(model.url).ok
    [out] = restore(model.url, str(tmp_path / "restored.safetensors"))
    assert Path(out).read_bytes() == Path(source).read_bytes()


def test_gc_drops_the_generation_of_a_forced_run_that_never_published(source: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    model = parse_model_url(extract(source, ExtractOptions(store=store)).model_url)
    orphan = model.key("generations", "20260101T000000Z-abcdef", "tensors", "x.zarr", "zarr.json")
    model.store.write_bytes(orphan, b"{}")
    report = gc(Store(store), dry_run=False, older_than_s=0)
    assert [(i.key, i.reason) for i in report.items] == [
        (model.key("generations", "20260101T000000Z-abcdef"), "generation not in the manifest")
    ]
    assert verify(model.url).ok


def test_a_hand_edited_generation_is_refused(source: str, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    model = parse_model_url(extract(source, ExtractOptions(store=store)).model_url)
    manifest = model.manifest()
    manifest["generation"] = "../../elsewhere"
    model.store.write_json(model.key(MANIFEST), manifest)
    with pytest.raises(WeightsmithError, match="generation that is not a run id"):
        extract(source, ExtractOptions(store=store))


def test_a_lease_this_process_released_but_could_not_delete_is_free(tmp_path: Path) -> None:
    """The store was down when the run ended: lease.json stayed behind, naming this process."""
    model = model_in(tmp_path)
    held = lease.acquire(model, "run-a")
    stuck = model.store.read_bytes(model.key(lease.LEASE))
    held.release()
    model.store.write_bytes(model.key(lease.LEASE), stuck)
    with lease.acquire(model, "run-b"):  # taken over at once, no waiting for the expiry
        pass
