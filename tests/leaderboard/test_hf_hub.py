"""The `hf-hub` source against a local hub (tests/leaderboard/hubserver.py) through the real
`huggingface_hub` client: listing by filter, sort and limit; resolution to commit, weights,
licence and gating; and a `leaderboard-batch` flow that processes models read from the hub
with ranged GETs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants  # noqa: F401  (read HF_HUB_OFFLINE before a test sets it)
import pytest
from hubserver import FakeHub, HubModel, start_hub, stop_hub

from weightsmith import catalog
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import SourceQuery, read_source
from weightsmith.model import parse_model_url

ROOT = Path(__file__).resolve().parents[2]
HAS_PIPELINE = (ROOT / "flows" / "pipeline.py").exists()
PIPELINE = "weightsmith-pipeline" if HAS_PIPELINE else "extract-model"
STAGES = None if HAS_PIPELINE else ["extract"]


@pytest.fixture
def hub(fixtures_dir: Path) -> Iterator[FakeHub]:
    st = fixtures_dir / "safetensors"
    shards = st / "sharded_minicpm3"
    models = [
        HubModel(
            "acme/tiny-gptq",
            {
                "model.safetensors": st / "ollama_minicpm3_4b_model.safetensors",
                "README.md": st / "hf_samples_f.safetensors",
            },
            downloads=900,
            likes=1,
            trending=5,
            tags=["gptq", "safetensors"],
            license="mit",
            last_modified="2025-03-01T00:00:00.000Z",
        ),
        HubModel(
            "acme/sharded-gptq",
            {p.name: p for p in shards.iterdir()},
            downloads=500,
            likes=9,
            trending=1,
            tags=["gptq", "license:apache-2.0"],
            last_modified="2025-05-01T00:00:00.000Z",
        ),
        HubModel(
            "acme/gated-gptq",
            {"model.safetensors": st / "hf_samples_f.safetensors"},
            downloads=300,
            tags=["gptq"],
            gated="manual",
            license="llama3",
        ),
        HubModel(
            "acme/gguf-gptq",
            {"model.gguf": fixtures_dir / "gguf" / "ollama_llama-2-tiny-random.gguf"},
            downloads=100,
            tags=["gptq"],
        ),
        HubModel(
            "acme/popular-fp16",
            {"model.safetensors": st / "hf_samples_f.safetensors"},
            downloads=10_000,
        ),
    ]
    server = start_hub(models)
    yield server
    stop_hub(server)


def test_the_hub_is_listed_and_each_model_resolved(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the endpoint from the environment
    entries = read_source("hf-hub", SourceQuery(filter="gptq", sort="downloads", limit=10))
    assert [e.id for e in entries] == [
        "acme/tiny-gptq",
        "acme/sharded-gptq",
        "acme/gated-gptq",
        "acme/gguf-gptq",
    ]
    tiny, sharded, gated, gguf = entries
    sha = hub.models["acme/tiny-gptq"].sha
    assert (tiny.revision, tiny.licence, tiny.gated, tiny.problem) == (sha, "mit", None, None)
    assert tiny.source == f"{hub.url}/acme/tiny-gptq/resolve/{sha}/model.safetensors"
    assert sharded.source.endswith(f"/resolve/{sharded.revision}/model.safetensors.index.json")
    assert sharded.licence == "apache-2.0"  # from the tags, as the card has none
    assert gated.gated == "manual" and gated.licence == "llama3" and "gated" in gated.problem
    assert gguf.problem == "no safetensors weights at the top of the repository"

    # Other sorts and a limit: the query reaches the hub as the client spells it.
    by_trend = read_source("hf-hub", SourceQuery(filter="gptq", sort="trending", limit=2, endpoint=hub.url))
    assert [e.id for e in by_trend] == ["acme/tiny-gptq", "acme/sharded-gptq"]
    newest = read_source("hf-hub", SourceQuery(filter="gptq", sort="last_modified", limit=1, endpoint=hub.url))
    assert [e.id for e in newest] == ["acme/sharded-gptq"]
    listing = [p for m, p, _ in hub.requests if p == "/api/models"]
    assert len(listing) == 3


def test_offline_mode_and_a_bad_sort_are_one_line_errors(
    hub: FakeHub, http_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsmithError, match="HF_HUB_OFFLINE"):
        read_source("hf-hub", SourceQuery(endpoint=hub.url))
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsmithError, match="unknown"):
        read_source("hf-hub", SourceQuery(sort="stars", endpoint=hub.url))
    with pytest.raises(WeightsmithError, match="cannot list models") as info:  # not a hub: 404
        read_source("hf-hub", SourceQuery(endpoint=http_server.url))
    assert "\n" not in str(info.value)


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_lists_resolves_and_processes_hub_models(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightsmith_flows.leaderboard import leaderboard_batch

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    store = str(tmp_path / "store")
    result = leaderboard_batch(
        source="hf-hub",
        endpoint=hub.url,
        filter="gptq",
        sort="downloads",
        limit=4,
        store=store,
        pipeline=PIPELINE,
        stages=STAGES,
    )
    assert sorted(o["id"] for o in result["processed"]) == ["acme/sharded-gptq", "acme/tiny-gptq"]
    assert result["failed"] == []
    assert sorted(o["id"] for o in result["skipped"]) == ["acme/gated-gptq", "acme/gguf-gptq"]

    models = catalog.load(store)[0]["models"]
    tiny = models[f"acme/tiny-gptq@{hub.models['acme/tiny-gptq'].sha}"]
    assert (tiny["status"], tiny["licence"], tiny["attempts"]) == ("done", "mit", 1)
    model = parse_model_url(tiny["model_url"])
    assert (model.slug, model.revision) == ("acme--tiny-gptq", hub.models["acme/tiny-gptq"].sha)
    assert model.is_complete() and model.manifest()["source"]["url"] == tiny["source"]
    gated = models[f"acme/gated-gptq@{hub.models['acme/gated-gptq'].sha}"]
    assert (gated["status"], gated["attempts"], gated["gated"]) == ("skipped", 0, "manual")

    # The weights were read in ranges, never downloaded whole.
    size = hub.models["acme/tiny-gptq"].files["model.safetensors"].stat().st_size
    gets = [r for m, f, r in hub.file_requests("acme/tiny-gptq") if m == "GET" and f == "model.safetensors"]
    assert gets and all(r and r.startswith("bytes=") for r in gets)
    assert all(r != f"bytes=0-{size - 1}" for r in gets)
    assert not any(f.endswith("README.md") for _, f, _ in hub.file_requests("acme/tiny-gptq"))
