"""`weightsmith zoo build|ls|show`: zoos from the models in the store (weightsmith.cli registers it).

`zoo build` runs the `build-zoo` flow (ephemeral Prefect) unless `--no-prefect`; bad input
(a missing member, mismatched tensors) fails before a flow run exists, with one line and exit 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer

from weightsmith import state
from weightsmith.cli.common import JsonOpt, NoPrefectOpt, StoreOpt, build_options, run_flow, user_errors

zoo_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Zoos: the same tensors of K models in the store, stacked (K, ...).",
)


@zoo_app.command("build")
@user_errors
def build(
    zoo_id: Annotated[str, typer.Argument(metavar="ID", help="The zoo's id: zoos/<ID>/ in the store.")],
    model: Annotated[list[str], typer.Option("--model", help="A member: <store>/models/<slug>/<revision> (repeat).")],
    include: Annotated[list[str] | None, typer.Option(help="Glob over tensor names (repeatable).")] = None,
    base: Annotated[str | None, typer.Option(help="The model the members were fine-tuned from.")] = None,
    align: Annotated[
        str, typer.Option(help="none, or permutation: match MLP hidden units to the first --model.")
    ] = "none",
    ordered: Annotated[
        bool, typer.Option("--ordered", help="The members are a sequence (one run's checkpoints).")
    ] = False,
    align_to: Annotated[
        str | None,
        typer.Option("--align-to", help="With --align permutation: match this model's units, not the first member's."),
    ] = None,
    store: Annotated[
        str | None, typer.Option("--store", help="Where the zoo goes (default: the first member's store).")
    ] = None,
    no_prefect: NoPrefectOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Stack the same tensors of store models into zoos/<ID>/ (resumable); prints the zoo URL."""
    from weightsmith.zoo.build import ZooOptions, build_zoo

    options = build_options(
        ZooOptions,
        zoo_id=zoo_id,
        models=tuple(model),
        store=store,
        include=tuple(include or ()),
        base=base,
        align=align,
        ordered=ordered,
        align_to=align_to,
    )
    if no_prefect:
        result = build_zoo(options)
        if as_json:
            print(json.dumps(asdict(result)))
            return
        typer.echo(
            f"{result.status}: {result.members} members, {result.tensors} stacks ({result.written} written)", err=True
        )
        print(result.zoo_url)
        return
    url = run_flow("zoo")(
        zoo_id=zoo_id,
        models=list(options.models),
        store=store,
        include=list(options.include),
        base=base,
        align=align,
        ordered=ordered,
        align_to=align_to,
    )
    print(json.dumps({"zoo_url": url}) if as_json else url)


@zoo_app.command("ls")
@user_errors
def ls(store: StoreOpt = None, as_json: JsonOpt = False) -> None:
    """List the complete zoos in the store: members, tensors, size, alignment."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from weightsmith.space import format_bytes
    from weightsmith.store import Store
    from weightsmith.zoo import describe_zoo, list_zoos

    the_store = Store(store or state.default_store())
    zoos = [describe_zoo(the_store, z) for z in list_zoos(the_store)]
    if as_json:
        print(json.dumps([asdict(z) for z in zoos], indent=1))
        return
    table = Table(title=escape(the_store.url))
    for col in ("zoo", "members", "tensors", "size", "align", "base or family"):
        table.add_column(col, justify="right" if col in ("members", "tensors", "size") else "left")
    for z in zoos:
        base = f"{z.base['slug']}/{z.base['revision']}" if z.base else (z.family or "")
        table.add_row(escape(z.id), str(z.checkpoints), str(z.tensors), format_bytes(z.bytes), z.align, escape(base))
    Console(soft_wrap=True).print(table)


@zoo_app.command("show")
@user_errors
def show(
    zoo_id: Annotated[str, typer.Argument(metavar="ID", help="The zoo's id.")],
    store: StoreOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A zoo's members with their provenance, its tensors and its size."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from weightsmith.space import format_bytes
    from weightsmith.store import Store
    from weightsmith.zoo import describe_zoo

    z = describe_zoo(Store(store or state.default_store()), zoo_id)
    if as_json:
        print(json.dumps(asdict(z), indent=1))
        return
    console = Console(soft_wrap=True)
    ordered = {True: "ordered", False: "unordered", None: "order not recorded"}[z.ordered]
    console.print(
        f"{escape(z.url)}: {z.checkpoints} members, {z.tensors} tensors, {format_bytes(z.bytes)}, "
        f"align {z.align}, {ordered}"
    )
    if z.base:
        console.print(f"base: {escape(z.base['url'])} (manifest sha256 {z.base['manifest_sha256'][:12]})")
    if z.family:
        console.print(f"family: fine-tunes of {escape(z.family)}")
    members = Table(title="members")
    for col in ("#", "slug", "revision", "manifest sha256", "url"):
        members.add_column(col)
    for i, m in enumerate(z.members):
        members.add_row(str(i), escape(m["slug"]), escape(m["revision"]), m["manifest_sha256"][:12], escape(m["url"]))
    if z.members:
        console.print(members)
    tensors = Table(title="tensors")
    tensors.add_column("name")
    tensors.add_column("shape (one member)")
    for name, shape in z.tensor_shapes.items():
        tensors.add_row(escape(name), str(tuple(shape)))
    console.print(tensors)
