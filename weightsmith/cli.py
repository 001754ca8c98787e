"""The `weightsmith` command line: validates input, calls the library, shows progress.

User errors (WeightsmithError) print one line, `error: <file>: <problem>`, and exit with 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Annotated

# On shared CPUs, OpenMP threads spinning while they wait made torch 5-10x slower (measured);
# passive waiting costs nothing when the machine is idle. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from weightsmith import state
from weightsmith.errors import WeightsmithError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Stream model weights into a Zarr/TIFF artifact store, predict new ones, vet them.",
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

StoreOpt = Annotated[
    str | None,
    typer.Option("--store", help="Store URL: a folder or s3://bucket/prefix (default: the state folder's store)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _quiet_libraries() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # aiohttp sessions of s3fs are closed by interpreter exit, which asyncio reports as errors.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def user_errors(fn: Callable) -> Callable:
    """Turn WeightsmithError into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except WeightsmithError as e:
            print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def byte_progress(description: str, enabled: bool = True):
    """A rich progress bar over bytes; yields (advance, set_total) callbacks."""
    if not enabled or not err.is_terminal:
        yield (lambda n, name: None), (lambda total: None)
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}"),
        console=err,
        transient=True,
    ) as p:
        task = p.add_task(description, total=None, name="")
        yield (lambda n, name: p.update(task, advance=n, name=name[-40:])), (lambda t: p.update(task, total=t))


# ---------------------------------------------------------------------------------------------
@app.command()
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


@app.command()
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
    from weightsmith.extract import ExtractOptions, prepare
    from weightsmith.extract import extract as run_extract

    options = _options(
        ExtractOptions,
        store=store or state.default_store(),
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
    prepare(source, options)  # bad input fails here, before a flow run exists
    flow = _flow("extract", task_runner, workers, dask_address)
    model_url = flow(
        source=source,
        store=options.store,
        name=name,
        revision=revision,
        include=list(options.include),
        exclude=list(options.exclude),
        images=images,
        force=force,
        wait_s=wait,
    )
    if as_json:
        out.print_json(json.dumps({"model_url": model_url}))
    else:
        print(model_url)


def _options(cls, **values):
    """Validate options once, at the edge; a bad value is a one-line error naming the flag."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as e:
        first = e.errors()[0]
        raise WeightsmithError("--" + str(first["loc"][0]).replace("_", "-"), first["msg"]) from None


def _flow(name: str, task_runner: str, workers: int, dask_address: str | None):
    """A flow with the chosen task runner, Prefect configured for the embedded default."""
    state.configure_prefect()
    from flows import registry
    from flows.runners import DEFAULT_WORKERS, RUNNERS, embedded_settings, make_runner

    if task_runner not in RUNNERS:
        raise WeightsmithError("--task-runner", f"unknown runner {task_runner!r} (choose from {', '.join(RUNNERS)})")
    _quiet_prefect()
    runner = make_runner(task_runner, workers or DEFAULT_WORKERS, dask_address)
    chosen = registry.FLOWS[name].with_options(task_runner=runner)

    def call(**parameters):
        with embedded_settings():
            return chosen(**parameters)

    return call


def _quiet_prefect() -> None:
    """User errors raised inside tasks stay one line: drop their tracebacks from Prefect's logs."""

    class OneLine(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], WeightsmithError):
                record.exc_info = None
                record.exc_text = None
                record.msg, record.args = str(record.getMessage()).splitlines()[0], ()
            return True

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect"):
        logging.getLogger(name).addFilter(OneLine())


@app.command()
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


@app.command()
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


