"""The leaderboard catalogue, `<store>/catalog.json`: what batches did with each model revision.

One entry per `<id>@<revision>`: status (done, failed, skipped), attempts, last error, when,
where the weights came from, licence and gating, model and report locations, when a failed
model may be tried again, and a short history. Batches change it by read-modify-write with
conditional writes (`create_if_absent`, `replace_if_match`), retried on conflict, so two
batches never lose each other's updates. A catalogue that is not ours (hand-edited into
invalid JSON, another format) is an error, never silently replaced.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from weightsmith.errors import WeightsmithError
from weightsmith.store import Store
from weightsmith.store.store import dumps

if TYPE_CHECKING:
    from weightsmith.leaderboard.registry import ModelEntry

KEY = "catalog.json"
FORMAT = "weightsmith-catalog/1"
STATUSES = ("done", "failed", "skipped")
HISTORY = 10  # events kept per entry
BACKOFF_SECONDS = 3600.0  # a failed model waits backoff * 2**(attempts-1) before its next try
MAX_ATTEMPTS = 3
UPDATE_TRIES = 60


def empty() -> dict:
    return {"format": FORMAT, "models": {}}


def load(store: Store | str) -> tuple[dict, bytes | None]:
    """(catalogue, its bytes) or (an empty catalogue, None) when there is none yet."""
    store = store if isinstance(store, Store) else Store(store)
    try:
        raw = store.read_bytes(KEY)
    except FileNotFoundError:
        return empty(), None
    return _parse(raw, store.url_of(KEY)), raw


def _parse(raw: bytes, where: str) -> dict:
    fix = "fix it or move it away (it is never overwritten)"
    try:
        catalog = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsmithError(where, f"not valid JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(catalog, dict) or catalog.get("format") != FORMAT or not isinstance(catalog.get("models"), dict):
        raise WeightsmithError(where, f"not a {FORMAT} catalogue; {fix}")
    for key, entry in catalog["models"].items():
        if (
            not isinstance(entry, dict)
            or entry.get("status") not in STATUSES
            or not isinstance(entry.get("attempts"), int)
        ):
            raise WeightsmithError(where, f"entry {key!r} needs a status ({', '.join(STATUSES)}) and attempts; {fix}")
        after = entry.get("next_attempt_after")
        if after is not None and not _aware_time(after):
            raise WeightsmithError(where, f"entry {key!r}: next_attempt_after must be an ISO time with a zone; {fix}")
    return catalog


def _aware_time(value) -> bool:
    try:
        return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


def update(store: Store | str, fn: Callable[[dict], object]) -> dict:
    """Let `fn` change the catalogue in place and write it back conditionally, retrying on
    conflict: `fn` may run more than once, on a fresh copy each time. Returns what was written.
    """
    store = store if isinstance(store, Store) else Store(store)
    for attempt in range(UPDATE_TRIES):
        catalog, raw = load(store)
        changed = copy.deepcopy(catalog)
        fn(changed)
        data = dumps(changed)
        if data == raw:
            return changed
        written = store.create_if_absent(KEY, data) if raw is None else store.replace_if_match(KEY, data, raw)
        if written:
            return changed
        time.sleep(random.uniform(0, min(0.5, 0.005 * 2**attempt)))  # someone else wrote: back off
    raise WeightsmithError(store.url_of(KEY), f"still changing after {UPDATE_TRIES} tries; run again")


def entry_key(model_id: str, revision: str) -> str:
    return f"{model_id}@{revision}"


def now_utc() -> datetime:
    return datetime.now(UTC)


def due(entry: dict | None, now: datetime, max_attempts: int = MAX_ATTEMPTS) -> tuple[bool, str]:
    """Whether a processable model revision should be processed now, and why (or why not).

    A revision skipped earlier (gated, no weights) is due once its source offers it again.
    """
    if entry is None:
        return True, "new"
    status, attempts = entry["status"], entry["attempts"]
    if status == "done":
        return False, "done"
    if status == "skipped":
        return True, f"was skipped: {entry.get('last_error')}"
    if attempts >= max_attempts:
        return False, f"failed {attempts} times (cap {max_attempts}): {entry.get('last_error')}"
    after = entry.get("next_attempt_after")
    if after and now < datetime.fromisoformat(after):
        return False, f"failed {attempts} time(s); next try after {after}"
    return True, f"retry {attempts + 1} of {max_attempts}"


def record(
    catalog: dict,
    model: ModelEntry,
    status: str,
    now: datetime,
    *,
    error: str | None = None,
    model_url: str | None = None,
    report_url: str | None = None,
    backoff_seconds: float = BACKOFF_SECONDS,
) -> dict:
    """Write the outcome of one attempt (done, failed) or a skip into `catalog` (in place).

    A skip is not an attempt. After a failure the next try waits `backoff_seconds *
    2**(attempts-1)`: one hour, two, four... with the default.
    """
    assert status in STATUSES, status
    old = catalog["models"].get(model.key, {})
    attempts = old.get("attempts", 0) + (status != "skipped")
    stamp = now.isoformat(timespec="seconds")
    retry_at = None
    if status == "failed":
        retry_at = (now + timedelta(seconds=backoff_seconds * 2 ** (attempts - 1))).isoformat(timespec="seconds")
    event = {"time": stamp, "status": status}
    if error:
        event["error"] = error
    if model_url:
        event["model_url"] = model_url
    entry = {
        "id": model.id,
        "revision": model.revision,
        "status": status,
        "attempts": attempts,
        "last_error": error,
        "updated": stamp,
        "source": model.source or None,
        "origin": model.origin,
        "licence": model.licence,
        "gated": model.gated,
        "family": model.family,
        "model_url": model_url,
        "report_url": report_url,
        "next_attempt_after": retry_at,
        "history": (old.get("history", []) + [event])[-HISTORY:],
    }
    catalog["models"][model.key] = entry
    return entry
