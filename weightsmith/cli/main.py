"""The `weightsmith` app: one Typer app, every command family registered here, in help order."""

from __future__ import annotations

import typer

from weightsmith.cli import demo, dev, leaderboard, models, predict, upkeep, zoo

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stream model weights into a Zarr/TIFF artifact store, predict new ones, vet them.",
)

app.command("inspect")(models.inspect)
app.command("extract")(models.extract)
app.command("verify")(models.verify)
app.command("restore")(models.restore)
app.command("predict")(predict.predict)
app.command("run")(predict.run)
app.command("demo")(demo.demo)
app.add_typer(zoo.zoo_app, name="zoo", help="Zoos from the models in the store: build, ls, show.")
app.add_typer(dev.dev_app, name="dev", help="Local stack without Docker: SeaweedFS, Prefect server, workers.")
app.command("leaderboard")(leaderboard.leaderboard)
app.command("ls")(upkeep.ls)
app.command("gc")(upkeep.gc)
