"""Shared helpers for the benchmarks in bench/: machine facts, child runs, sizes, tables.

Every measured method runs in a fresh child process that reports its own wall time (work
only, imports excluded) and its own peak RSS (`ru_maxrss` of RUSAGE_SELF) as one JSON line on
stdout, so that one method's memory never shows up in another's number.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "out"  # git-ignored
MB = 1_000_000
RESULT_PREFIX = "BENCH-RESULT "
# The fit budgets before issue 15 (bench/predict.py --whole-model, bench/quality.py): every tensor
# alone (pack_bytes 0), fixed steps (200 + 400; zoo 1000 + 2000), no early stop.
PREVIOUS_DEFAULTS = {
    "tile-diffusion": {"early_stop": False, "ae_min_steps": 200, "unet_min_steps": 400},
    "zoo-diffusion": {"early_stop": False, "ae_min_steps": 1000, "ddpm_min_steps": 2000},
}


# ---------------------------------------------------------------------------------------------
# the machine
def machine() -> dict:
    """CPU, cores, RAM, disk and library versions, for the top of every report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    versions = {}
    for mod in (
        "weightsmith",
        "numpy",
        "zarr",
        "numcodecs",
        "tifffile",
        "imagecodecs",
        "PIL",
        "safetensors",
    ):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__
            versions[mod] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_bytes": ram,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def disk(path: Path) -> dict:
    """Free bytes and the file system type of the mount holding `path`."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {
        "path": str(path),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "fs": _fs_type(probe),
    }


def _fs_type(path: Path) -> str | None:
    best, fs = "", None
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, fs = parts[1], f"{parts[2]} ({parts[0]} on {parts[1]})"
    except OSError:
        pass
    return fs


def describe(m: dict, d: dict) -> str:
    ram = f"{m['ram_bytes'] / 1e9:.1f} GB" if m["ram_bytes"] else "?"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    return "\n".join(
        [
            f"machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), RAM {ram}",
            f"disk:    {d['free_bytes'] / 1e9:.1f} GB free of {d['total_bytes'] / 1e9:.1f} GB at "
            f"{d['path']} [{d['fs']}]",
            f"python:  {m['python']} on {m['platform']}",
            f"libs:    {versions}",
        ]
    )


# ---------------------------------------------------------------------------------------------
# files
def tree_bytes(path: Path) -> tuple[int, int]:
    """(total bytes, file count) of the regular files below `path`."""
    total = count = 0
    for folder, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            total += st.st_size
            count += 1
    return total, count


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def warm(path: Path, block: int = 8 << 20) -> int:
    """Read a file once so it sits in the page cache for every method alike."""
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(block):
            n += len(chunk)
    return n


def settle() -> None:
    """Flush dirty pages left by the previous method (not timed; no method syncs itself)."""
    os.sync()


# ---------------------------------------------------------------------------------------------
# child processes
def run_child(script: Path, spec: dict, timeout: float = 1800) -> dict:
    """Run `script --child <spec>` in a fresh interpreter and return its result line.

    The result holds the child's own `seconds` (the work, imports excluded) and `rss_bytes`
    (its peak RSS); `process_seconds` (with interpreter start-up) is added here.
    """
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec.get('method')} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result["process_seconds"] = elapsed
            return result
    raise RuntimeError(f"child {spec.get('method')} printed no result:\n{proc.stdout[-2000:]}")


def peak_rss() -> int:
    """This process's peak RSS so far, in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (all threads) or of its waited-for children.

    Less sensitive than wall time to other work on a shared machine: compare the two to see
    whether a run waited for the CPU or the disk.
    """
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def report_child(seconds: float, rss_start: int, cpu_start: float, **extra) -> None:
    """The child's last line: its work time, CPU time, peak RSS and the peak before the work."""
    result = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds() - cpu_start,
        "rss_bytes": peak_rss(),
        "rss_start_bytes": rss_start,
        **extra,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of an external command (e.g. cp), which must succeed."""
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - started, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def time_command(argv: list[str]) -> float:
    """Wall seconds of an external command, which must succeed."""
    return run_timed(argv)[0]


def load() -> str:
    """The load averages against the core count: other work on the machine skews wall times."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


# ---------------------------------------------------------------------------------------------
# output
def table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; `align` is one of 'l'/'r' per column (default: first left)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)
    lines = []
    for n, r in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align, strict=True)).rstrip()
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def fmt_mb(n: float | None) -> str:
    return "" if n is None else f"{n / MB:,.0f}"
