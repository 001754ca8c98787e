"""The pipeline: extract -> predict (generators and baselines) -> assemble -> vet -> report.

Every stage leaves its artifacts in the store under names derived from the pipeline run id, and
a stage whose artifact is already complete is not redone, so an interrupted run resumes:
- predictions/<run>-<group>-<generator>/prediction.json (predict),
- candidates/<run>-<group>-<generator>-<sample>/candidate.json (assemble),
- reports/<run>/report.json (vet).
Baselines are predictions like any other (`gaussian`, `permute`, `noise` at several radii,
including the median novelty of the generated samples; with a zoo `coord-gaussian`,
`pca-gaussian` and `average`), so the report compares everything on the same data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith.errors import WeightsmithError
from weightsmith.generators.registry import BASELINES, ZOO_BASELINES
from weightsmith.model import ModelRef, parse_model_url

STAGES = ("extract", "predict", "weight-stats", "lm-eval")


class PipelineOptions(BaseModel):
    """One pipeline run; written into the report for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str  # store URL
    name: str | None = None  # model slug (default as in extract)
    revision: str | None = None  # model revision (default as in extract)
    stages: tuple[str, ...] = ("extract", "weight-stats")  # see STAGES; predict and lm-eval opt-in
    layers: tuple[tuple[str, ...], ...] = ()  # groups of globs; each group is predicted together
    generators: tuple[str, ...] = ("tile-diffusion",)  # generators to vet against the baselines
    generator_config: dict[str, dict] = Field(default_factory=dict)  # options per generator
    samples: int = Field(2, ge=1)  # candidates per generator and group
    seed: int = Field(0, ge=0)
    zoo: str | None = None  # zoos/<id>/ of the chosen tensors: fit zoo generators on it
    joint: bool = False  # generators (not baselines) fit a group's same-shape tensors as one stack
    text: str | None = None  # held-out text for lm-perplexity / embedding-similarity
    noise_radii: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # noise baselines (std units)
    device: str = "auto"
    images: str = "preview"  # images of extracted and predicted tensors
    run_id: str | None = None  # default: derived from the options, so a re-run resumes


@dataclass
class PipelineResult:
    model_url: str
    run_id: str
    predictions: dict[str, str] = field(default_factory=dict)  # label -> prediction run id
    candidates: dict[str, str] = field(default_factory=dict)  # label -> candidate location
    report_url: str | None = None
    reports: list[str] = field(default_factory=list)  # one report per layer group
    summary: list[str] = field(default_factory=list)  # the report's verdict sentences


def run_id_for(source: str, options: PipelineOptions) -> str:
    """A stable id: the same source and options resume the same run (and the same way of
    drawing samples: predictions of an older SAMPLING_VERSION are never reused)."""
    from weightsmith.generators.base import SAMPLING_VERSION

    if options.run_id:
        return options.run_id
    facts = {"source": source, "sampling": SAMPLING_VERSION, **options.model_dump(mode="json")}
    payload = json.dumps(facts, sort_keys=True)
    return "p-" + hashlib.sha256(payload.encode()).hexdigest()[:12]


def check(options: PipelineOptions) -> None:
    unknown = set(options.stages) - set(STAGES)
    if unknown:
        raise WeightsmithError("--stages", f"unknown stage(s) {sorted(unknown)} (choose from {', '.join(STAGES)})")
    if "predict" in options.stages and not options.layers:
        raise WeightsmithError("--layers", "the predict stage needs at least one layer group")


def predictions_plan(options: PipelineOptions) -> list[tuple[str, str, dict, str]]:
    """(label, generator, config, kind) for each prediction of one layer group."""
    plan = [(g, g, options.generator_config.get(g, {}), "candidate") for g in options.generators]
    plan += [(b, b, {}, "baseline") for b in BASELINES if b != "noise"]
    plan += [(f"noise(r={r:g})", "noise", {"radius": r}, "baseline") for r in options.noise_radii]
    if options.zoo:
        plan += [(b, b, {}, "baseline") for b in ZOO_BASELINES]
    return plan


def predict_group(
    model: ModelRef,
    run_id: str,
    gi: int,
    group: tuple[str, ...],
    label: str,
    generator: str,
    config: dict,
    options: PipelineOptions,
) -> str:
    """One prediction run (reused when complete); returns its run id."""
    from weightsmith.predict import PREDICTION, PredictOptions, predict

    pred_id = f"{run_id}-g{gi}-{_slug(label)}"
    if model.store.exists(model.key("predictions", pred_id, PREDICTION)):
        return pred_id
    model.store.delete(model.key("predictions", pred_id))  # leftovers of an interrupted try
    zoo = options.zoo if (generator in ZOO_BASELINES or generator.startswith("zoo")) else None
    # Baselines stay per tensor: per-tensor scales and permutations are the stronger baselines.
    joint = options.joint and generator in options.generators
    predict(
        model.url,
        PredictOptions(
            layer=group,
            generator=generator,
            config=config,
            samples=options.samples,
            seed=options.seed,
            device=options.device,
            zoo=zoo,
            joint=joint,
            images=options.images,
            run_id=pred_id,
        ),
    )
    return pred_id


def assemble_candidate(model: ModelRef, pred_id: str, sample: int) -> str:
    """The candidate of one sample (reused when complete); returns its store location."""
    from weightsmith.assemble import CANDIDATE, AssembleOptions, assemble

    cand_id = f"{pred_id}-s{sample}"
    if model.store.exists(model.key("candidates", cand_id, CANDIDATE)):
        return model.store.url_of(model.key("candidates", cand_id))
    return assemble(model.url, AssembleOptions(prediction=pred_id, sample=sample, candidate_id=cand_id)).location


