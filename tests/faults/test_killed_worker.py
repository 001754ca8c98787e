"""A process running the extract flow killed with SIGKILL part-way: nothing is published, every
tensor marked finished is whole, and re-running recomputes only the missing tensors (the run
facts' `written` count) and publishes the manifest of an uninterrupted run, byte for byte.

Two kills: the whole flow-run process group (what a worker's flow-run process dying looks
like), and one task process of the `processes` task runner while the flow process lives on.
The flow runs in a subprocess against the session's Prefect test server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from fault_helpers import count_whole_tensors, tail, wait_until, write_model

from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.store import arrays
from weightsmith.verify import verify
from weightsmith_flows.extract import extract_model

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[2]
TENSORS = 40
FLOW_FINISHED = re.compile(r"Flow run '[^']+' - Finished in state (\w+)")
FLOW_SCRIPT = """
import sys
from weightsmith_flows.extract import extract_model
from weightsmith_flows.runners import make_runner
source, store, runner = sys.argv[1:4]
flow = extract_model.with_options(task_runner=make_runner(runner, 2))
print(flow(source=source, store=store, unit_bytes=1), flush=True)
"""


def api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect test harness sets an API URL"
    return url


def start_flow(source: str, store: str, runner: str, log: Path) -> subprocess.Popen:
    """The extract flow in a process (and session) of its own, on the harness's API server."""
    # INFO: the test reads Prefect's "Finished in state" line, whatever level an earlier test set
    # in this process's environment (state.configure_prefect sets WARNING for the CLI).
    env = {**os.environ, "PREFECT_API_URL": api_url(), "PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", FLOW_SCRIPT, source, store, runner],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finished_on_disk(model: ModelRef) -> int:
    """Tensors whose zarr.json carries the record (a cheap poll; read_record decides later)."""
    tensors = Path(model.store.path(model.key("tensors")))
    count = 0
    for meta in tensors.glob("*.zarr/zarr.json"):
        try:
            count += f'"{arrays.RECORD}"' in meta.read_text()
        except (OSError, UnicodeDecodeError):
            pass  # being replaced right now
    return count


def task_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The spawned task-runner processes of the flow process (not the resource tracker)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            pass
    return found


def run_facts(model: ModelRef) -> list[dict]:
    folder = Path(model.store.path(model.key("runs")))
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param("flow-process", id="flow-process-group"),
        pytest.param("task-process", id="one-task-process", marks=pytest.mark.slow),
    ],
)
def test_killed_mid_run_then_rerun_recomputes_only_missing(tmp_path: Path, kill: str) -> None:
    source = str(write_model(tmp_path / "src" / "wide" / "model.safetensors", TENSORS, seed=9))
    reference = extract(source, ExtractOptions(store=str(tmp_path / "reference")))
    ref_model = parse_model_url(reference.model_url)
    ref_manifest = ref_model.store.read_bytes(ref_model.key(MANIFEST))
    store = str(tmp_path / "store")
    model = parse_model_url(f"{store}/{ref_model.prefix}")
    log = tmp_path / "flow.log"

    runner = "threads" if kill == "flow-process" else "processes"
    process = start_flow(source, store, runner, log)
    try:
        wait_until(
            lambda: finished_on_disk(model) >= 6 or process.poll() is not None,
            timeout=240,
            what="six finished tensors",
            poll=0.02,
            log=log,
        )
        assert process.poll() is None, f"the flow ended before the kill\n{tail(log)}"
        if kill == "flow-process":
            os.killpg(process.pid, signal.SIGKILL)  # the flow process and all it started
            process.wait(timeout=30)
            assert process.returncode == -signal.SIGKILL
        else:
            victims = task_processes(process)
            assert victims, f"no task process found\n{tail(log)}"
            victims[0].send_signal(signal.SIGKILL)
            # The flow run notices the broken pool and fails without publishing.
            wait_until(
                lambda: process.poll() is not None or FLOW_FINISHED.search(log.read_text(errors="replace")),
                timeout=180,
                what="the flow run to end",
                poll=0.02,
                log=log,
            )
            finished = FLOW_FINISHED.search(log.read_text(errors="replace"))
            assert finished and finished.group(1) == "Failed", tail(log)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Seen now and then: the run is over, but the interpreter hangs at exit in the
                # broken process pool's shutdown. Not what this test is about; noted, then killed.
                print("note: the flow process outlived its failed run by 30 s (broken pool shutdown)")
            else:
                assert process.returncode != 0, tail(log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        with_group = [p for p in psutil.process_iter() if _in_group(p, process.pid)]
        for p in with_group:  # task processes that outlived their parent
            p.kill()

    # Killed: no manifest, and every tensor marked finished is whole.
    assert not model.is_complete()
    reference_records = json.loads(ref_manifest)["tensors"]
    finished = count_whole_tensors(model, reference_records, reference_records)
    assert 6 <= finished < TENSORS, finished
    assert [r["outcome"] for r in run_facts(model)] in ([], ["failed"])

    # The re-run (in this process) writes only what is missing.
    state = extract_model(source=source, store=store, unit_bytes=1, return_state=True)
    assert state.is_completed(), state
    done = [r for r in run_facts(model) if r["outcome"] == "created"]
    assert len(done) == 1, run_facts(model)
    assert done[0]["written"] == TENSORS - finished
    assert done[0]["tensors"] == TENSORS
    assert model.store.read_bytes(model.key(MANIFEST)) == ref_manifest
    report = verify(model.url)
    assert report.ok, report.problems
    print(f"{kill}: killed after {finished}/{TENSORS} tensors; re-run wrote {TENSORS - finished}")


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False
