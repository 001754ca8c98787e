"""The state folder: default file store, PREFECT_HOME, dev-stack pids and logs, caches.

`$WEIGHTSMITH_HOME`, else `.weightsmith/` in the working directory. Nothing outside it is
written by default.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("WEIGHTSMITH_HOME") or Path.cwd() / ".weightsmith").absolute()


def default_store() -> str:
    return str(home() / "store")


def tmp_dir() -> str:
    d = home() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def cache_dir() -> Path:
    d = home() / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return d