@app.command()
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
    joint: Annotated[bool, typer.Option("--joint", help="One fit per shape: same-shape tensors stacked.")] = False,
    config: Annotated[str | None, typer.Option(help="Generator options as JSON or a YAML/JSON file.")] = None,
    model_dir: Annotated[str | None, typer.Option(help="img2img: local diffusers pipeline folder.")] = None,
    images: Annotated[str, typer.Option(help="all, preview or none.")] = "all",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
) -> None:
    """Fit a generator on the chosen tensors and write predicted tensors; prints the run URL."""
    from weightsmith.predict import PredictOptions, resolve_device
    from weightsmith.predict import predict as run_predict

    cfg = _load_config(config)
    if model_dir:
        cfg["model_dir"] = model_dir
    options = _options(
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
    flow = _flow("predict", "threads", 1, None)
    result = flow(
        model_url=model_url,
        layer=list(layer),
        generator=generator,
        config=cfg,
        chunk_size=chunk_size,
        chunk_offset=chunk_offset,
        samples=samples,
        seed=seed,
        device=device,
        zoo=zoo,
        images=images,
        joint=joint,
    )
    err.print(f"ran on {result['pool']} ({result['reason']}); devices: {', '.join(result['devices'])}")
    print(result["run_url"])


def _load_config(text: str | None) -> dict:
    """Generator options from inline JSON or a YAML/JSON file."""
    if not text:
        return {}
    import os

    import yaml

    try:
        if os.path.exists(text):
            with open(text) as f:
                value = yaml.safe_load(f)
        else:
            value = json.loads(text)
    except (ValueError, yaml.YAMLError) as e:
        raise WeightsmithError("--config", f"not JSON or YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise WeightsmithError("--config", "must be a mapping of option names to values")
    return value


def _check_predict_input(model_url: str, options) -> None:
    """Fail before a flow starts: the model is complete, the tensors and generator exist."""
    from weightsmith.codec import parse_size
    from weightsmith.generators.registry import get
    from weightsmith.model import parse_model_url
    from weightsmith.predict import select

    select(parse_model_url(model_url).manifest(), options.layer)
    gen = get(options.generator)()
    gen.config(options.config)
    if options.chunk_size:
        parse_size(options.chunk_size)
        if options.joint:
            raise WeightsmithError("--joint", "cannot be combined with --chunk-size")


@app.command()
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
    joint: Annotated[
        bool, typer.Option("--joint", help="Generators fit a group's same-shape tensors as one stack.")
    ] = False,
    text: Annotated[str | None, typer.Option(help="Held-out text file for lm-eval.")] = None,
    config: Annotated[str | None, typer.Option(help="Generator options: JSON or YAML {generator: {...}}.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
) -> None:
    """The pipeline: extract -> predict -> assemble -> vet -> report; prints the report URL(s)."""
    from weightsmith.pipeline import PipelineOptions, check, run_pipeline

    options = _options(
        PipelineOptions,
        store=store or state.default_store(),
        name=name,
        stages=tuple(s.strip() for s in stages.split(",") if s.strip()),
        layers=tuple(tuple(g.strip() for g in group.split(",") if g.strip()) for group in layer or ()),
        generators=tuple(generator or ("tile-diffusion",)),
        generator_config=_load_config(config),
        samples=samples,
        seed=seed,
        zoo=zoo,
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
        from weightsmith.extract import ExtractOptions, prepare

        prepare(source, _options(ExtractOptions, store=options.store, name=name))  # before a flow starts
        flow = _flow("run", "threads", 4, None)
        out_ = flow(
            source=source,
            store=options.store,
            name=name,
            stages=list(options.stages),
            layers=[list(g) for g in options.layers],
            generators=list(options.generators),
            generator_config=options.generator_config,
            samples=samples,
            seed=seed,
            zoo=zoo,
            joint=joint,
            text=text,
            device=device,
        )
        reports, verdicts = out_["reports"], out_["verdicts"]
    for v in verdicts:
        err.print(v, highlight=False)
    for r in reports:
        print(r)


@app.command()
@user_errors
def demo(
    store: StoreOpt = None,
    size: Annotated[str, typer.Option(help="full (about 10 minutes first, cached after) or tiny.")] = "full",
    no_prefect: Annotated[bool, typer.Option("--no-prefect", help="Call the library directly.")] = False,
) -> None:
    """The main job: train a small GPT-2 offline, collect a zoo, run the pipeline, print the report."""
    from weightsmith.demo import run_demo

    run_demo(store or state.default_store(), size=size, console=err, use_prefect=not no_prefect)


def _register_subcommands() -> None:
    from weightsmith import cli_upkeep
    from weightsmith.cli_dev import dev_app
    from weightsmith.cli_leaderboard import leaderboard
    from weightsmith.cli_zoo import zoo_app

    app.add_typer(dev_app, name="dev", help="Local stack without Docker: SeaweedFS, Prefect server, workers.")
    app.command("leaderboard")(user_errors(leaderboard))
    app.command("ls")(cli_upkeep.ls)
    app.command("gc")(cli_upkeep.gc)
    app.add_typer(zoo_app, name="zoo", help="Zoos from the models in the store: build, ls, show.")


_register_subcommands()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
