"""`demo`: the main job on the embedded default (local file store, Prefect with no server)."""

from __future__ import annotations

from typing import Annotated

import typer

from weightsmith import state
from weightsmith.cli.common import NoPrefectOpt, StoreOpt, err, run_flow, user_errors


@user_errors
def demo(
    store: StoreOpt = None,
    size: Annotated[str, typer.Option(help="full (about 8 minutes first on 2 cores) or tiny.")] = "full",
    no_prefect: NoPrefectOpt = False,
) -> None:
    """The main job: train a small GPT-2 offline, fine-tune one block into a zoo, run the pipeline, print the report."""
    from weightsmith.demo.run import run_demo

    run_demo(store or state.default_store(), size=size, console=err, runner=None if no_prefect else _flow_runner)


def _flow_runner(source: str, options):
    """Run the pipeline as the `weightsmith-pipeline` flow (embedded Prefect)."""
    from weightsmith.pipeline import PipelineResult

    out = run_flow("run", "threads", 4)(source=source, options=options)
    return PipelineResult(model_url=out["model_url"], run_id="", reports=out["reports"], summary=out["verdicts"])
