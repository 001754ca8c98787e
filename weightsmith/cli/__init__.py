"""The `weightsmith` command line: validates input, calls the library or runs a flow.

`app` is the console script; `python -m weightsmith.cli` runs the same. `main` registers one
module per command family (models, predict, demo, zoo, leaderboard, upkeep, dev); `common` holds
the consoles, the one-line error handling, shared options and the flow runner. This package is
the only part of `weightsmith` that may import `flows/`.
"""

import os

# On shared CPUs, OpenMP threads spinning while they wait made torch 5-10x slower (measured);
# passive waiting costs nothing when the machine is idle. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from weightsmith.cli.main import app  # noqa: E402

__all__ = ["app"]
