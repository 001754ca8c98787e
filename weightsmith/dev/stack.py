"""The local stack without Docker: SeaweedFS S3, a Prefect server and process workers.

`up(home)` starts, under `<home>/dev/`:

- SeaweedFS (`weed mini`, see weightsmith.dev.seaweed) with an identity file, data in `dev/s3`,
  and the bucket `weightsmith`;
- `prefect server start` on 127.0.0.1 (SQLite and PREFECT_HOME in `dev/prefect`);
- the work pools `cpu` and `gpu` (type process) and a worker for `cpu`, plus one for `gpu`
  when CUDA is available or asked for.

Every process runs in its own session with its output in `dev/logs/<name>.log` (SeaweedFS
keeps its own logs in `dev/s3/logs`). Pids, process start times, ports and the S3 keys are
recorded in `dev/stack.json` (mode 0600); `down(home)` stops exactly those processes and their
descendants (flow runs), and nothing else. Keys and ports are kept in `dev/config.json` across
restarts, so the `export` lines of an earlier `up` stay valid when the ports are still free.

This module never imports Prefect: it runs the `prefect` command line beside this Python.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from weightsmith.dev import processes
from weightsmith.dev.seaweed import (
    DEFAULT_REGION,
    Ports,
    S3Server,
    port_is_free,
    remove_grpc_sockets,
    s3_client,
    start_s3_server,
)
from weightsmith.errors import WeightsmithError

log = logging.getLogger(__name__)

BUCKET = "weightsmith"
STORE = f"s3://{BUCKET}/lake"
POOLS = ("cpu", "gpu")
# Below SeaweedFS's block (20000-22706, gRPC 30000-32706) and below the ephemeral range.
SERVER_PORT_RANGE = (23000, 29999)
# A cold start (database migrations) takes 6-15 s on 2 idle cores, over 40 s on busy ones.
SERVER_TIMEOUT = 120.0
WORKER_TIMEOUT = 90.0
POOL_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
# Inherited variables that would send the stack's processes to another server, profile or
# credentials; the stack sets what it needs itself, so it starts the same way from any shell.
AWS_NOISE = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Component:
    """One recorded process: its pid is also its process group (own session)."""

    name: str
    pid: int
    # When the process started (see _start_time): tells it from a later one on the same pid.
    started: float
    log: str


@dataclass
class DevStack:
    """A running (or just started) local stack and what clients need to use it."""

    home: Path
    api_url: str
    s3_endpoint: str
    access_key: str
    secret_key: str
    region: str
    s3_ports: Ports
    components: dict[str, Component] = field(default_factory=dict)
    bucket: str = BUCKET
    store: str = STORE
    already_running: bool = False

    @property
    def dev_dir(self) -> Path:
        return dev_dir(self.home)

    @property
    def server_port(self) -> int:
        return int(self.api_url.rsplit(":", 1)[1].split("/")[0])

    def env(self) -> dict[str, str]:
        """The variables clients need: Prefect API, S3 endpoint and admin keys, the store."""
        return {
            "PREFECT_API_URL": self.api_url,
            # Keeps a client's `prefect` command out of ~/.prefect and shares local results.
            "PREFECT_HOME": str(self.dev_dir / "prefect"),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "WEIGHTSMITH_HOME": str(self.home),
            "WEIGHTSMITH_STORE": self.store,
        }

    def exports(self) -> list[str]:
        """`export NAME=value` lines for a POSIX shell (values quoted)."""
        return [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]

    def client(self) -> Any:
        """A boto3 S3 client with the admin keys."""
        return s3_client(self.s3_endpoint, self.access_key, self.secret_key, self.region)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["home"] = str(self.home)
        data.pop("already_running")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DevStack:
        return cls(
            home=Path(data["home"]),
            api_url=data["api_url"],
            s3_endpoint=data["s3_endpoint"],
            access_key=data["access_key"],
            secret_key=data["secret_key"],
            region=data["region"],
            s3_ports=Ports(**data["s3_ports"]),
            components={k: Component(**v) for k, v in data["components"].items()},
            bucket=data.get("bucket", BUCKET),
            store=data.get("store", STORE),
        )


def dev_dir(home: Path) -> Path:
    return Path(home).absolute() / "dev"


def stack_file(home: Path) -> Path:
    return dev_dir(home) / "stack.json"


def config_file(home: Path) -> Path:
    return dev_dir(home) / "config.json"


def load(home: Path) -> DevStack | None:
    """The recorded stack, or None when nothing is recorded."""
    try:
        data = json.loads(stack_file(home).read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise WeightsmithError(str(stack_file(home)), f"not valid JSON ({e}); remove it") from None
    return DevStack.from_json(data)


def _write_private(path: Path, data: dict[str, Any]) -> None:
    """Write JSON readable by the owner only (it holds S3 keys), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _save(stack: DevStack) -> None:
    _write_private(stack_file(stack.home), stack.to_json())


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """One `up` or `down` at a time per state folder."""
    path = dev_dir(home) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# processes


