"""The `extract-model/cpu` and `build-zoo/cpu` deployments, end to end on a real local stack: a
Prefect server and a `cpu` process worker on 127.0.0.1 (weightsmith.dev.stack), deployed with
deployments/deploy.py and run with `prefect deployment run`. The extract flow reads the model
from S3 and writes the same manifest into the store as the library does; the zoo flow stacks two
store models into a zoo; and `down` leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from weightsmith.dev import stack as devstack
from weightsmith.dev.stack import DevStack
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.store import Store
from weightsmith.zoo import read_zoo, read_zoo_tensor

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = "safetensors/ollama_minicpm3_4b_model.safetensors"
# The slug comes from the source's folder, so the object sits in a folder named for the model.
SOURCE_KEY = "src/minicpm3/ollama_minicpm3_4b_model.safetensors"
RUN_TIMEOUT = 180.0
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def client_env(stack: DevStack) -> dict[str, str]:
    """What a user's shell has after pasting the `dev up` exports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env | stack.env()


def run(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def flow_run_state(api_url: str, flow_run_id: str) -> str:
    with NO_PROXY.open(f"{api_url}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["type"]


def wait_for_flow_run(stack: DevStack, flow_run_id: str) -> str:
    """The final state type of the flow run; fails with the worker's log after RUN_TIMEOUT."""
    deadline = time.monotonic() + RUN_TIMEOUT
    state = "UNKNOWN"
    while time.monotonic() < deadline:
        state = flow_run_state(stack.api_url, flow_run_id)
        if state in FINAL_STATES:
            return state
        time.sleep(1)
    pytest.fail(f"flow run still {state} after {RUN_TIMEOUT:.0f} s\n{worker_log(stack)}")


def worker_log(stack: DevStack, lines: int = 60) -> str:
    log = Path(stack.components["worker-cpu"].log)
    return f"--- {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_flow_run_processes(stack: DevStack, timeout: float = 60.0) -> list[int]:
    """Pids of the worker's children once the worker has started a flow run process."""
    worker = psutil.Process(stack.components["worker-cpu"].pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [p.pid for p in worker.children(recursive=True)]
        if children:
            return children
        time.sleep(0.1)
    pytest.fail(f"the worker started no flow run process in {timeout:.0f} s\n{worker_log(stack)}")


def processes_of(home: Path) -> list[str]:
    """Live processes whose command line or environment names the state folder."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
            continue
        text = " ".join(p.info["cmdline"] or []) + " " + " ".join((p.info["environ"] or {}).values())
        if str(home) in text:
            found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
    return found


def test_extract_model_deployment_matches_the_library(
    tmp_path: Path, fixtures_dir: Path, use_stack_s3: Callable[[DevStack], None]
) -> None:
    home = tmp_path / "home"
    timings: dict[str, float] = {}
    started = time.monotonic()
    stack = devstack.up(home, gpu_worker=False)
    timings["up"] = time.monotonic() - started
    pids = [c.pid for c in stack.components.values()]
    try:
        env = client_env(stack)
        mark = time.monotonic()
        deploy = [sys.executable, str(ROOT / "deployments" / "deploy.py")]
        run([*deploy, "--only", "extract-model/cpu", "build-zoo/cpu"], env, timeout=300)
        timings["deploy"] = time.monotonic() - mark

        stack.client().upload_file(str(fixtures_dir / FIXTURE), stack.bucket, SOURCE_KEY)
        source = f"s3://{stack.bucket}/{SOURCE_KEY}"
        mark = time.monotonic()
        prefect = str(Path(sys.executable).with_name("prefect"))
        created = run(
            [prefect, "deployment", "run", "extract-model/cpu",
             "--param", f"source={source}", "--param", f"store={stack.store}"],
            env,
            timeout=120,
        )  # fmt: skip
        match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
        assert match, created.stdout
        state = wait_for_flow_run(stack, match.group(1))
        timings["flow run"] = time.monotonic() - mark
        assert state == "COMPLETED", worker_log(stack)

        # The library, in this process, extracts the same source into another prefix.
        use_stack_s3(stack)
        library = extract(source, ExtractOptions(store=f"s3://{stack.bucket}/library"))
        deployed = ModelRef(Store(stack.store), library.slug, library.revision)
        assert library.slug == "minicpm3"
        assert deployed.is_complete(), f"no manifest at {deployed.url}"
        # Keys in a manifest are relative to its store: both runs wrote the same bytes.
        reference = parse_model_url(library.model_url)
        assert deployed.store.read_bytes(deployed.key(MANIFEST)) == reference.store.read_bytes(reference.key(MANIFEST))
        assert len(deployed.manifest()["tensors"]) == library.tensors > 0

        # build-zoo/cpu: the two copies of the model, stacked into a zoo in the stack's store.
        mark = time.monotonic()
        members = json.dumps([deployed.url, library.model_url])
        created = run(
            [prefect, "deployment", "run", "build-zoo/cpu",
             "--param", "zoo_id=copies", "--param", f"models={members}", "--param", f"store={stack.store}"],
            env,
            timeout=120,
        )  # fmt: skip
        match = re.search(r"UUID: ([0-9a-f-]{36})", created.stdout)
        assert match, created.stdout
        assert wait_for_flow_run(stack, match.group(1)) == "COMPLETED", worker_log(stack)
        timings["zoo run"] = time.monotonic() - mark
        zoo = read_zoo(Store(stack.store), "copies")
        assert [m["url"] for m in zoo["members"]] == json.loads(members)
        assert zoo["checkpoints"] == 2 and len(zoo["tensors"]) == library.tensors
        name = next(iter(zoo["tensors"]))
        stacked = read_zoo_tensor(Store(stack.store), "copies", name)
        assert (stacked[0] == stacked[1]).all()  # the same model twice

        # A run in progress: `down` stops its process too (it runs in a session of its own).
        run(
            [prefect, "deployment", "run", "extract-model/cpu",
             "--param", f"source={source}", "--param", f"store=s3://{stack.bucket}/second"],
            env,
            timeout=120,
        )  # fmt: skip
        flow_run_pids = wait_for_flow_run_processes(stack)
    finally:
        mark = time.monotonic()
        stopped = devstack.down(home)
        timings["down"] = time.monotonic() - mark
    assert set(stopped) == {"s3", "server", "worker-cpu"}
    assert [pid for pid in pids + flow_run_pids if _alive(pid)] == []
    assert processes_of(home) == []
    print(", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