def original_candidate(model: ModelRef, run_id: str) -> str:
    """The base re-assembled with nothing replaced: the 'original' entry, in the same form."""
    from weightsmith.assemble import CANDIDATE, AssembleOptions, assemble

    cand_id = f"{run_id}-original"
    if model.store.exists(model.key("candidates", cand_id, CANDIDATE)):
        return model.store.url_of(model.key("candidates", cand_id))
    return assemble(model.url, AssembleOptions(candidate_id=cand_id)).location


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in label).strip("-")


def run_pipeline(source: str, options: PipelineOptions, say: Callable[[str], None] = print) -> PipelineResult:
    """All stages in this process (the flow runs the same stage functions as tasks)."""
    from weightsmith.extract import ExtractOptions, extract

    check(options)
    run_id = run_id_for(source, options)
    extracted = extract(
        source, ExtractOptions(store=options.store, name=options.name, revision=options.revision, images=options.images)
    )
    model = parse_model_url(extracted.model_url)
    say(f"extracted: {model.url} ({extracted.tensors} tensors, {extracted.written} written)")
    result = PipelineResult(model.url, run_id)
    if "predict" not in options.stages:
        result.report_url = write_stats_report(model, run_id)
        return result
    original = original_candidate(model, run_id)
    for gi, group in enumerate(options.layers):
        runs = run_group(model, run_id, gi, group, options, say)
        for label, _gen, _kind, _cfg, pred_id in runs:
            result.predictions[f"g{gi}:{label}"] = pred_id
            for s in range(options.samples):
                result.candidates[f"g{gi}:{label}#{s}"] = assemble_candidate(model, pred_id, s)
        say(f"group {gi}: {len(runs)} prediction runs assembled; vetting")
        from weightsmith.vetting import vet_group

        text = options.text if "lm-eval" in options.stages else None
        url, sentences, _rows = vet_group(
            model,
            f"{run_id}-g{gi}",
            key_of(model, original),
            runs,
            options.samples,
            options.zoo,
            text,
            options.device,
            say,
        )
        result.report_url = url if result.report_url is None else result.report_url
        result.reports.append(url)
        result.summary += [f"group {gi}: {s}" for s in sentences]
    return result


def run_group(
    model: ModelRef, run_id: str, gi: int, group: tuple[str, ...], options: PipelineOptions, say: Callable[[str], None]
) -> list[tuple[str, str, str, dict, str]]:
    """Predictions of one group: generators, fixed baselines, then noise at their novelty."""
    runs = []
    for label, generator, config, kind in predictions_plan(options):
        pred_id = predict_group(model, run_id, gi, group, label, generator, config, options)
        runs.append((label, generator, kind, config, pred_id))
        say(f"predicted: group {gi} {label}")
    generated = [r[4] for r in runs if r[2] == "candidate"]
    for run in novelty_noise_runs(model, run_id, gi, group, generated, options):
        runs.append(run)
        say(f"predicted: group {gi} {run[0]} (the generators' median novelty)")
    return runs


def novelty_noise_runs(
    model: ModelRef, run_id: str, gi: int, group: tuple[str, ...], generated: list[str], options: PipelineOptions
) -> list[tuple[str, str, str, dict, str]]:
    """Noise baselines at the median novelty of the generated samples (radii not yet run)."""
    from weightsmith.vet import baseline_label, noise_radii
    from weightsmith.vetting import group_examples, sample_novelties

    if not generated:
        return []
    first = model.store.read_json(model.key("predictions", generated[0], "prediction.json"))
    examples = group_examples(model, list(first["tensors"]), options.zoo)
    novelties = [n for pred_id in generated for n in sample_novelties(model, pred_id, examples)]
    fixed = set(options.noise_radii)
    runs = []
    for r in noise_radii([float(np.nanmedian(novelties))], fixed=tuple(options.noise_radii)):
        if r in fixed or not np.isfinite(r):
            continue
        config = {"radius": float(r)}
        label = baseline_label("noise", config)
        runs.append(
            (
                label,
                "noise",
                "baseline",
                config,
                predict_group(model, run_id, gi, group, label, "noise", config, options),
            )
        )
    return runs


def write_stats_report(model: ModelRef, run_id: str) -> str:
    """Batch mode (extract + weight-stats): per-tensor statistics of the model, no candidates."""
    from weightsmith.store.store import dumps

    manifest = model.manifest()
    rows = [
        {"name": r["name"], "dtype": r["dtype"], "shape": r["shape"], **r["stats"]}
        for r in manifest["tensors"].values()
        if r.get("role") != "gptq-component"
    ]
    prefix = model.key("reports", run_id)
    lines = [
        f"# weight statistics of {model.slug}@{model.revision}",
        "",
        "| tensor | dtype | shape | mean | std | abs max | NaN | Inf |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['name']} | {r['dtype']} | {'x'.join(map(str, r['shape']))} | {_g(r['mean'])} | {_g(r['std'])} "
        f"| {_g(r['abs_max'])} | {r['nan']} | {r['inf']} |"
        for r in rows
    ]
    model.store.write_bytes(f"{prefix}/report.md", ("\n".join(lines) + "\n").encode())
    model.store.write_bytes(
        f"{prefix}/report.json",
        dumps({"run_id": run_id, "kind": "weight-stats", "model": f"{model.slug}@{model.revision}", "tensors": rows}),
    )
    return model.store.url_of(prefix)


def _g(x) -> str:
    return "" if x is None else f"{x:.4g}"


def key_of(model: ModelRef, location: str) -> str:
    """The store key of a location the assembler returned (a path or a store URL)."""
    return location[len(model.store.url) + 1 :] if location.startswith(model.store.url) else location
