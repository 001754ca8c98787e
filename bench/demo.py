"""Benchmark: wall time and peak memory of `weightsmith demo`, first run and cached run.

    .venv/bin/python bench/demo.py [--size full|tiny] [--out DIR] [--timeout S] [--no-prefect]
                                   [--json FILE]

Runs `weightsmith demo --size SIZE` twice in a subprocess, with WEIGHTSMITH_HOME set to a
fresh folder under --out (and WEIGHTSMITH_STORE unset, so the store is in that folder):

1. first run: trains the base model, makes the fine-tune family (zoo + gold), runs the pipeline;
2. cached run: the same home again, so the models, zoos and scores come from the cache.

For each run it measures the wall time of the whole command (interpreter start included) and
peak memory two ways: the peak of the summed RSS of the process tree (psutil, polled every
0.2 s: short spikes between polls are missed), and the peak RSS of the largest single process
(`ru_maxrss` from `wait4`, exact). Targets (this benchmark IS about wall time): the full first
run under 12 minutes, the cached run under 3. With `--size tiny` only each run's exit status is
checked.
The exit status is 0 whether the targets pass or not; the demo's output is kept in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

TARGETS = {"full": (720.0, 180.0)}  # seconds: first run, cached run (issue 13: under 12 and 3 minutes)
POLL = 0.2  # seconds between RSS samples of the process tree


def weightsmith_command() -> list[str]:
    """The `weightsmith` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "weightsmith"
    if script.exists():
        return [str(script)]
    found = shutil.which("weightsmith")
    if found:
        return [found]
    return [sys.executable, "-c", "from weightsmith.cli import app; app()"]


def tree_rss(proc) -> tuple[int, int]:
    """(summed RSS in bytes, process count) of a psutil process and its descendants."""
    import psutil

    total = count = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            total += p.memory_info().rss
            count += 1
        except psutil.Error:
            pass
    return total, count


def run_measured(argv: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run `argv` with its output in `log`; wall time, peak tree RSS and largest-process RSS."""
    import psutil

    peak = peak_count = 0
    with open(log, "w") as f:
        started = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=c.ROOT)
        watched = psutil.Process(proc.pid)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, count = tree_rss(watched)
            if rss > peak:
                peak, peak_count = rss, count
            if time.perf_counter() - started > timeout:
                timed_out = True
                for p in [*watched.children(recursive=True), watched]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(POLL)
        seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    maxrss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    return {
        "seconds": seconds,
        "returncode": proc.returncode,
        "timed_out": timed_out,
        "peak_tree_rss_bytes": peak,
        "processes_at_peak": peak_count,
        "max_process_rss_bytes": maxrss,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "log": str(log),
    }


def tail(path: Path, start_marker: str = "verdicts:", lines: int = 30) -> str:
    """The demo's verdicts (from `start_marker` up to its JSON summary), else its last lines."""
    text = Path(path).read_text(errors="replace").splitlines()
    for i, line in enumerate(text):
        if line.strip().startswith(start_marker):
            out = []
            for rest in text[i:]:
                if rest.startswith("{"):
                    break
                out.append(rest)
            return "\n".join(out[:lines])
    return "\n".join(text[-lines:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["full", "tiny"], default="full", help="demo size (full)")
    p.add_argument("--out", type=Path, default=c.DEFAULT_OUT, help="work folder (bench/out)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed (3600)")
    p.add_argument("--no-prefect", action="store_true", help="pass --no-prefect to the demo")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = p.parse_args(argv)

    out = args.out.resolve()
    home = out / f"demo-home-{args.size}"
    logs = out / "demo-logs"
    c.remove(home)
    home.mkdir(parents=True)
    logs.mkdir(parents=True, exist_ok=True)
    print(c.describe(c.machine(), c.disk(out)))
    argv_demo = [*weightsmith_command(), "demo", "--size", args.size]
    if args.no_prefect:
        argv_demo.append("--no-prefect")
    env = {k: v for k, v in os.environ.items() if k != "WEIGHTSMITH_STORE"}
    env["WEIGHTSMITH_HOME"] = str(home)
    print(f"command: WEIGHTSMITH_HOME={home} {' '.join(argv_demo)}")
    print(
        "method:  wall time of the whole command; peak RSS of the process tree (psutil, every "
        f"{POLL:g} s)\n         and of its largest single process (wait4 ru_maxrss)\n",
        flush=True,
    )

    started = time.perf_counter()
    runs: dict[str, dict] = {}
    for name in ("first", "cached"):
        print(f"== {name} run ...", flush=True)
        before = c.load()
        r = run_measured(argv_demo, env, logs / f"{args.size}-{name}.log", args.timeout)
        r["load"] = [before, c.load()]
        runs[name] = r
        status = "timed out" if r["timed_out"] else f"exit {r['returncode']}"
        print(f"   {r['seconds']:.1f}s, {status}; before: {before}; after: {r['load'][1]}")
        if r["returncode"] != 0:
            print(f"   the demo failed; its output is in {r['log']}:")
            print("\n".join("   | " + line for line in tail(Path(r["log"]), lines=20).split("\n")))
            break

    rows = [
        [
            name,
            f"{r['seconds']:.1f}",
            f"{r['seconds'] / 60:.2f}",
            f"{r['cpu_seconds']:.1f}",
            c.fmt_mb(r["peak_tree_rss_bytes"]),
            r["processes_at_peak"],
            c.fmt_mb(r["max_process_rss_bytes"]),
            "timeout" if r["timed_out"] else r["returncode"],
        ]
        for name, r in runs.items()
    ]
    print(f"\n== weightsmith demo --size {args.size}")
    print(
        c.table(
            [
                "run",
                "seconds",
                "minutes",
                "CPU s",
                "peak tree RSS MB",
                "processes",
                "largest process RSS MB",
                "exit",
            ],
            rows,
        )
    )
    if "first" in runs and runs["first"]["returncode"] == 0:
        print("\nthe first run's verdicts (quality: see its report.md):")
        print(tail(Path(runs["first"]["log"])))

    checks = []
    if args.size in TARGETS:
        for name, limit in zip(("first", "cached"), TARGETS[args.size], strict=True):
            r = runs.get(name)
            label = f"demo {args.size} {name} run under {limit / 60:g} minutes"
            if r is None:
                checks.append(("FAIL", label, "not run (the first run failed)"))
                continue
            ok = r["returncode"] == 0 and r["seconds"] < limit
            why = "" if r["returncode"] == 0 else f" (exit {r['returncode']})"
            checks.append(("PASS" if ok else "FAIL", label, f"{r['seconds'] / 60:.2f} min{why}"))
        print()
        for verdict, label, detail in checks:
            print(f"{verdict}  {label}: {detail}")
    else:
        print(f"\n(no time targets for --size {args.size}; they apply to the full demo)")
        for name in ("first", "cached"):
            r = runs.get(name)
            label = f"demo {args.size} {name} run completes"
            if r is None:
                checks.append(("FAIL", label, "not run (the first run failed)"))
            else:
                status = "timed out" if r["timed_out"] else f"exit {r['returncode']}"
                ok = r["returncode"] == 0
                checks.append(("PASS" if ok else "FAIL", label, f"{status}, {r['seconds']:.0f}s"))
        for verdict, label, detail in checks:
            print(f"{verdict}  {label}: {detail}")
    print(f"benchmark took {time.perf_counter() - started:.0f}s; demo logs in {logs}")
    if args.json:
        data = {
            "size": args.size,
            "runs": runs,
            "targets": [{"target": t, "verdict": v, "detail": d} for v, t, d in checks],
        }
        args.json.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
