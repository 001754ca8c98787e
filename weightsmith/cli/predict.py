"""`predict` (one generator on chosen tensors) and `run` (the whole pipeline)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from weightsmith.cli.common import (
    StoreOpt,
    build_options,
    err,
    load_config,
    run_flow,
    user_errors,
)
from weightsmith.errors import WeightsmithError


@user_errors
def predict(
    model_url: Annotated[str, typer.Argument(help="<store>/models/<slug>/<revision>")],
    layer: Annotated[list[str], typer.Option(help="Glob over tensor names (repeatable).")],
    generator: Annotated[str, typer.Option(help="tile-diffusion, zoo-diffusion, img2img or a baseline.")],
    chunk_size: Annotated[
        str | None,
        typer.Option(help="Predict one run of this many float32 bytes (780KB, 3MB, 12MB) instead of the whole tensor."),
    ] = None,
    chunk_offset: Annotated[int, typer.Option(help="Element offset of that run.")] = 0,
    samples: Annotated[int, typer.Option(help="Draws per tensor.")] = 1,
    seed: Annotated[int, typer.Option(help="Same seed, same device: same values.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (auto: $DEVICE, else CUDA if present).")] = "auto",
    zoo: Annotated[str | None, typer.Option(help="Fit on zoos/<id>/ checkpoints.")] = None,
    joint: Annotated[
        bool, typer.Option("--joint", help="zoo-diffusion: all tensors as one group; others: one fit per shape.")
    ] = False,
    config: Annotated[str | None, typer.Option(help="Generator options as JSON or a YAML/JSON file.")] = None,
    model_dir: Annotated[str | None, typer.Option(help="img2img: local diffusers pipeline folder.")] = None,
    images: Annotated[str, typer.Option(help="all, preview or none.")] = "all",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
) -> None:
    """Fit a generator on the chosen tensors and write predicted tensors; prints the run URL."""
    from weightsmith.predict import PredictOptions, resolve_device
    from weightsmith.predict import predict as run_predict

    cfg = load_config(config)
    if model_dir:
        cfg["model_dir"] = model_dir
    options = build_options(
        PredictOptions,
        layer=tuple(layer),
        generator=generator,
        config=cfg,
        chunk_size=chunk_size,
        chunk_offset=chunk_offset,
        samples=samples,
        seed=seed,
        device=device,
        zoo=zoo,
        joint=joint,
        images=images,
    )
    _check_predict_input(model_url, options)
    resolve_device(options.device)
    if no_prefect:
        result = run_predict(model_url, options)
        err.print(f"{len(result.tensors)} tensors x {samples} samples on {', '.join(sorted(set(result.devices)))}")
        print(result.run_url)
        return
    result = run_flow("predict", "threads", 1, None)(model_url=model_url, options=options)
    err.print(f"ran on {result['pool']} ({result['reason']}); devices: {', '.join(result['devices'])}")
    print(result["run_url"])


def _check_predict_input(model_url: str, options) -> None:
    """Fail before a flow starts: the model is complete, the tensors and generator exist."""
    from weightsmith.generators.registry import get
    from weightsmith.model import parse_model_url
    from weightsmith.predict import select

    select(parse_model_url(model_url).manifest(), options.layer)
    gen = get(options.generator)()
    gen.config(options.config)
    if options.chunk_size and options.joint:
        raise WeightsmithError("--joint", "cannot be combined with --chunk-size")


@user_errors
def run(
    source: Annotated[str, typer.Argument(help="File, folder, s3:// or http(s):// URL of the model.")],
    store: StoreOpt = None,
    name: Annotated[str | None, typer.Option(help="Model slug in the store.")] = None,
    stages: Annotated[
        str, typer.Option(help="Comma list of extract, predict, weight-stats, lm-eval.")
    ] = "extract,weight-stats",
    layer: Annotated[list[str] | None, typer.Option(help="A layer group: comma-separated globs (repeatable).")] = None,
    generator: Annotated[list[str] | None, typer.Option(help="Generator to vet (repeatable).")] = None,
    samples: Annotated[int, typer.Option(help="Candidates per generator and group.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of every generator and baseline.")] = 0,
    zoo: Annotated[str | None, typer.Option(help="zoos/<id>/ to fit zoo generators on.")] = None,
    reference: Annotated[
        str | None, typer.Option(help="zoos/<id>/ of real models kept out of the zoo: scored whole as 'gold'.")
    ] = None,
    fit_seed: Annotated[
        list[int] | None, typer.Option("--fit-seed", help="Fit each generator once per seed (repeatable; pooled).")
    ] = None,
    joint: Annotated[
        bool, typer.Option("--joint", help="zoo-diffusion fits a group as one; others stack same-shape tensors.")
    ] = False,
    text: Annotated[str | None, typer.Option(help="Held-out text file for lm-eval.")] = None,
    config: Annotated[str | None, typer.Option(help="Generator options: JSON or YAML {generator: {...}}.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
) -> None:
    """The pipeline: extract -> predict -> assemble -> vet -> report; prints the report URL(s)."""
    from weightsmith.pipeline import PipelineOptions, check, run_pipeline

    options = build_options(
        PipelineOptions,
        store=store,
        name=name,
        stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
        layers=tuple(tuple(g.strip() for g in group.split(",") if g.strip()) for group in layer or ()),
        generators=tuple(generator or ("tile-diffusion",)),
        generator_config=load_config(config),
        samples=samples,
        seed=seed,
        zoo=zoo,
        reference=reference,
        fit_seeds=tuple(fit_seed or (0,)),
        joint=joint,
        text=text,
        device=device,
    )
    check(options)
    if text and not os.path.isfile(text):
        raise WeightsmithError(text, "no such text file")
    if no_prefect:
        result = run_pipeline(source, options, say=lambda m: err.print(m, highlight=False))
        reports, verdicts = result.reports or [result.report_url], result.summary
    else:
        out_ = run_flow("run", "threads", 4, None)(source=source, options=options)
        reports, verdicts = out_["reports"], out_["verdicts"]
    for v in verdicts:
        err.print(v, highlight=False)
    for r in reports:
        print(r)
