"""The predict dispatcher against a real Prefect server and real workers (weightsmith.dev.stack).

No `gpu` worker -> the run goes to the `cpu` pool; a `gpu`-pool worker (DEVICE=cpu, since CI has
no GPU) -> the `gpu` pool; a gpu run that does not finish within the timeout is cancelled and
re-sent to `cpu`. The dispatcher records the choice, the reason and the device in its artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_deployments import client_env, processes_of, run
from weightsmith.dev import stack as devstack
from weightsmith.extract import ExtractOptions, extract

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FIXTURE = "safetensors/diffusers_sd_pokemon_lora.safetensors"


def dispatch(env: dict[str, str], model_url: str, **extra) -> dict:
    """Run the dispatcher flow in a fresh process, as a user would; returns its result."""
    args = {
        "model_url": model_url,
        "layer": ["*mid_block*to_q*"],
        "generator": "gaussian",
        "images": "none",
        **extra,
    }
    code = (
        "import json, sys; from flows.predict import dispatch_predict; "
        f"print('RESULT' + json.dumps(dispatch_predict(**json.loads({json.dumps(json.dumps(args))}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def start_gpu_worker(stack, env: dict[str, str], home: Path) -> subprocess.Popen:
    """A `gpu`-pool worker (DEVICE=cpu), online in the API before this returns."""
    log = open(home / "gpu-worker.log", "w")  # noqa: SIM115 - closed with the process
    worker = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("prefect")),
            "worker",
            "start",
            "--pool",
            "gpu",
            "--type",
            "process",
            "--name",
            "test-gpu",
            "--install-policy",
            "never",
        ],
        cwd=ROOT,
        env={**env, "DEVICE": "cpu", "PREFECT_WORKER_QUERY_SECONDS": "2"},
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    import urllib.request

    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"{stack.api_url}/work_pools/gpu/workers/filter",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=10) as r:
            if any(w.get("status") == "ONLINE" for w in json.loads(r.read())):
                return worker
        time.sleep(1)
    pytest.fail("the gpu worker did not come online:\n" + (home / "gpu-worker.log").read_text()[-3000:])


def test_dispatch_cpu_then_gpu_then_timeout_to_cpu(tmp_path, fixtures_dir, use_stack_s3):
    home = tmp_path / "home"
    stack = devstack.up(home, gpu_worker=False)
    worker = None
    try:
        env = client_env(stack)
        run(
            [
                sys.executable,
                str(ROOT / "deployments" / "deploy.py"),
                "--only",
                "predict-layer/gpu",
                "predict-layer/cpu",
            ],
            env,
            timeout=300,
        )
        use_stack_s3(stack)
        stack.client().upload_file(str(fixtures_dir / FIXTURE), stack.bucket, "src/lora/model.safetensors")
        model_url = extract(
            f"s3://{stack.bucket}/src/lora/model.safetensors",
            ExtractOptions(store=stack.store, images="none"),
        ).model_url

        on_cpu = dispatch(env, model_url)
        assert on_cpu["pool"] == "cpu", on_cpu
        assert "online worker" in on_cpu["reason"] and on_cpu["devices"] == ["cpu"]

        worker = start_gpu_worker(stack, env, home)
        on_gpu = dispatch(env, model_url, seed=1)
        assert on_gpu["pool"] == "gpu", (on_gpu, (home / "gpu-worker.log").read_text()[-4000:])
        assert on_gpu["host_device_env"] == "cpu"  # the gpu pool's worker ran it (DEVICE=cpu here)

        moved = dispatch(env, model_url, seed=2, gpu_timeout=0.5)
        assert moved["pool"] == "cpu" and "re-sent to cpu" in moved["reason"], moved
        assert [a[0] for a in moved["attempts"]] == ["gpu", "cpu"]
    finally:
        if worker is not None:
            os.killpg(worker.pid, 9)
            worker.wait()
        devstack.down(home)
    assert processes_of(home) == []
