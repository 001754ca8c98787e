"""The no-Docker dev stack: `dev up` starts real SeaweedFS, Prefect server and worker processes
whose keys and API work, `up` again changes nothing, and `dev down` leaves no process behind.

The quick tests check the bookkeeping: exports, records, and that stopping never touches a
process that is not the recorded one.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from weightsmith.dev import stack as devstack
from weightsmith.dev.seaweed import Ports, s3_client
from weightsmith.dev.stack import Component, DevStack

ROOT = Path(__file__).resolve().parents[2]
EXPORTED = {
    "PREFECT_API_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "WEIGHTSMITH_STORE",
}


# ---------------------------------------------------------------------------------------------
# helpers


def clean_env(home: Path) -> dict[str, str]:
    """This environment without Prefect or AWS settings, with the test's state folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    return env | {"WEIGHTSMITH_HOME": str(home)}


def dev_cli(*args: str, home: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`weightsmith dev ...` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", "dev", *args],
        cwd=ROOT,
        env=clean_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_exports(text: str) -> dict[str, str]:
    """{name: value} of `export NAME=value` lines, read the way a shell reads them."""
    values = {}
    for line in text.splitlines():
        words = shlex.split(line)
        assert words[0] == "export" and len(words) == 2, line
        name, _, value = words[1].partition("=")
        values[name] = value
    return values


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie left to a non-reaping init is dead)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_of(home: Path) -> list[str]:
    """Live processes whose command line or environment names the state folder."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
            continue
        environ = p.info["environ"] or {}
        text = " ".join(p.info["cmdline"] or []) + " " + " ".join(environ.values())
        if str(home) in text:
            found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])}")
    return found


def wait_until_gone(pids: list[int], home: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(running(pid) for pid in pids) and not processes_of(home):
            return
        time.sleep(0.1)
    assert [pid for pid in pids if running(pid)] == []
    assert processes_of(home) == []


def sleeper(*, new_session: bool = True) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=new_session)


def record(process: subprocess.Popen, name: str = "worker-cpu") -> Component:
    return Component(name, process.pid, devstack._start_time(process.pid), "/dev/null")


# ---------------------------------------------------------------------------------------------
# quick: records and stopping


def sample_stack(home: Path) -> DevStack:
    return DevStack(
        home=home,
        api_url="http://127.0.0.1:23456/api",
        s3_endpoint="http://127.0.0.1:21003",
        access_key="AKTEST",
        secret_key="secret with 'quotes' and $dollar",
        region="us-east-1",
        s3_ports=Ports.from_base(21000),
        components={"s3": Component("s3", 1, 2.0, "/x/weed.out")},
    )


def test_exports_are_shell_lines_with_every_variable(tmp_path: Path) -> None:
    stack = sample_stack(tmp_path / "my home")
    values = parse_exports("\n".join(stack.exports()))
    assert EXPORTED <= set(values)
    assert values["AWS_SECRET_ACCESS_KEY"] == "secret with 'quotes' and $dollar"
    assert values["WEIGHTSMITH_HOME"] == str(tmp_path / "my home")
    assert values["WEIGHTSMITH_STORE"] == "s3://weightsmith/lake"
    assert values["PREFECT_API_URL"] == "http://127.0.0.1:23456/api"
    # The shell gives the same values back.
    script = "\n".join([*stack.exports(), 'printf %s "$AWS_SECRET_ACCESS_KEY"'])
    echoed = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    assert echoed.stdout == stack.secret_key


def test_stack_record_round_trips(tmp_path: Path) -> None:
    stack = sample_stack(tmp_path)
    assert DevStack.from_json(json.loads(json.dumps(stack.to_json()))) == stack


def test_down_and_status_without_a_stack(tmp_path: Path) -> None:
    assert devstack.down(tmp_path) == []
    assert devstack.status(tmp_path) == {
        "home": str(tmp_path),
        "running": False,
        "healthy": False,
        "components": {},
    }


def test_stop_leaves_a_process_that_took_a_recorded_pid_alone() -> None:
    stranger = sleeper()
    try:
        # Same pid, other start time: what `down` finds after the recorded process died and
        # the kernel gave its pid to someone else.
        wrong = record(stranger)
        wrong = Component(wrong.name, wrong.pid, wrong.started - 1, wrong.log)
        assert devstack._stop([wrong], timeout=1) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_stop_takes_descendants_in_sessions_of_their_own(tmp_path: Path) -> None:
    # A worker-like parent whose child (a flow run) runs in its own session: killing the
    # parent's group alone would leave the child running.
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child did not start"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        assert devstack._stop([record(parent)], timeout=5) == ["worker-cpu"]
        assert parent.poll() is not None
        deadline = time.monotonic() + 5
        while running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(child)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_status_reports_a_broken_record_as_a_user_error(tmp_path: Path) -> None:
    devstack.stack_file(tmp_path).parent.mkdir(parents=True)
    devstack.stack_file(tmp_path).write_text("{not json")
    result = dev_cli("status", home=tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {devstack.stack_file(tmp_path)}: not valid JSON")
    assert len(result.stderr.strip().splitlines()) == 1


def test_failed_up_stops_what_it_started_and_names_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server exits at once; SeaweedFS, started meanwhile, must be stopped again.
    monkeypatch.setattr(devstack, "_server_command", lambda port: ["sh", "-c", "exit 3"])
    home = tmp_path / "home"
    with pytest.raises(devstack.WeightsmithError) as excinfo:
        devstack.up(home, gpu_worker=False)
    message = str(excinfo.value)
    assert message.startswith("dev up: the Prefect server exited")
    assert str(devstack.dev_dir(home) / "logs" / "server.log") in message
    assert "\n" not in message
    assert not devstack.stack_file(home).exists()
    wait_until_gone([], home)


# ---------------------------------------------------------------------------------------------
# slow: the real stack


@pytest.mark.slow
def test_dev_up_status_and_down_leave_nothing_running(tmp_path: Path) -> None:
    home = tmp_path / "home"
    started = time.monotonic()
    # A gpu worker even without CUDA: it runs with DEVICE=cpu.
    result = dev_cli("up", "--gpu-worker", home=home)
    up_seconds = time.monotonic() - started
    try:
        assert result.returncode == 0, result.stderr
        exports = parse_exports(result.stdout)
        assert EXPORTED <= set(exports)
        assert "started" in result.stderr
        stack = devstack.load(home)
        assert stack is not None
        assert set(stack.components) == {"s3", "server", "worker-cpu", "worker-gpu"}
        pids = [c.pid for c in stack.components.values()]
        gpu_env = psutil.Process(stack.components["worker-gpu"].pid).environ()
        cuda = devstack._cuda_available()
        assert gpu_env["DEVICE"] == ("cuda" if cuda else "cpu")
        assert gpu_env["PREFECT_API_URL"] == exports["PREFECT_API_URL"]
        assert gpu_env["AWS_ACCESS_KEY_ID"] == exports["AWS_ACCESS_KEY_ID"]

        # Every component runs and passes its health check.
        report = devstack.status(home)
        assert report["healthy"], report
        for name, component in report["components"].items():
            assert component["alive"] and component["healthy"], (name, component)

        # The keys are private on disk and work; the bucket is there; the API answers.
        assert stat.S_IMODE(devstack.stack_file(home).stat().st_mode) == 0o600
        client = s3_client(
            exports["AWS_ENDPOINT_URL_S3"],
            exports["AWS_ACCESS_KEY_ID"],
            exports["AWS_SECRET_ACCESS_KEY"],
            exports["AWS_REGION"],
        )
        assert "weightsmith" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(exports["PREFECT_API_URL"] + "/health", timeout=10) as response:
            assert response.read() == b"true"

        # Only loopback, only ports below 45000.
        for component in stack.components.values():
            process = psutil.Process(component.pid)
            for p in [process, *process.children(recursive=True)]:
                for conn in p.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        assert conn.laddr.ip == "127.0.0.1", (component.name, conn)
                        assert conn.laddr.port < 45000, (component.name, conn)

        # `up` again reports the running stack instead of starting another one.
        again = devstack.up(home)
        assert again.already_running
        assert {c.name: c.pid for c in again.components.values()} == {c.name: c.pid for c in stack.components.values()}
        assert again.exports() == stack.exports()

        status = dev_cli("status", "--json", home=home, timeout=60)
        assert status.returncode == 0, status.stderr
        shown = json.loads(status.stdout)
        assert shown["healthy"] and set(shown["components"]) == set(stack.components)
        assert stack.secret_key not in status.stdout  # status is safe to paste
    finally:
        stopped = dev_cli("down", home=home, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert set(stopped.stdout.split()) >= {"stopped", "s3", "server", "worker-cpu", "worker-gpu"}
    wait_until_gone(pids, home)
    assert not devstack.stack_file(home).exists()
    after = dev_cli("status", home=home, timeout=60)
    assert after.returncode == 1 and "no dev stack" in after.stdout
    print(f"dev up took {up_seconds:.1f} s")
