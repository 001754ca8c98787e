"""`inspect`, `extract`, `verify`, `restore`: commands on model files and stored models."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from weightsmith.cli.common import (
    JsonOpt,
    StoreOpt,
    build_options,
    byte_progress,
    err,
    out,
    run_flow,
    user_errors,
)


@user_errors
def inspect(
    source: Annotated[str, typer.Argument(help="File, folder or URL of the model.")], as_json: JsonOpt = False
) -> None:
    """List the tensors of a model source (headers only): name, dtype, shape, size."""
    from weightsmith.inspect import inspect_source

    rows = inspect_source(source)
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title=escape(source), show_lines=False)
    for col in ("name", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    for r in rows:
        table.add_row(escape(r["name"]), r["dtype"], str(tuple(r["shape"])), f"{r['bytes']:,}")
    out.print(table)
    out.print(f"{len(rows)} tensors, {sum(r['bytes'] for r in rows):,} bytes")


@user_errors
def extract(
    source: Annotated[str, typer.Argument(help="File, folder, s3:// or http(s):// URL of the model.")],
    store: StoreOpt = None,
    name: Annotated[str | None, typer.Option(help="Model slug in the store.")] = None,
    revision: Annotated[str | None, typer.Option(help="Revision (default: HF commit or content hash).")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Glob over tensor names (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Glob over tensor names to skip.")] = None,
    images: Annotated[str, typer.Option(help="all: TIFF + PNG; preview: PNG; none.")] = "all",
    force: Annotated[bool, typer.Option(help="Rewrite artifacts that are already there.")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for another run of the same model.")] = 0.0,
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
    task_runner: Annotated[str, typer.Option(help="threads, processes or dask.")] = "threads",
    workers: Annotated[int, typer.Option(help="Units extracted at once (default: cores, at most 4).")] = 0,
    dask_address: Annotated[str | None, typer.Option(help="Existing Dask scheduler (with dask).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract every tensor into Zarr + TIFF + PNG in the store; prints the model URL."""
    from weightsmith.extract import ExtractOptions
    from weightsmith.extract import extract as run_extract

    options = build_options(
        ExtractOptions,
        store=store,
        name=name,
        revision=revision,
        include=tuple(include or ()),
        exclude=tuple(exclude or ()),
        images=images,
        force=force,
        wait_s=wait,
    )
    if no_prefect:
        with byte_progress("extract") as (advance, set_total):
            result = run_extract(source, options, progress=advance, total=set_total)
        if as_json:
            out.print_json(json.dumps(result.__dict__))
            return
        err.print(
            f"{result.status}: {result.tensors} tensors ({result.written} written, "
            f"{result.skipped} already there), {result.bytes_read:,} source bytes read"
        )
        print(result.model_url)
        return
    model_url = run_flow("extract", task_runner, workers, dask_address)(source=source, options=options)
    if as_json:
        out.print_json(json.dumps({"model_url": model_url}))
    else:
        print(model_url)


@user_errors
def verify(
    model_url: Annotated[str, typer.Argument(help="<store>/models/<slug>/<revision>")], as_json: JsonOpt = False
) -> None:
    """Re-read every artifact of a model and check it against the manifest."""
    from weightsmith.verify import verify as run_verify

    report = run_verify(model_url)
    if as_json:
        out.print_json(
            json.dumps(
                {"model_url": report.model_url, "checked": report.checked, "ok": report.ok, "problems": report.problems}
            )
        )
    else:
        for p in report.problems:
            err.print(f"[red]bad:[/red] {escape(p)}", highlight=False)
        print(f"{'ok' if report.ok else 'FAILED'}: {report.checked} artifacts checked, {len(report.problems)} problems")
    if not report.ok:
        raise typer.Exit(1)


@user_errors
def restore(
    model_url: Annotated[str, typer.Argument(help="<store>/models/<slug>/<revision>")],
    out_path: Annotated[str, typer.Option("--out", help="File (or folder for shards) to write.")],
    dequantize: Annotated[bool, typer.Option(help="Write float32 safetensors (GPTQ as .weight).")] = False,
) -> None:
    """Rebuild the source file(s) byte for byte from the store (or a float32 file)."""
    from weightsmith.restore import restore as run_restore

    for path in run_restore(model_url, out_path, dequantize=dequantize):
        print(path)
