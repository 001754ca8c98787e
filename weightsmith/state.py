"""The state folder: default file store, PREFECT_HOME, dev-stack pids and logs, caches.

`$WEIGHTSMITH_HOME`, else `.weightsmith/` in the working directory. Nothing outside it is
written by default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator


def home() -> Path:
    return Path(os.environ.get("WEIGHTSMITH_HOME") or Path.cwd() / ".weightsmith").absolute()


def default_store() -> str:
    """$WEIGHTSMITH_STORE (e.g. s3://weightsmith/lake on the dev stack), else the local store."""
    return os.environ.get("WEIGHTSMITH_STORE") or str(home() / "store")


StoreUrl = Annotated[str, BeforeValidator(lambda v: v or default_store())]
"""An options field holding a store URL: empty or None means the default store (declared once, here)."""


def tmp_dir() -> str:
    d = home() / "tmp"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def cache_dir() -> Path:
    d = home() / "cache"
    d.mkdir(parents=True, exist_ok=True)
    return d


def configure_prefect() -> None:
    """Embedded default: PREFECT_HOME in the state folder and analytics off, unless the user
    already configured Prefect. Call before Prefect is imported."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    # Prefect's ephemeral server hangs at start (and times out) when PREFECT_HOME is missing.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # The ephemeral API server may need longer than Prefect's default to start on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
