"""Processes in sessions of their own, and how to stop a whole group: the one helper that the
SeaweedFS server (`seaweed`) and the local stack (`stack`) share.

Every server or worker we start runs in a new session (its pid is its process group id), so one
signal reaches it and its children, and Ctrl+C in the terminal that started it does not.
Zombies never count as running: in containers whose PID 1 reaps no orphans, a stopped server
started by an earlier process stays a zombie.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil


def spawn(command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `command` in a session of its own, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )


def stop_group(pid: int, timeout: float = 15.0) -> None:
    """Stop the process group led by `pid`: SIGTERM, then SIGKILL after `timeout` seconds.

    Works for our own children (reaps them) and for a pid read back from a file by a later
    process (`weightsmith dev down`). Returns once no process of the group is left.
    """
    if not signal_group(pid, signal.SIGTERM):
        reap(pid)
        return
    if wait_group_gone(pid, time.monotonic() + timeout):
        return
    signal_group(pid, signal.SIGKILL)
    if not wait_group_gone(pid, time.monotonic() + 10.0):
        raise RuntimeError(f"process group {pid} survived SIGKILL")


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process of the group exists."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_group_gone(pid: int, deadline: float) -> bool:
    """Wait until no process of the group is left; reap the leader if it is our child."""
    while True:
        # A zombie child still counts as a group member for killpg, so reap it first.
        reap(pid)
        if not group_alive(pid):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child, or already reaped


def group_alive(pid: int) -> bool:
    """True while a member of the process group led by `pid` runs (zombies do not count)."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(group_members(pid))


def running(process: psutil.Process) -> bool:
    # Orphans whose parent is an init that does not reap (as in some containers) stay zombies:
    # they are dead all the same.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes of a process group. The kernel does not give a group's id to a new
    process while the group has members, so these are ours even when the leader is gone."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid and running(process):
                members.append(process)
    return members


def signal_all(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        # psutil checks that the pid still belongs to the same process before signalling.
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def wait_gone(processes: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Wait until none runs (reaping our own children); returns those still running."""
    while True:
        for process in processes:
            reap(process.pid)
        left = [p for p in processes if running(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
