"""The extract-model flow under a real Prefect server (session harness) against real stores."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import boto3
import pytest
from prefect.client.orchestration import get_client

from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith_flows.extract import extract_model
from weightsmith_flows.runners import make_runner

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _upload(s3_server, bucket: str, path: Path, prefix: str) -> str:
    client = s3_server.client()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    for f in files:
        client.upload_file(str(f), bucket, f"{prefix}/{f.name}")
    return f"s3://{bucket}/{prefix}/" + ("" if path.is_dir() else path.name)


def _manifest_bytes(model_url: str) -> bytes:
    model = parse_model_url(model_url)
    return model.store.read_bytes(model.key("manifest.json"))


def _contents(model_url: str) -> list[str]:
    model = parse_model_url(model_url)
    return [k[len(model.prefix) :] for k in model.store.list(model.prefix) if "/runs/" not in k]


@pytest.mark.s3
@pytest.mark.parametrize("fixture", ["safetensors/sharded_minicpm3", "gptq/llama_3_2_1b_int4.safetensors"])
def test_flow_writes_what_the_library_writes(s3_server, s3_bucket, fixtures_dir, fixture):
    source = _upload(s3_server, s3_bucket, fixtures_dir / fixture, "src")
    state = extract_model(source=source, store=f"s3://{s3_bucket}/flow", unit_bytes=100_000, return_state=True)
    assert state.is_completed(), state
    flow_url = state.result()
    lib = extract(source, ExtractOptions(store=f"s3://{s3_bucket}/lib"))
    assert _manifest_bytes(flow_url) == _manifest_bytes(lib.model_url)
    assert _contents(flow_url) == _contents(lib.model_url)
    # A remote source without --revision goes through the run's staging folder, removed after.
    model = parse_model_url(flow_url)
    assert {k.split("/")[2] for k in model.store.list(f"models/{model.slug}")} == {model.revision}

    # Artifacts of the run: tensor table, summary with presigned preview links, progress.
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs go to the API in batches: the flow can end first
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    kinds = {a.type for a in artifacts}
    assert {"table", "markdown", "progress"} <= kinds
    summary = next(a for a in artifacts if a.type == "markdown").data
    assert "X-Amz-Signature" in summary and flow_url in summary
    assert next(a for a in artifacts if a.type == "progress").data == pytest.approx(100.0)
    secret = s3_server.env()["AWS_SECRET_ACCESS_KEY"]
    assert all(secret not in json.dumps(a.data) for a in artifacts)


def test_failed_unit_then_resume_recomputes_only_missing(tmp_path, fixtures_dir):
    source = str(fixtures_dir / "safetensors/ollama_minicpm3_4b_model.safetensors")
    reference = extract(source, ExtractOptions(store=str(tmp_path / "ref")))
    store = tmp_path / "store"
    model = parse_model_url(reference.model_url.replace(str(tmp_path / "ref"), str(store)))
    # Block one tensor's array folder with a plain file: that unit fails, the others finish.
    victim = "model.layers.0.self_attn.q_a_proj.weight"
    blocked = Path(model.store.path(model.tensor_key(victim)))
    blocked.parent.mkdir(parents=True)
    blocked.write_bytes(b"not a folder")

    state = extract_model(source=source, store=str(store), unit_bytes=20_000, return_state=True)
    assert state.is_failed()
    assert not model.is_complete()
    runs = [json.loads(p.read_text()) for p in Path(model.store.path(model.key("runs"))).glob("*.json")]
    assert [r["outcome"] for r in runs] == ["failed"]
    assert runs[0]["written"] == reference.tensors - 1

    blocked.unlink()
    state = extract_model(source=source, store=str(store), unit_bytes=20_000, return_state=True)
    assert state.is_completed()
    assert _manifest_bytes(model.url) == _manifest_bytes(reference.model_url)
    runs = [json.loads(p.read_text()) for p in Path(model.store.path(model.key("runs"))).glob("*.json")]
    assert sorted(r.get("written") for r in runs) == [1, reference.tensors - 1]


class _CountingHashlib:
    """Stands in for `hashlib` in weightsmith.extract: counts the bytes given to sha256."""

    def __init__(self) -> None:
        self.hashed = 0

    def sha256(self, data=b""):
        import hashlib

        h, outer = hashlib.sha256(), self

        class Counting:
            def update(self, chunk) -> None:
                outer.hashed += memoryview(chunk).nbytes
                h.update(chunk)

            def hexdigest(self) -> str:
                return h.hexdigest()

        counting = Counting()
        counting.update(data)
        return counting


def test_a_local_source_is_hashed_once(tmp_path, fixtures_dir, monkeypatch):
    """The content revision needs every checksum first; the extract tasks then trust them while
    the file's fingerprint (taken before the checksum tasks) is unchanged, as the library does."""
    import weightsmith.extract as lib

    source = fixtures_dir / "safetensors/ollama_minicpm3_4b_model.safetensors"
    reference = extract(str(source), ExtractOptions(store=str(tmp_path / "ref")))
    counting = _CountingHashlib()
    monkeypatch.setattr(lib, "hashlib", counting)
    url = extract_model(source=str(source), store=str(tmp_path / "store"), unit_bytes=100_000)
    assert _manifest_bytes(url) == _manifest_bytes(reference.model_url)
    tensor_bytes = sum(e.nbytes for e in lib.open_source(str(source)).tensors.values())
    assert tensor_bytes <= counting.hashed < 1.1 * tensor_bytes  # headers and names on top, no second pass


