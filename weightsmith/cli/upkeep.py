"""`weightsmith ls` and `weightsmith gc`: the command bodies (weightsmith.cli registers them).

`ls` prints a table of the store's models (or `--json`); `gc` prints what it deleted, or with
`--dry-run` what it would delete, and nothing is touched that changed within `--older-than`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from typing import Annotated

import typer

from weightsmith import state
from weightsmith.cli.common import JsonOpt, StoreOpt, user_errors
from weightsmith.errors import WeightsmithError

_DURATION = re.compile(r"(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>s|m|h|d|w)?")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@user_errors
def ls(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the models in the store: status, tensors, size, last run, predictions."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from weightsmith.space import format_bytes
    from weightsmith.store import Store
    from weightsmith.upkeep import list_models

    the_store = Store(store or state.default_store())
    models = list_models(the_store)
    if as_json:
        print(json.dumps([asdict(m) for m in models], indent=1))
        return
    out = Console(soft_wrap=True)
    if not models:
        out.print(f"no models in {escape(the_store.url)}", highlight=False)
        return
    table = Table(title=escape(the_store.url))
    table.add_column("model / revision", overflow="fold")
    table.add_column("status", no_wrap=True)
    for col in ("tensors", "size", "last run", "pred/cand/rep"):
        table.add_column(col, justify="left" if col == "last run" else "right", no_wrap=col != "last run")
    colour = {"complete": "green", "incomplete": "yellow", "failed": "red", "damaged": "red"}
    for m in models:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.last_run)) if m.last_run else "-"
        table.add_row(
            f"{escape(m.slug)}/{escape(m.revision)}",
            f"[{colour[m.status]}]{m.status}[/]",
            str(m.tensors),
            format_bytes(m.stored_bytes),
            f"{when} {m.last_outcome or ''}".strip(),
            f"{m.predictions}/{m.candidates}/{m.reports}",
        )
    out.print(table)
    out.print(
        f"{len(models)} models, {format_bytes(sum(m.stored_bytes for m in models))}",
        highlight=False,
    )


@user_errors
def gc(
    store: StoreOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be deleted.")] = False,
    older_than: Annotated[
        str, typer.Option("--older-than", help="Leave what changed more recently (30m, 1h, 2d, 0).")
    ] = "1h",
    as_json: JsonOpt = False,
) -> None:
    """Delete leftovers of unfinished runs and artifacts no manifest names (not complete models)."""
    from weightsmith.space import format_bytes
    from weightsmith.store import Store
    from weightsmith.upkeep import gc as run_gc

    seconds = parse_duration(older_than)
    report = run_gc(Store(store or state.default_store()), dry_run=dry_run, older_than_s=seconds)
    if as_json:
        print(
            json.dumps(
                {
                    "store": report.store,
                    "dry_run": report.dry_run,
                    "bytes": report.bytes,
                    "items": [asdict(i) for i in report.items],
                    "skipped": report.skipped,
                },
                indent=1,
            )
        )
        return
    verb = "would delete" if dry_run else "deleted"
    for item in report.items:
        print(f"{verb} {item.key} ({format_bytes(item.bytes)}): {item.reason}")
    for line in report.skipped:
        print(f"left alone: {line}")
    print(f"{verb} {len(report.items)} items, {format_bytes(report.bytes)}")


def parse_duration(text: str) -> float:
    """'90s', '30m', '1h', '2d', '1w' or a number of seconds -> seconds."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None:
        raise WeightsmithError("--older-than", f"{text!r} is not a duration (use e.g. 30m, 1h, 2d or 0)")
    return float(m.group("n")) * _SECONDS[m.group("unit") or "s"]
