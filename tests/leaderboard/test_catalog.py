"""The catalogue: conditional read-modify-write (no lost updates), backoff and cap, refusal of
a garbled file, on a local store and on a real S3 server."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from weightsmith import catalog
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import ModelEntry, plan_batch
from weightsmith.store import Store

NOW = datetime(2025, 6, 1, 3, 0, tzinfo=UTC)


def entry(n: int, revision: str = "v1") -> ModelEntry:
    return ModelEntry(id=f"acme/m{n}", revision=revision, source=f"/models/m{n}.safetensors", origin="test")


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    return f"s3://{request.getfixturevalue('s3_bucket')}/lake"


def test_two_concurrent_updaters_both_land(store_url: str) -> None:
    per_writer = 15

    def writer(w: int) -> None:
        for i in range(per_writer):
            e = entry(100 * w + i)
            catalog.update(store_url, lambda c, e=e: catalog.record(c, e, "done", NOW, model_url=f"m/{e.id}"))

    threads = [threading.Thread(target=writer, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    models = catalog.load(store_url)[0]["models"]
    assert len(models) == 2 * per_writer
    assert {m["status"] for m in models.values()} == {"done"}


def test_a_garbled_catalogue_is_refused_and_kept(store_url: str) -> None:
    store = Store(store_url)
    catalog.update(store, lambda c: catalog.record(c, entry(1), "done", NOW))
    for garbled in (
        b'{"format": "weightsmith-catalog/1", "models": {',
        b'{"models": []}',
        b'{"format": "weightsmith-catalog/1", "models": {"a@1": {"status": "meh", "attempts": 1}}}',
    ):
        store.write_bytes(catalog.KEY, garbled)
        with pytest.raises(WeightsmithError, match="catalog.json") as info:
            catalog.update(store, lambda c: catalog.record(c, entry(2), "done", NOW))
        assert "\n" not in str(info.value)
        assert store.read_bytes(catalog.KEY) == garbled  # never silently replaced


def test_a_failed_model_backs_off_until_the_cap(tmp_path) -> None:
    c = catalog.empty()
    e = entry(1)
    assert catalog.due(None, NOW) == (True, "new")
    when = NOW
    for attempt in (1, 2):
        catalog.record(c, e, "failed", when, error="boom", backoff_seconds=3600)
        stored = c["models"][e.key]
        wait = timedelta(hours=2 ** (attempt - 1))  # 1 h, then 2 h
        assert stored["attempts"] == attempt and stored["last_error"] == "boom"
        assert catalog.due(stored, when + wait - timedelta(seconds=1), max_attempts=3)[0] is False
        assert catalog.due(stored, when + wait, max_attempts=3) == (
            True,
            f"retry {attempt + 1} of 3",
        )
        when += wait
    catalog.record(c, e, "failed", when, error="boom again")
    ok, why = catalog.due(c["models"][e.key], when + timedelta(days=365), max_attempts=3)
    assert not ok and why.startswith("failed 3 times (cap 3)")
    assert [h["status"] for h in c["models"][e.key]["history"]] == ["failed"] * 3


def test_the_history_is_bounded() -> None:
    c = catalog.empty()
    for i in range(catalog.HISTORY + 5):
        catalog.record(c, entry(1), "failed", NOW + timedelta(minutes=i), error=f"e{i}", backoff_seconds=0)
    history = c["models"][entry(1).key]["history"]
    assert len(history) == catalog.HISTORY and history[-1]["error"] == f"e{catalog.HISTORY + 4}"


def test_plan_decides_from_the_catalogue() -> None:
    c = catalog.empty()
    catalog.record(c, entry(1), "done", NOW)
    catalog.record(c, entry(2), "failed", NOW, error="boom", backoff_seconds=0)
    catalog.record(c, entry(3), "skipped", NOW, error="no safetensors weights")
    listed = [
        entry(1),
        entry(2),
        entry(3),
        entry(4),
        entry(1, "v2"),
        ModelEntry(id="acme/m5", revision="v1", source="", origin="test", problem="gated"),
    ]
    plan = {d.entry.key: (d.action, d.reason) for d in plan_batch(listed, c, NOW, max_attempts=3)}
    assert plan == {
        "acme/m1@v1": ("leave", "done"),
        "acme/m2@v1": ("process", "retry 2 of 3"),
        "acme/m3@v1": ("process", "was skipped: no safetensors weights"),  # listed with weights now
        "acme/m4@v1": ("process", "new"),
        "acme/m1@v2": ("process", "new"),  # a new revision of a done model
        "acme/m5@v1": ("skip", "gated"),
    }