def prefect_binary() -> str:
    """The `prefect` command of this Python's environment."""
    path = Path(sys.executable).with_name("prefect")
    if path.exists():
        return str(path)
    found = shutil.which("prefect")
    if found is None:
        raise WeightsmithError("dev up", "no `prefect` command beside this Python: install prefect")
    return found


def _prefect(*args: str) -> list[str]:
    """A `prefect` command line that never waits for an answer at a prompt."""
    return [prefect_binary(), "--no-prompt", *args]


def _base_env(home: Path) -> dict[str, str]:
    """This environment without PREFECT_* settings or AWS credential noise, plus ours."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in AWS_NOISE and not k.startswith("AWS_ENDPOINT")
    }
    env["PREFECT_HOME"] = str(dev_dir(home) / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["WEIGHTSMITH_HOME"] = str(Path(home).absolute())
    # Clients of the stack (workers, flow runs, `prefect` commands) must not send loopback
    # requests through a proxy configured for the outside world.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name), "127.0.0.1", "localhost"]))
    return env


def _spawn(name: str, command: list[str], env: dict[str, str], home: Path) -> Component:
    """Start a process in its own session with its output appended to dev/logs/<name>.log."""
    log = dev_dir(home) / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"--- {_now()} {shlex.join(command)}\n".encode())
    # Own session: `down` signals the whole group, and Ctrl+C in the terminal that ran `dev up`
    # does not reach the stack.
    process = processes.spawn(command, log, cwd=dev_dir(home), env=env)
    return Component(name, process.pid, _start_time(process.pid) or 0.0, str(log))


_LINUX_PROC = Path("/proc/self/stat").exists()


def _start_time(pid: int) -> float | None:
    """When `pid` started, or None if there is no such process. On Linux in clock ticks since
    boot, which setting the clock does not move (psutil's create_time is wall-clock based, so
    an NTP step between `up` and `down` would make our own processes look like strangers)."""
    try:
        if _LINUX_PROC:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # Field 22 counts from 1, after a command name that may hold spaces and ')'.
                return float(f.read().rsplit(b")", 1)[1].split()[19])
        return psutil.Process(pid).create_time()
    except (OSError, IndexError, ValueError, psutil.Error):
        return None


def _same_start(component: Component) -> bool | None:
    """Whether the process on the recorded pid is the recorded one; None if there is none."""
    started = _start_time(component.pid)
    if started is None:
        return None
    return abs(started - component.started) < 0.01


def _process(component: Component) -> psutil.Process | None:
    """The recorded process if it still runs (not a zombie, and not a new process on its pid)."""
    if not _same_start(component):
        return None
    try:
        process = psutil.Process(component.pid)
    except psutil.Error:
        return None
    return process if processes.running(process) else None


def alive(component: Component) -> bool:
    return _process(component) is not None


def _family(component: Component) -> list[psutil.Process]:
    """The recorded process, the rest of its group and every descendant of those (flow runs
    start in sessions of their own, so the group alone would miss them)."""
    leader = _process(component)
    members = [leader] if leader is not None else []
    if leader is None and _same_start(component) is False:
        return []  # the pid is someone else's now; no group of ours can carry it any more
    members += [p for p in processes.group_members(component.pid) if leader is None or p.pid != leader.pid]
    family = {p.pid: p for p in members}
    for p in members:
        with contextlib.suppress(psutil.Error):
            family.update({c.pid: c for c in p.children(recursive=True) if processes.running(c)})
    return list(family.values())


def _stop(components: Iterable[Component], timeout: float = STOP_TIMEOUT) -> list[str]:
    """SIGTERM the components and their families together, SIGKILL what is left after
    `timeout`. Returns the names of the components that had something running."""
    families = {c.name: _family(c) for c in components}
    targets = [p for family in families.values() for p in family]
    processes.signal_all(targets, signal.SIGTERM)
    survivors = processes.wait_gone(targets, time.monotonic() + timeout)
    if survivors:
        names = ", ".join(f"{p.pid} {_name(p)}" for p in survivors)
        log.warning("still running %.0f s after SIGTERM, killing: %s", timeout, names)
        processes.signal_all(survivors, signal.SIGKILL)
        survivors = processes.wait_gone(survivors, time.monotonic() + 10.0)
    if survivors:
        pids = ", ".join(str(p.pid) for p in survivors)
        raise WeightsmithError("dev down", f"processes {pids} survived SIGKILL")
    return [name for name, family in families.items() if family]


def _name(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120]
    except psutil.Error:
        return "?"


# ---------------------------------------------------------------------------------------------
# health


# No proxies: the stack is on loopback, and a proxy from the environment would not reach it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(url: str, timeout: float = 3.0) -> bytes:
    with _OPENER.open(url, timeout=timeout) as response:
        return response.read()


def _api(api_url: str, path: str, body: dict | None = None, timeout: float = 5.0) -> Any:
    """JSON from the Prefect REST API (POST when `body` is given)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api_url}{path}", data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=timeout) as response:
        return json.loads(response.read())


