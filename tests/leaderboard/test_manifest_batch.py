"""Leaderboard batches from a manifest of local models: each new model is processed once and
catalogued, a broken one is recorded as failed and retried on later batches until the cap,
never blocking the others. The flow under the session's Prefect server, the library loop and
the CLI; and (slow) the `leaderboard-batch/daily` deployment on a real server and worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from weightsmith import catalog
from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard import SourceQuery, extract_only, plan_batch, read_source, run_batch
from weightsmith.model import parse_model_url

ROOT = Path(__file__).resolve().parents[2]
# The pipeline flow is written in parallel; until it lands, batches run the extract flow.
HAS_PIPELINE = (ROOT / "flows" / "pipeline.py").exists()
PIPELINE = "weightsmith-pipeline" if HAS_PIPELINE else "extract-model"
STAGES = None if HAS_PIPELINE else ["extract"]
MODELS = {
    "a": "safetensors/hf_samples_f.safetensors",
    "b": "safetensors/ollama_minicpm3_4b_model.safetensors",
    "c": "safetensors/safetensors_cpp_model_f64.safetensors",
    "broken": "bad/ollama_test_truncated_6B.gguf",
}


def write_manifest(folder: Path, fixtures_dir: Path, names: list[str]) -> Path:
    """Copy the models into `folder` and list them, with paths relative to the manifest."""
    items = []
    for name in names:
        fixture = fixtures_dir / MODELS[name]
        target = folder / name / fixture.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fixture, target)
        items.append({"id": f"acme/{name}", "source": f"{name}/{fixture.name}", "revision": "r1"})
    path = folder / "leaderboard.yaml"
    path.write_text(yaml.safe_dump(items))
    return path


def ids(outcomes: list[dict]) -> list[str]:
    return sorted(o["id"] for o in outcomes)


@pytest.mark.usefixtures("prefect_harness")
def test_each_model_is_processed_once_and_a_broken_one_until_the_cap(tmp_path: Path, fixtures_dir: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from weightsmith_flows.leaderboard import leaderboard_batch

    store = str(tmp_path / "store")
    manifest = str(write_manifest(tmp_path / "src", fixtures_dir, ["a", "b"]))

    def batch() -> dict:
        return leaderboard_batch(
            source=manifest,
            store=store,
            pipeline=PIPELINE,
            stages=STAGES,
            max_attempts=2,
            backoff_seconds=0,
        )

    # A dry run plans and changes nothing.
    plan = leaderboard_batch(source=manifest, store=store, pipeline=PIPELINE, stages=STAGES, dry_run=True)
    assert [(p["id"], p["action"], p["reason"]) for p in plan["plan"]] == [
        ("acme/a", "process", "new"),
        ("acme/b", "process", "new"),
    ]
    assert catalog.load(store)[1] is None

    # Two models: both processed and catalogued.
    first = batch()
    assert ids(first["processed"]) == ["acme/a", "acme/b"] and first["failed"] == []
    models = catalog.load(store)[0]["models"]
    assert set(models) == {"acme/a@r1", "acme/b@r1"}
    for entry in models.values():
        assert entry["status"] == "done" and entry["attempts"] == 1 and entry["last_error"] is None
        assert parse_model_url(entry["model_url"]).is_complete()
    assert models["acme/a@r1"]["model_url"].endswith("/models/acme--a/r1")

    # Again: nothing to do.
    again = batch()
    assert again["processed"] == [] and again["failed"] == []
    assert {o["reason"] for o in again["skipped"]} == {"done"}

    # A third model and a broken one: only those are tried; the broken one fails alone.
    write_manifest(tmp_path / "src", fixtures_dir, ["a", "b", "c", "broken"])
    state = leaderboard_batch(
        source=manifest,
        store=store,
        pipeline=PIPELINE,
        stages=STAGES,
        max_attempts=2,
        backoff_seconds=0,
        return_state=True,
    )
    third = state.result()
    assert ids(third["processed"]) == ["acme/c"] and ids(third["failed"]) == ["acme/broken"]
    broken = catalog.load(store)[0]["models"]["acme/broken@r1"]
    assert broken["status"] == "failed" and broken["attempts"] == 1
    assert "ollama_test_truncated_6B.gguf" in broken["last_error"]

    # The summary artifacts of that batch list processed, failed and skipped models.
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    summary = next(a for a in artifacts if a.key == "leaderboard-batch")
    assert "1 processed, 1 failed, 2 skipped" in summary.data and "acme/broken" in summary.data
    assert any(a.type == "table" for a in artifacts)

    # Retried on the next batch (backoff 0), up to the cap of 2 tries, then left alone.
    fourth = batch()
    assert fourth["processed"] == [] and ids(fourth["failed"]) == ["acme/broken"]
    assert catalog.load(store)[0]["models"]["acme/broken@r1"]["attempts"] == 2
    fifth = batch()
    assert fifth["processed"] == [] and fifth["failed"] == []
    capped = next(o for o in fifth["skipped"] if o["id"] == "acme/broken")
    assert capped["reason"].startswith("failed 2 times (cap 2)")
    final = catalog.load(store)[0]["models"]
    assert [final[k]["status"] for k in sorted(final)] == ["done", "done", "failed", "done"]


def test_the_library_loop_and_a_dry_run(tmp_path: Path, fixtures_dir: Path) -> None:
    store = str(tmp_path / "store")
    manifest = str(write_manifest(tmp_path / "src", fixtures_dir, ["a", "broken"]))
    entries = read_source(manifest, SourceQuery())

    summary = run_batch(
        plan_batch(entries, catalog.load(store)[0], catalog.now_utc()),
        store,
        extract_only(store),
        backoff_seconds=3600,
    )
    assert [o.id for o in summary.processed] == ["acme/a"] and [o.id for o in summary.failed] == ["acme/broken"]

    # The broken model now waits for its backoff; the dry run says so and changes nothing.
    before = Path(store, catalog.KEY).read_bytes()
    result = cli("--source", manifest, "--store", store, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in json.loads(result.stdout)}
    assert rows["acme/a"]["action"] == "leave" and rows["acme/a"]["reason"] == "done"
    assert rows["acme/broken"]["action"] == "leave" and "next try after" in rows["acme/broken"]["reason"]
    assert Path(store, catalog.KEY).read_bytes() == before

    # --no-prefect runs the extract stage alone; asking for more is a one-line error.
    result = cli("--source", manifest, "--store", store, "--no-prefect", "--stages", "extract,weight-stats")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "--stages" in result.stderr


@pytest.mark.parametrize(("text", "problem"), [
    ("- {id: acme/a, source: a.safetensors}", "no 'revision'"),
    ("- {id: acme/a, source: a.safetensors, revision: 1, colour: red}", "unknown field 'colour'"),
    ("- {id: acme/a, source: a.safetensors, revision: 1}\n"
     "- {id: acme/a, source: b.safetensors, revision: 1}", "acme/a@1 is listed twice"),
    ("{id: acme/a", "not JSON or YAML"),
    ('{"models": 3}', "is a list of"),
])  # fmt: skip
def test_a_bad_manifest_is_a_one_line_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "leaderboard.yaml"
    path.write_text(text)
    with pytest.raises(WeightsmithError, match=re.escape(problem)) as info:
        read_source(str(path), SourceQuery())
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_json_manifest_over_http(http_server, fixtures_dir: Path) -> None:
    """A manifest may live behind http(s); its relative sources are relative to it."""
    (http_server.root / "m.json").write_text(
        json.dumps([{"id": "acme/a", "source": "a/model.safetensors", "revision": "2024-06-01"}])
    )
    (entry,) = read_source(http_server.url_for("m.json"), SourceQuery(filter="gptq"))  # filter: hub only
    assert (entry.id, entry.revision, entry.source) == (
        "acme/a",
        "2024-06-01",
        http_server.url_for("a/model.safetensors"),
    )


def cli(*args: str):
    from weightsmith.cli.leaderboard import leaderboard

    app = typer.Typer(add_completion=False)
    app.command("leaderboard")(leaderboard)
    app.command("other")(lambda: None)  # two commands: typer keeps the command name
    return CliRunner().invoke(app, ["leaderboard", *args])


# ---------------------------------------------------------------------------------------------
# the deployment, on a real Prefect server with a cpu worker

RUN_TIMEOUT = 240.0
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _api(api_url: str, path: str):
    with NO_PROXY.open(f"{api_url}{path}", timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_the_daily_deployment_processes_a_manifest(tmp_path: Path, fixtures_dir: Path) -> None:
    from weightsmith.dev import stack as devstack

    home = tmp_path / "home"
    store = str(tmp_path / "store")
    manifest = str(write_manifest(tmp_path / "src", fixtures_dir, ["a", "b"]))
    stack = devstack.up(home, gpu_worker=False)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
        env |= stack.env() | {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        pipeline = "weightsmith-pipeline/cpu" if HAS_PIPELINE else "extract-model/cpu"
        _run(
            [
                sys.executable,
                str(ROOT / "deployments" / "deploy.py"),
                "--only",
                "leaderboard-batch/daily",
                pipeline,
            ],
            env,
            timeout=300,
        )

        deployment = _api(stack.api_url, "/deployments/name/leaderboard-batch/daily")
        crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
        assert crons == ["0 3 * * *"], deployment["schedules"]
        assert deployment["parameters"]["source"] == "hf-hub"

        prefect = str(Path(sys.executable).with_name("prefect"))
        params = [
            "--param",
            f"source={manifest}",
            "--param",
            f"store={store}",
            "--param",
            f"pipeline={PIPELINE}",
        ]
        if STAGES:
            params += ["--param", f"stages={json.dumps(STAGES)}"]
        created = _run([prefect, "deployment", "run", "leaderboard-batch/daily", *params], env, timeout=120)
        match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
        assert match, created.stdout
        deadline, state = time.monotonic() + RUN_TIMEOUT, "UNKNOWN"
        while time.monotonic() < deadline and state not in {
            "COMPLETED",
            "FAILED",
            "CRASHED",
            "CANCELLED",
        }:
            time.sleep(1)
            state = _api(stack.api_url, f"/flow_runs/{match.group(1)}")["state"]["type"]
        log = Path(stack.components["worker-cpu"].log).read_text(errors="replace")[-6000:]
        assert state == "COMPLETED", log
        models = catalog.load(store)[0]["models"]
        assert {k: m["status"] for k, m in models.items()} == {
            "acme/a@r1": "done",
            "acme/b@r1": "done",
        }, log
        # Each model ran through the pipeline's deployment on the worker, not in the batch.
        runs = _post(
            stack.api_url,
            "/flow_runs/filter",
            {"flow_runs": {"parent_task_run_id": {"is_null_": False}}},
        )
        assert sum(r["deployment_id"] is not None for r in runs) >= 2
    finally:
        devstack.down(home)


def _post(api_url: str, path: str, body: dict):
    request = urllib.request.Request(
        f"{api_url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with NO_PROXY.open(request, timeout=10) as response:
        return json.loads(response.read())


def _run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result
