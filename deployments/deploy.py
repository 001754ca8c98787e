"""Create the work pools `cpu` and `gpu` and deploy everything in deployments/prefect.yaml.

Deployments: extract-model/cpu, predict-layer/gpu, predict-layer/cpu, weightsmith-pipeline/cpu,
build-zoo/cpu, leaderboard-batch/daily.

Usage: .venv/bin/python deployments/deploy.py [--only FLOW/DEPLOYMENT ...]
Talks to the Prefect server in PREFECT_API_URL (see `weightsmith dev up`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"cpu": "process", "gpu": "process"}


def prefect(*args: str) -> None:
    cmd = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", *args]
    env = {**os.environ, "WEIGHTSMITH_CHECKOUT": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="deployment names (flow/deployment)")
    args = parser.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("error: PREFECT_API_URL is not set: start a server (weightsmith dev up) first", file=sys.stderr)
        return 2
    for pool, kind in POOLS.items():
        prefect("work-pool", "create", pool, "--type", kind, "--overwrite")
    if args.only == []:
        parser.error("--only needs at least one FLOW/DEPLOYMENT name")
    names = args.only if args.only else ["--all"]
    selection = [x for n in names for x in (("-n", n) if n != "--all" else ("--all",))]
    prefect("deploy", "--prefect-file", str(ROOT / "deployments" / "prefect.yaml"), *selection)
    return 0


if __name__ == "__main__":
    sys.exit(main())