def server_healthy(api_url: str) -> bool:
    try:
        return _http_get(f"{api_url}/health").strip() == b"true"
    except (OSError, ValueError):
        return False


def s3_healthy(stack: DevStack) -> tuple[bool, str]:
    """Whether ListBuckets works with the admin keys and shows the stack's bucket."""
    client = s3_client(
        stack.s3_endpoint,
        stack.access_key,
        stack.secret_key,
        stack.region,
        connect_timeout=2,
        read_timeout=5,
        retries={"total_max_attempts": 1},
    )
    try:
        names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
    except Exception as e:  # botocore raises many unrelated types for a dead endpoint
        return False, f"ListBuckets failed: {type(e).__name__}"
    if stack.bucket not in names:
        return False, f"bucket {stack.bucket!r} missing"
    return True, f"bucket {stack.bucket} at {stack.s3_endpoint}"


def worker_online(api_url: str, pool: str, name: str, since: float = 0.0) -> bool:
    """Whether the worker `name` of `pool` is ONLINE with a heartbeat at or after `since`."""
    try:
        workers = _api(api_url, f"/work_pools/{pool}/workers/filter", {})
    except (OSError, ValueError):
        return False
    for worker in workers:
        if worker.get("name") == name and worker.get("status") == "ONLINE":
            beat = _parse_time(worker.get("last_heartbeat_time"))
            return beat is not None and beat >= since - 1.0
    return False


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------
# up


