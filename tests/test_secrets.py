"""Credentials from the environment never leak: the extract flow, the predict dispatcher and the
pipeline run with the S3 secret key and a Hugging Face token in the environment, and neither
appears in any log line (Prefect's stored logs of every run, captured stdout/stderr and log
records), artifact, flow or task run parameter, state message, stored result, or object in the
bucket (manifest, run facts, prediction, report, images).

SeaweedFS rejects requests that carry a session token it did not issue, so the session token
is checked where no request needs it: the presigned links of the summary artifact.
(tests/flows/test_extract_flow.py covers keys from a saved Prefect block.)
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker
from safetensors.numpy import save_file

from weightsmith.dev.seaweed import S3Server
from weightsmith.model import parse_model_url
from weightsmith_flows.artifacts import publish_model_artifacts
from weightsmith_flows.extract import extract_model
from weightsmith_flows.pipeline import weightsmith_pipeline
from weightsmith_flows.predict import dispatch_predict

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("prefect_harness")]


def write_model(path: Path) -> Path:
    rng = np.random.default_rng(17)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {f"layer.{i}.weight": rng.standard_normal((32, 48)).astype(np.float32) for i in range(4)}
    values["norm.weight"] = rng.standard_normal(48).astype(np.float32)
    save_file(values, str(path))
    return path


@pytest.fixture
def fresh_boto3() -> None:
    """boto3's default session keeps the first keys it resolved in this process (see
    tests/faults/test_storage_errors.py); start from none so this test's keys are used."""
    import boto3

    boto3.DEFAULT_SESSION = None


def flow_runs_since(started: datetime) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=started)))


def prefect_texts(run_ids: list) -> list[str]:
    """Everything Prefect stored about these flow runs: parameters, state messages, logs,
    artifacts, task run inputs and states."""
    APILogWorker.drain_all(timeout=30)  # logs go to the API in batches
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=run_ids)))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=run_ids))
        )
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
    texts = [json.dumps(r.parameters, default=str) for r in runs]
    texts += [r.state.message or "" for r in runs if r.state]
    texts += [m.message for m in logs]
    texts += [json.dumps(a.data, default=str) + (a.description or "") for a in artifacts]
    texts += [json.dumps(t.task_inputs, default=str) for t in tasks]
    texts += [t.state.message or "" for t in tasks if t.state]
    assert logs and artifacts, "the runs left logs and artifacts to check"
    return texts


def bucket_objects(server: S3Server, bucket: str) -> dict[str, bytes]:
    client = server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def stored_results(since: float) -> dict[str, bytes]:
    """Files Prefect wrote under PREFECT_HOME (persisted results) during the test."""
    home = Path(os.environ["PREFECT_HOME"])
    return {
        str(p): p.read_bytes()
        for p in home.rglob("*")
        if p.is_file() and p.stat().st_mtime >= since and p.suffix not in (".db", ".db-wal")
    }


def test_no_secret_from_the_environment_anywhere(
    s3_server: S3Server,
    s3_bucket: str,
    fresh_boto3: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert secret == s3_server.secret_key
    hf_token = "hf_" + secrets.token_hex(17)
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", hf_token)
    caplog.set_level(logging.INFO)

    local = write_model(tmp_path / "src" / "secretive" / "model.safetensors")
    s3_server.client().upload_file(str(local), s3_bucket, "src/secretive/model.safetensors")
    source = f"s3://{s3_bucket}/src/secretive/model.safetensors"
    store = f"s3://{s3_bucket}/lake"
    started = datetime.now(UTC)
    started_ts = time.time() - 1

    model_url = extract_model(source=source, store=store, unit_bytes=20_000)
    predicted = dispatch_predict(
        model_url=model_url, layer=["layer.0.*"], generator="gaussian", samples=1, images="preview"
    )
    assert predicted["pool"] == "in-process" and predicted["run_url"]
    pipeline = weightsmith_pipeline(
        source=source, store=f"s3://{s3_bucket}/pipeline", stages=["extract", "weight-stats"]
    )
    assert pipeline["report_url"]

    runs = flow_runs_since(started)
    names = {r.name for r in runs}
    assert len(runs) >= 5, names  # extract, dispatch + predict-layer, pipeline + its extract
    texts = prefect_texts([r.id for r in runs])
    captured = capfd.readouterr()
    texts += [captured.out, captured.err, caplog.text]
    texts += [r.getMessage() for r in caplog.records]
    objects = bucket_objects(s3_server, s3_bucket)
    assert any(k.endswith("manifest.json") for k in objects)
    assert any(k.endswith("prediction.json") or "/predictions/" in k for k in objects), sorted(objects)
    assert any("report" in k for k in objects), sorted(objects)
    blobs = {**objects, **stored_results(started_ts)}

    for needle, what in ((secret, "secret key"), (hf_token, "HF token")):
        leaks = [t[:300] for t in texts if needle in t]
        assert leaks == [], f"the {what} is in Prefect's records or the logs: {leaks}"
        leaked = [k for k, data in blobs.items() if needle.encode() in data]
        assert leaked == [], f"the {what} is in stored objects: {leaked}"


@flow(name="summarize-model")
def summarize(model_url: str) -> None:
    model = parse_model_url(model_url)
    publish_model_artifacts(model, model.manifest(), 1.0, "unchanged")


def test_no_session_token_in_the_summary_artifact(
    s3_server: S3Server,
    s3_bucket: str,
    fresh_boto3: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import boto3

    local = write_model(tmp_path / "src" / "temporary" / "model.safetensors")
    s3_server.client().upload_file(str(local), s3_bucket, "src/temporary/model.safetensors")
    source = f"s3://{s3_bucket}/src/temporary/model.safetensors"
    model_url = extract_model(source=source, store=f"s3://{s3_bucket}/lake")
    model = parse_model_url(model_url)
    # Reads keep going through the s3fs client this thread already has (SeaweedFS would refuse
    # a token it did not issue); the links are signed by a new boto3 client, as in a new
    # process whose environment holds temporary credentials.
    assert model.store.size(model.prefix) > 0
    token = "IQoJb3JpZ2luX2VjE" + secrets.token_hex(24)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    boto3.DEFAULT_SESSION = None

    state = summarize(model_url, return_state=True)
    assert state.is_completed(), state
    texts = prefect_texts([state.state_details.flow_run_id])
    assert any(
        "s3://" in t and ".png" in t for t in texts
    )  # previews listed by key: a presigned URL would carry the token
    assert [t[:300] for t in texts if token in t] == []