def test_wiped_store_is_never_counted_as_done(tmp_path, fixtures_dir):
    source = str(fixtures_dir / "safetensors/hf_samples_overall.safetensors")
    store = tmp_path / "store"
    first = extract_model(source=source, store=str(store))
    shutil.rmtree(store)
    again = extract_model(source=source, store=str(store))
    assert again == first
    assert parse_model_url(again).is_complete()


@pytest.mark.s3
@pytest.mark.slow
def test_dask_cluster_of_two_processes_gives_the_same_manifest(s3_server, s3_bucket, fixtures_dir):
    source = _upload(s3_server, s3_bucket, fixtures_dir / "safetensors/sharded_minicpm3", "src")
    lib = extract(source, ExtractOptions(store=f"s3://{s3_bucket}/lib"))
    flow = extract_model.with_options(task_runner=make_runner("dask", workers=2))
    url = flow(source=source, store=f"s3://{s3_bucket}/dask", unit_bytes=100_000)
    assert _manifest_bytes(url) == _manifest_bytes(lib.model_url)


@pytest.mark.slow
def test_process_pool_runner_gives_the_same_manifest(tmp_path, fixtures_dir):
    source = str(fixtures_dir / "safetensors/ollama_minicpm3_4b_model.safetensors")
    lib = extract(source, ExtractOptions(store=str(tmp_path / "lib")))
    flow = extract_model.with_options(task_runner=make_runner("processes", workers=2))
    url = flow(source=source, store=str(tmp_path / "proc"), unit_bytes=100_000)
    assert _manifest_bytes(url) == _manifest_bytes(lib.model_url)


def test_boto3_is_importable_for_artifacts():  # presigned URLs need boto3 on the flow side
    assert boto3.__version__


@pytest.mark.s3
def test_credentials_from_a_saved_block_and_no_secret_anywhere(s3_server, s3_bucket, fixtures_dir, monkeypatch):
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    source = _upload(s3_server, s3_bucket, fixtures_dir / "gptq/llama_3_2_1b_int4.safetensors", "src")
    env = s3_server.env()
    creds = AwsCredentials(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
        aws_client_parameters=AwsClientParameters(endpoint_url=env["AWS_ENDPOINT_URL_S3"]),
    )
    creds.save("lake-keys", overwrite=True)
    S3Bucket(bucket_name=s3_bucket, bucket_folder="lake", credentials=creds).save("lake", overwrite=True)
    for name in list(env) + ["AWS_ENDPOINT_URL"]:
        monkeypatch.delenv(name, raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()

    state = extract_model(source=source, credentials="s3-bucket/lake", return_state=True)
    assert state.is_completed(), state
    url = state.result()
    assert url.startswith(f"s3://{s3_bucket}/lake/models/")

    secret = env["AWS_SECRET_ACCESS_KEY"]
    run_id = state.state_details.flow_run_id
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)  # logs go to the API in batches: the flow can end first
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        run = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))[0]
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    texts = [m.message for m in logs] + [json.dumps(a.data) for a in artifacts] + [json.dumps(run.parameters)]
    texts += [json.dumps(t.task_inputs, default=str) for t in tasks]
    stored = s3_server.client()
    for obj in stored.list_objects_v2(Bucket=s3_bucket, Prefix="lake/").get("Contents", []):
        if obj["Key"].endswith(".json"):
            texts.append(stored.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read().decode())
    assert logs and artifacts
    assert not [t for t in texts if secret in t]