def up(home: Path, gpu_worker: bool | None = None) -> DevStack:
    """Start the stack under `<home>/dev` and return it; a stack that runs already is returned
    as it is (`already_running`). `gpu_worker`: None starts one only when CUDA is available."""
    home = Path(home).absolute()
    with _locked(home):
        existing = load(home)
        if existing is not None:
            if all(alive(c) for c in existing.components.values()) and _complete(existing):
                existing.already_running = True
                return existing
            # Half a stack (a crash, a reboot, a killed `up`): start over cleanly.
            _stop_ranked(existing.components.values())
            stack_file(home).unlink(missing_ok=True)
        return _start(home, gpu_worker)


def _complete(stack: DevStack) -> bool:
    return {"s3", "server", "worker-cpu"} <= set(stack.components)


def _start(home: Path, gpu_worker: bool | None) -> DevStack:
    config = _load_config(home)
    env = _base_env(home)
    server_port = _server_port(config.get("server_port"))
    server = _spawn("server", _server_command(server_port), env, home)
    stack: DevStack | None = None
    try:
        s3 = _start_s3(home, config)
        stack = DevStack(
            home=home,
            api_url=f"http://127.0.0.1:{server_port}/api",
            s3_endpoint=s3.endpoint,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            region=s3.region,
            s3_ports=s3.ports,
            components={"s3": _s3_component(s3), "server": server},
        )
        # Recorded at once, so `dev down` can stop what a killed `up` left behind.
        _save(stack)
        _create_bucket(stack)
        server = _wait_for_server(stack, server, env)
        _create_pools(stack, env)
        _start_workers(stack, env, gpu_worker)
        config.update(_config_of(stack, s3))
        _write_private(config_file(home), config)
        _save(stack)
        return stack
    except BaseException:
        started = list(stack.components.values()) if stack else [server]
        with contextlib.suppress(Exception):
            _stop_ranked(started)
        if stack is not None:
            with contextlib.suppress(Exception):
                remove_grpc_sockets(stack.s3_ports)
        stack_file(home).unlink(missing_ok=True)
        raise


