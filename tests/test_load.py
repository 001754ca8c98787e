"""Load: 20 models extracted at once through the `extract-model/cpu` deployment and the `cpu`
process worker of a real local stack (weightsmith.dev.stack: Prefect server, worker, SeaweedFS),
every manifest verified afterwards.

All 20 runs are created at once. The `cpu` pool gets a concurrency limit (POOL_LIMIT): the
process worker starts every flow run as a Python process of its own, and 20 interpreters
starting together on 2 cores only slow each other down; the rest wait in the queue, which is
also part of what is tested. The timings are printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from weightsmith.dev import stack as devstack
from weightsmith.dev.stack import DevStack
from weightsmith.model import MANIFEST, parse_model_url
from weightsmith.verify import verify

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MODELS = 20
TENSORS = 6
# 0: no limit (every run starts at once). Override with WEIGHTSMITH_LOAD_POOL_LIMIT.
POOL_LIMIT = int(os.environ.get("WEIGHTSMITH_LOAD_POOL_LIMIT", "4"))
DEADLINE = 360.0  # seconds for all runs, from the moment they are created
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def write_model(path: Path, seed: int) -> Path:
    """A small model of its own (distinct values, so a distinct content revision)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {f"layer.{i}.weight": rng.standard_normal((64, 128)).astype(np.float32) for i in range(TENSORS - 1)}
    values["norm.weight"] = rng.standard_normal(128).astype(np.float16)
    save_file(values, str(path))
    return path


def client_env(stack: DevStack) -> dict[str, str]:
    """What a user's shell has after pasting the `dev up` exports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env | stack.env()


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def worker_log(stack: DevStack, lines: int = 80) -> str:
    log = Path(stack.components["worker-cpu"].log)
    return f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def test_twenty_models_through_the_deployment(tmp_path: Path, use_stack_s3: Callable[[DevStack], None]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path / "home"
    timings: dict[str, float] = {}
    started = time.monotonic()
    stack = devstack.up(home, gpu_worker=False)
    timings["up"] = time.monotonic() - started
    try:
        env = client_env(stack)
        mark = time.monotonic()
        run([sys.executable, str(ROOT / "deployments" / "deploy.py"), "--only", "extract-model/cpu"],
            env, timeout=300)  # fmt: skip
        prefect = str(Path(sys.executable).with_name("prefect"))
        if POOL_LIMIT:
            run([prefect, "--no-prompt", "work-pool", "set-concurrency-limit", "cpu", str(POOL_LIMIT)],
                env, timeout=120)  # fmt: skip
        timings["deploy"] = time.monotonic() - mark

        mark = time.monotonic()
        client = stack.client()
        sources = []
        for i in range(MODELS):
            local = write_model(tmp_path / "src" / f"model-{i:02d}" / "model.safetensors", seed=i)
            key = f"src/model-{i:02d}/model.safetensors"
            client.upload_file(str(local), stack.bucket, key)
            sources.append(f"s3://{stack.bucket}/{key}")
        timings["upload"] = time.monotonic() - mark

        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            mark = time.monotonic()
            flow_runs = [
                run_deployment(
                    "extract-model/cpu",
                    parameters={"source": source, "store": stack.store},
                    timeout=0,  # create the run and return at once
                )
                for source in sources
            ]
            timings["create runs"] = time.monotonic() - mark
            ids = [r.id for r in flow_runs]
            deadline = mark + DEADLINE
            states: dict[str, int] = {}
            while True:
                with get_client(sync_client=True) as api:
                    runs = api.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)), limit=MODELS)
                states = {}
                for r in runs:
                    states[r.state.type.value] = states.get(r.state.type.value, 0) + 1
                if sum(n for s, n in states.items() if s in FINAL) == MODELS:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"after {DEADLINE:.0f} s the runs are {states}\n{worker_log(stack)}")
                time.sleep(2)
            timings["all runs final"] = time.monotonic() - mark
            assert states == {"COMPLETED": MODELS}, f"{states}\n{worker_log(stack)}"
            spans = [(r.start_time, r.end_time) for r in runs]
            run_seconds = sorted((end - start).total_seconds() for start, end in spans)

        mark = time.monotonic()
        use_stack_s3(stack)
        bucket_client = stack.client()
        for i, source in enumerate(sources):
            prefix = f"lake/models/model-{i:02d}/"
            listing = bucket_client.list_objects_v2(Bucket=stack.bucket, Prefix=prefix, Delimiter="/")
            # Prefixes that hold objects: a finished staged run deletes its `.staging-<run>/`
            # objects, but SeaweedFS drops the emptied folder from listings only later.
            revisions = [
                p["Prefix"]
                for p in listing.get("CommonPrefixes", [])
                if bucket_client.list_objects_v2(Bucket=stack.bucket, Prefix=p["Prefix"], MaxKeys=1).get("KeyCount")
            ]
            assert len(revisions) == 1, revisions
            model_url = f"s3://{stack.bucket}/{revisions[0].rstrip('/')}"
            model = parse_model_url(model_url)
            manifest = json.loads(model.store.read_bytes(model.key(MANIFEST)))
            assert manifest["source"]["url"] == source
            assert manifest["selection"]["complete"] is True
            assert len(manifest["tensors"]) == TENSORS
            report = verify(model_url)
            assert report.ok, (model_url, report.problems)
            assert report.checked == 3 * TENSORS + len(manifest["files"])
        timings["verify"] = time.monotonic() - mark
    finally:
        mark = time.monotonic()
        stopped = devstack.down(home)
        timings["down"] = time.monotonic() - mark
    assert set(stopped) == {"s3", "server", "worker-cpu"}
    timings["total"] = time.monotonic() - started
    print(
        f"\n{MODELS} models, pool limit {POOL_LIMIT}: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + f"; flow run time min {run_seconds[0]:.1f} s, median "
        f"{run_seconds[len(run_seconds) // 2]:.1f} s, max {run_seconds[-1]:.1f} s"
    )
