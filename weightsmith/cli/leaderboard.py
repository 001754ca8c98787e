"""`weightsmith leaderboard`: process the models of a leaderboard that the catalogue has not seen.

Registered in `weightsmith.cli.main`.
By default it runs the `leaderboard-batch` flow (embedded Prefect); `--no-prefect` runs the
library loop with the extract stage alone; `--dry-run` lists what a batch would do.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from weightsmith import catalog, state
from weightsmith.cli.common import build_options, err, out, quiet_prefect, user_errors
from weightsmith.errors import WeightsmithError


@user_errors
def leaderboard(
    source: Annotated[
        str,
        typer.Option(
            "--source",
            help="hf-hub, or the path, s3:// or http(s):// URL of a JSON/YAML manifest of {id, source, revision}.",
        ),
    ],
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            help="Store URL: a folder or s3://bucket/prefix (default: the state folder's store).",
        ),
    ] = None,
    filter: Annotated[str | None, typer.Option("--filter", help="hf-hub: tag to filter on, e.g. gptq.")] = None,
    sort: Annotated[
        str, typer.Option(help="hf-hub: downloads, trending, last_modified, likes, created_at.")
    ] = "downloads",
    limit: Annotated[int, typer.Option(help="At most this many models.")] = 20,
    endpoint: Annotated[
        str | None,
        typer.Option(help="hf-hub: hub URL (default: $HF_ENDPOINT, else huggingface.co)."),
    ] = None,
    stages: Annotated[
        list[str] | None,
        typer.Option(
            "--stages",
            help="Pipeline stages, comma-separated or "
            "repeated (default: extract,weight-stats; "
            "opt-in: predict, lm-eval).",
        ),
    ] = None,
    max_parallel: Annotated[int, typer.Option(help="Models processed at once.")] = 2,
    max_attempts: Annotated[int, typer.Option(help="Tries per model revision.")] = catalog.MAX_ATTEMPTS,
    backoff: Annotated[
        float, typer.Option(help="Seconds before the first retry; doubles per failure.")
    ] = catalog.BACKOFF_SECONDS,
    pipeline: Annotated[
        str, typer.Option(help="Pipeline flow per model: weightsmith-pipeline or extract-model.")
    ] = "weightsmith-pipeline",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be done, do nothing.")] = False,
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Library loop, extract stage only.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    zoo: Annotated[
        str, typer.Option(help="family: append each new model with a base_model to that family's zoo; none.")
    ] = "none",
    zoo_include: Annotated[
        list[str] | None, typer.Option(help="Tensor glob a family zoo holds (repeatable; default: all).")
    ] = None,
    zoo_max_bytes: Annotated[
        int | None, typer.Option(help="Largest member a zoo takes: float32 bytes of its selected tensors.")
    ] = None,
) -> None:
    """Process the models of a leaderboard that are new to the store's catalog.json."""
    from weightsmith.leaderboard import (
        SourceQuery,
        ZooGrowth,
        extract_only,
        plan_batch,
        read_source,
        run_batch,
    )

    if source != "hf-hub" and (filter or endpoint):
        raise WeightsmithError("--filter" if filter else "--endpoint", "applies to --source hf-hub only")
    query = build_options(SourceQuery, filter=filter, sort=sort, limit=limit, endpoint=endpoint)
    growth = build_options(ZooGrowth, zoo=zoo, include=tuple(zoo_include or ()), max_member_bytes=zoo_max_bytes)
    store = store or state.default_store()
    chosen = [s.strip() for item in stages or [] for s in item.split(",") if s.strip()] or None

    if dry_run or no_prefect:
        if no_prefect and chosen not in (None, ["extract"]):
            raise WeightsmithError(
                "--stages",
                "--no-prefect runs the extract stage alone; the other "
                "stages need the pipeline flow (drop --no-prefect)",
            )
        catalogue, _ = catalog.load(store)
        decisions = plan_batch(read_source(source, query), catalogue, catalog.now_utc(), max_attempts)
        if dry_run:
            rows = [
                {
                    "id": d.entry.id,
                    "revision": d.entry.revision,
                    "action": d.action,
                    "reason": d.reason,
                }
                for d in decisions
            ]
            _print(rows, ("id", "revision", "action", "reason"), as_json, out)
            todo = sum(d.action == "process" for d in decisions)
            err.print(f"{todo} of {len(decisions)} models would be processed into {store}")
            return
        from weightsmith.store import Store

        Store(store).check_writable()
        summary = run_batch(decisions, store, extract_only(store), backoff, growth).to_dict()
    else:
        state.configure_prefect()
        quiet_prefect()
        from weightsmith_flows.leaderboard import leaderboard_batch

        summary = leaderboard_batch(
            source=source,
            store=store,
            filter=filter,
            sort=sort,
            limit=limit,
            endpoint=endpoint,
            stages=chosen,
            max_parallel=max_parallel,
            max_attempts=max_attempts,
            backoff_seconds=backoff,
            pipeline=pipeline,
            zoo=growth.zoo,
            zoo_include=list(growth.include),
            zoo_max_bytes=growth.max_member_bytes,
        )
    rows = [
        {
            "id": o["id"],
            "revision": o["revision"],
            "outcome": o["status"],
            "detail": o["reason"] or o["model_url"] or "",
        }
        for kind in ("processed", "failed", "skipped")
        for o in summary[kind]
    ]
    _print(rows, ("id", "revision", "outcome", "detail"), as_json, out)
    for z in summary.get("zoos", []):
        err.print(f"zoo {z['id']}: {z['model']} {z['status']}" + (f" ({z['reason']})" if z["reason"] else ""))
    err.print(
        f"{len(summary['processed'])} processed, {len(summary['failed'])} failed, "
        f"{len(summary['skipped'])} skipped; catalogue: {store.rstrip('/')}/{catalog.KEY}"
    )


def _print(rows: list[dict], columns: tuple[str, ...], as_json: bool, out) -> None:
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(escape(str(row[c])) for c in columns))
    out.print(table)