def _load_config(home: Path) -> dict[str, Any]:
    """Keys and ports of the last `up` (they keep a user's exported variables valid)."""
    try:
        return json.loads(config_file(home).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _config_of(stack: DevStack, s3: S3Server) -> dict[str, Any]:
    return {
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
        "readonly_access_key": s3.readonly_access_key,
        "readonly_secret_key": s3.readonly_secret_key,
        "s3_ports": asdict(s3.ports),
        "server_port": stack.server_port,
    }


def _server_port(preferred: int | None, rng: random.Random | None = None) -> int:
    if preferred and port_is_free(preferred):
        return preferred
    rng = rng or random.Random()
    low, high = SERVER_PORT_RANGE
    for _ in range(200):
        port = rng.randrange(low, high)
        if port_is_free(port):
            return port
    raise WeightsmithError("dev up", f"no free port for the Prefect server in {low}-{high}")


def _server_command(port: int) -> list[str]:
    # Loopback only: the server has no authentication.
    return _prefect("server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off")


def _start_s3(home: Path, config: dict[str, Any]) -> S3Server:
    state = dev_dir(home) / "s3"
    ports = None
    if "s3_ports" in config:
        preferred = Ports(**config["s3_ports"])
        ports = preferred if all(port_is_free(p) for p in preferred.all()) else None
    keys = {k: config.get(k) for k in ("access_key", "secret_key")}
    keys |= {k: config.get(k) for k in ("readonly_access_key", "readonly_secret_key")}
    try:
        try:
            return start_s3_server(state, ports=ports, region=DEFAULT_REGION, **keys)
        except RuntimeError:
            if ports is None:
                raise
            # Another process took one of last time's ports meanwhile: any free block will do.
            return start_s3_server(state, region=DEFAULT_REGION, **keys)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise WeightsmithError(
            "dev up", f"SeaweedFS did not start ({first}); see {state / 'logs' / 'weed.out'}"
        ) from None


def _s3_component(s3: S3Server) -> Component:
    return Component("s3", s3.pid, _start_time(s3.pid) or 0.0, str(s3.log_dir / "weed.out"))


def _create_bucket(stack: DevStack) -> None:
    client = stack.client()
    try:
        client.create_bucket(Bucket=stack.bucket)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass  # kept in dev/s3 from an earlier `up`


def _wait_for_server(stack: DevStack, server: Component, env: dict[str, str]) -> Component:
    """Wait until our server answers /api/health; on a port taken meanwhile, start it again on
    another one. Returns the component of the server that answered."""
    for attempt in range(3):
        outcome = _server_outcome(stack, server, time.monotonic() + SERVER_TIMEOUT)
        if outcome == "ready":
            return server
        # Prefect checks the port first ("is already in use"), uvicorn on binding ("address
        # already in use").
        port_taken = "already in use" in _last_output(server.log).lower()
        if outcome == "exited" and port_taken and attempt < 2:
            port = _server_port(None)
            server = _spawn("server", _server_command(port), env, stack.home)
            stack.api_url = f"http://127.0.0.1:{port}/api"
            stack.components["server"] = server
            _save(stack)
            continue
        _stop([server])
        what = "exited" if outcome == "exited" else f"did not answer in {SERVER_TIMEOUT:.0f} s"
        raise WeightsmithError("dev up", f"the Prefect server {what} ({stack.api_url}/health); see {server.log}")
    raise AssertionError("unreachable")


def _server_outcome(stack: DevStack, server: Component, deadline: float) -> str:
    """One of "ready", "exited" or "timeout"."""
    while time.monotonic() < deadline:
        process = _process(server)
        if process is None:
            return "exited"
        # Check that the answer comes from our process: another server may own the port.
        if server_healthy(stack.api_url) and _listens(process, stack.server_port):
            return "ready"
        time.sleep(0.25)
    return "timeout"


def _listens(process: psutil.Process, port: int) -> bool:
    try:
        processes = [process, *process.children(recursive=True)]
    except psutil.Error:
        return False
    for p in processes:
        with contextlib.suppress(psutil.Error):
            for conn in p.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                    return True
    return False


def _prefect_env(stack: DevStack, env: dict[str, str]) -> dict[str, str]:
    """Environment of the `prefect` commands and workers: our server, S3 and store."""
    return {**env, **stack.env(), "AWS_ENDPOINT_URL": stack.s3_endpoint}


def _create_pools(stack: DevStack, env: dict[str, str]) -> None:
    """`prefect work-pool create` for each pool, in parallel (each command takes seconds)."""
    log = dev_dir(stack.home) / "logs" / "pools.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    creators = [
        processes.spawn(
            _prefect("work-pool", "create", pool, "--type", "process", "--overwrite"),
            log,
            cwd=dev_dir(stack.home),
            env=_prefect_env(stack, env),
        )
        for pool in POOLS
    ]
    try:
        codes = [p.wait(timeout=POOL_TIMEOUT) for p in creators]
    except subprocess.TimeoutExpired:
        codes = [None]
    finally:
        for p in creators:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(code != 0 for code in codes):
        raise WeightsmithError("dev up", f"could not create the work pools; see {log}")


def _start_workers(stack: DevStack, env: dict[str, str], gpu_worker: bool | None) -> None:
    cuda = gpu_worker is not False and _cuda_available()
    pools = {"cpu": {}}
    if gpu_worker or (gpu_worker is None and cuda):
        pools["gpu"] = {"DEVICE": "cuda" if cuda else "cpu"}
    started = time.time()
    for pool, extra in pools.items():
        worker_env = {**_prefect_env(stack, env), **extra}
        # Poll every 2 s instead of 10 s: a run is picked up quickly.
        worker_env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
        component = _spawn(f"worker-{pool}", _worker_command(pool), worker_env, stack.home)
        stack.components[component.name] = component
        _save(stack)
    for pool in pools:
        _wait_for_worker(stack, pool, started)


def _worker_command(pool: str) -> list[str]:
    return _prefect(
        "worker", "start", "--pool", pool, "--type", "process", "--name", worker_name(pool),
        "--install-policy", "never",
    )  # fmt: skip


