"""Run every benchmark in bench/ and write bench/RESULTS.md.

    .venv/bin/python bench/run_all.py [--quick] [--only NAME ...] [--results FILE] [--out DIR]

Runs, each as a subprocess with its own timeout and its output captured:

- `bench/extract.py --layers-mult 1 4 16` (16x only when the free disk holds it, else 1 4 and a
  note; `--quick`: `--layers-mult 1 --repeat 1`);
- `bench/extract.py --s3` (SeaweedFS and HTTP on loopback; `--quick`: `--repeat 1`);
- `bench/pipeline.py` (`--quick`: `--size small`);
- `bench/predict.py` (`--quick`: `--quick`);
- `bench/predict.py --whole-model` (not with `--quick`);
- `bench/demo.py` (`--quick`: `--size tiny`);
- `bench/quality.py --control` on the full demo's state the demo bench leaves (not with `--quick`).

RESULTS.md holds the machine (CPU model, cores, RAM, free disk, GPU, load average before and
after), each benchmark's output verbatim with its command, exit status and duration, and a
summary table of every PASS/FAIL/SKIP line. The default run takes 45-80 minutes on 2 cores
(the 16x extraction, the full demo and the quality bench dominate); `--quick` about 10 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

BENCH = Path(__file__).resolve().parent
VERDICT = re.compile(r"\b(PASS|FAIL|SKIP)\b")
STDERR_TAIL = 40  # lines of stderr kept in RESULTS.md when a benchmark fails
GB = 1_000_000_000
BENCHES = ["extract", "extract-s3", "pipeline", "predict", "predict-whole-model", "demo", "quality"]


def extract_need(mult: int) -> int:
    """Free disk that bench/extract.py wants for a size (its own skip rule), in bytes."""
    import extract  # bench/extract.py: model_params, GPT2_SMALL, OUTPUT_PER_SOURCE

    layers, width, heads, vocab, context = extract.GPT2_SMALL
    est = 4 * extract.model_params(layers * mult, width, heads, vocab, context)
    built = (c.DEFAULT_OUT / "models" / f"gpt2-small-x{mult}" / "model.safetensors").exists()
    return (0 if built else est) + int(2 * extract.OUTPUT_PER_SOURCE * est) + 500 * c.MB


def plan(quick: bool, out: Path) -> tuple[list[dict], list[str]]:
    """The benchmarks to run: name, argv, timeout; and notes about what was left out."""
    py = sys.executable
    notes = []
    if quick:
        mults = ["1"]
        extract_args = ["--layers-mult", "1", "--repeat", "1"]
    else:
        free = shutil.disk_usage(out if out.exists() else c.ROOT).free
        mults = ["1", "4"]
        need16 = extract_need(16)  # extract.py removes each size's runs before the next
        if free >= need16:
            mults.append("16")
        else:
            notes.append(f"extract 16x skipped: needs ~{need16 / GB:.0f} GB free disk, {free / GB:.0f} GB free")
        extract_args = ["--layers-mult", *mults]
    out_args = ["--out", str(out)]
    benches = [
        {
            "name": "extract",
            "argv": [py, str(BENCH / "extract.py"), *extract_args, *out_args],
            "timeout": 900 if quick else 600 * len(mults) + (1800 if "16" in mults else 0),
        },
        {
            "name": "extract-s3",
            "argv": [py, str(BENCH / "extract.py"), "--s3", "--layers-mult", "1", "--repeat", "1" if quick else "3"]
            + out_args,
            "timeout": 900,
        },
        {
            "name": "pipeline",
            "argv": [py, str(BENCH / "pipeline.py"), *(["--size", "small"] if quick else [])] + out_args,
            "timeout": 600 if quick else 1200,
        },
        {
            "name": "predict",
            "argv": [py, str(BENCH / "predict.py"), *(["--quick"] if quick else []), *out_args],
            "timeout": 1200 if quick else 1800,
        },
        {
            "name": "predict-whole-model",
            "argv": [py, str(BENCH / "predict.py"), "--whole-model", *out_args],
            "timeout": 3600,
        },
        {
            "name": "demo",
            "argv": [py, str(BENCH / "demo.py"), "--size", "tiny" if quick else "full", *out_args],
            "timeout": 1200 if quick else 3600,
        },
        {
            # after the demo bench: it reuses the full demo's base and family left in out
            "name": "quality",
            "argv": [py, str(BENCH / "quality.py"), "--control", "--home", str(out / "demo-home-full")],
            "timeout": 3600,
        },
    ]
    if quick:
        notes.append("predict --whole-model and quality skipped with --quick (each takes 6-20 minutes)")
        benches = [b for b in benches if b["name"] not in ("predict-whole-model", "quality")]
    return benches, notes


def gpu() -> str:
    """The GPUs nvidia-smi lists, else "none"."""
    if not shutil.which("nvidia-smi"):
        return "none"
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none (nvidia-smi failed)"
    names = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    return "; ".join(names) if r.returncode == 0 and names else "none"


def run(bench: dict) -> dict:
    """Run one benchmark; its stdout, stderr, exit status and duration."""
    print(f"== {bench['name']}: {' '.join(bench['argv'])} (timeout {bench['timeout']}s)", flush=True)
    load_before = c.load()
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            bench["argv"],
            capture_output=True,
            text=True,
            timeout=bench["timeout"],
            cwd=c.ROOT,
        )
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        status = f"exit {rc}"
    except subprocess.TimeoutExpired as e:
        rc = None
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        stdout, stderr = stdout or "", stderr or ""
        status = f"timed out after {bench['timeout']}s"
    seconds = time.perf_counter() - started
    print(f"   {status} in {seconds:.0f}s", flush=True)
    return {
        **bench,
        "rc": rc,
        "status": status,
        "seconds": seconds,
        "stdout": stdout,
        "stderr": stderr,
        "load": [load_before, c.load()],
    }


def verdict_lines(text: str) -> list[tuple[str, str]]:
    """(verdict, line) for every line of output holding PASS, FAIL or SKIP."""
    out = []
    for line in text.splitlines():
        m = VERDICT.search(line)
        if m:
            out.append((m.group(1), line.strip()))
    return out


def render(results: list[dict], notes: list[str], quick: bool, before: dict, after: str) -> str:
    m, d = before["machine"], before["disk"]
    ram = f"{m['ram_bytes'] / 1e9:.1f} GB" if m["ram_bytes"] else "?"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run_all.py{' --quick' if quick else ''}` on {now}. Every number "
        "below was measured in this run, on this machine; ratios within one benchmark are the "
        "point (see `bench/README.md`).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {m['cpu']} |",
        f"| cores | {m['cores']} ({m['usable_cores']} usable) |",
        f"| RAM | {ram} |",
        f"| disk | {d['free_bytes'] / 1e9:.1f} GB free of {d['total_bytes'] / 1e9:.1f} GB ({d['fs']}) |",
        f"| GPU | {before['gpu']} |",
        f"| Python | {m['python']} on {m['platform']} |",
        f"| load before | {before['load']} |",
        f"| load after | {after} |",
        "",
    ]
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    lines += ["## Summary", "", "| benchmark | verdict | line |", "|---|---|---|"]
    for r in results:
        found = verdict_lines(r["stdout"])
        if not found:
            lines.append(f"| {r['name']} | - | no verdict printed ({r['status']}) |")
        for verdict, line in found:
            lines.append(f"| {r['name']} | {verdict} | `{line.replace('|', '/')}` |")
    lines.append("")
    lines += [
        "| benchmark | command | status | seconds |",
        "|---|---|---|---|",
    ]
    for r in results:
        cmd = " ".join(_short(a) for a in r["argv"])
        lines.append(f"| {r['name']} | `{cmd}` | {r['status']} | {r['seconds']:.0f} |")
    lines.append("")
    for r in results:
        lines += [
            f"## {r['name']}",
            "",
            f"`{' '.join(_short(a) for a in r['argv'])}`: {r['status']}, {r['seconds']:.0f} s "
            f"(load before: {r['load'][0]}; after: {r['load'][1]})",
            "",
            "```",
            r["stdout"].rstrip(),
            "```",
            "",
        ]
        if r["rc"] != 0 and r["stderr"].strip():
            tail = "\n".join(r["stderr"].rstrip().splitlines()[-STDERR_TAIL:])
            lines += [f"stderr (last {STDERR_TAIL} lines):", "", "```", tail, "```", ""]
    return "\n".join(lines)


def _short(arg: str) -> str:
    """An argument with the repository root and the interpreter's path shortened."""
    if arg == sys.executable:
        return ".venv/bin/python" if ".venv" in arg else "python"
    return arg.replace(str(c.ROOT) + "/", "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="each benchmark's quick options")
    p.add_argument(
        "--only",
        nargs="+",
        choices=BENCHES,
        help="run only these benchmarks",
    )
    p.add_argument("--out", type=Path, default=c.DEFAULT_OUT, help="work folder (bench/out)")
    p.add_argument("--results", type=Path, default=BENCH / "RESULTS.md", help="bench/RESULTS.md")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    before = {"machine": c.machine(), "disk": c.disk(out), "gpu": gpu(), "load": c.load()}
    print(c.describe(before["machine"], before["disk"]))
    print(f"GPU:     {before['gpu']}\n{before['load']}\n", flush=True)
    benches, notes = plan(args.quick, out)
    if args.only:
        benches = [b for b in benches if b["name"] in args.only]
    for note in notes:
        print(f"note: {note}")
    started = time.perf_counter()
    results = []
    for bench in benches:
        results.append(run(bench))
        # write after each benchmark, so a later crash or timeout keeps what was measured
        args.results.write_text(render(results, notes, args.quick, before, c.load()) + "\n")
    print(f"\nall done in {time.perf_counter() - started:.0f}s; wrote {args.results}")
    for r in results:
        for verdict, line in verdict_lines(r["stdout"]):
            print(f"  {r['name']:9s} {verdict}  {line}")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