def worker_name(pool: str) -> str:
    return f"dev-{pool}"


def _wait_for_worker(stack: DevStack, pool: str, since: float) -> None:
    component = stack.components[f"worker-{pool}"]
    deadline = time.monotonic() + WORKER_TIMEOUT
    while time.monotonic() < deadline:
        if not alive(component):
            raise WeightsmithError("dev up", f"the {pool} worker exited; see {component.log}")
        if worker_online(stack.api_url, pool, worker_name(pool), since):
            return
        time.sleep(0.25)
    raise WeightsmithError(
        "dev up",
        f"the {pool} worker did not come online in {WORKER_TIMEOUT:.0f} s; see {component.log}",
    )


def _cuda_available() -> bool:
    """Whether torch sees a GPU; asked in a subprocess (importing torch takes seconds), and
    only where an NVIDIA driver is installed at all."""
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return False
    code = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def _last_output(log: str | Path) -> str:
    """What the last process started with `_spawn` wrote to `log` (logs are appended to)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return ""
    return text.rsplit("\n--- ", 1)[-1]


# ---------------------------------------------------------------------------------------------
# down and status


# Workers first: a worker whose server is gone retries instead of exiting; S3 last, so that
# flow runs being stopped do not fail on a missing store first.
_RANK = {"worker": 0, "server": 1, "s3": 2}


def _rank(component: Component) -> int:
    return _RANK.get(component.name.split("-")[0], len(_RANK))


def _stop_ranked(components: Iterable[Component]) -> list[str]:
    """Stop workers, then the server, then S3; the components of one rank together."""
    components = list(components)
    stopped: list[str] = []
    for rank in sorted({_rank(c) for c in components}):
        stopped += _stop([c for c in components if _rank(c) == rank])
    return stopped


def down(home: Path) -> list[str]:
    """Stop the recorded processes (workers with their flow runs, server, S3) and forget the
    stack. Returns the names of the components that were running."""
    home = Path(home).absolute()
    if not stack_file(home).exists():
        return []  # and no lock file left in a state folder that had no stack
    with _locked(home):
        stack = load(home)
        if stack is None:
            return []
        stopped = _stop_ranked(stack.components.values())
        remove_grpc_sockets(stack.s3_ports)
        stack_file(home).unlink(missing_ok=True)
        return stopped


def status(home: Path) -> dict[str, Any]:
    """Per component: pid, alive, healthy, detail and log (no keys: safe to print)."""
    home = Path(home).absolute()
    stack = load(home)
    if stack is None:
        return {"home": str(home), "running": False, "healthy": False, "components": {}}
    server_up = server_healthy(stack.api_url)
    components = {}
    for component in sorted(stack.components.values(), key=lambda c: -_rank(c)):
        is_alive = alive(component)
        healthy, detail = (False, "not running")
        if is_alive:
            healthy, detail = _health(stack, component, server_up)
        components[component.name] = {
            "pid": component.pid,
            "alive": is_alive,
            "healthy": healthy,
            "detail": detail,
            "log": component.log,
        }
    return {
        "home": str(home),
        "running": any(c["alive"] for c in components.values()),
        "healthy": _complete(stack) and all(c["healthy"] for c in components.values()),
        "api_url": stack.api_url,
        "s3_endpoint": stack.s3_endpoint,
        "store": stack.store,
        "components": components,
    }


def _health(stack: DevStack, component: Component, server_up: bool) -> tuple[bool, str]:
    if component.name == "s3":
        return s3_healthy(stack)
    if component.name == "server":
        return server_up, f"{stack.api_url}/health " + ("answers" if server_up else "no answer")
    pool = component.name.removeprefix("worker-")
    if not server_up:
        return False, "server not answering"
    online = worker_online(stack.api_url, pool, worker_name(pool))
    return online, f"{worker_name(pool)} " + ("online" if online else "not online") + f" in {pool}"
