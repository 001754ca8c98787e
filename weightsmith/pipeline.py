"""The pipeline: extract -> predict (generators and baselines) -> assemble -> vet -> report.

Every stage leaves its artifacts in the store under names derived from the pipeline run id, and
a stage whose artifact is already complete is not redone, so an interrupted run resumes:
- predictions/<run>-<group>-<generator>/prediction.json (predict),
- candidates/<run>-<group>-<generator>-<sample>/candidate.json (assemble),
- reports/<run>/report.json (vet).
Baselines are predictions like any other (the rows of `BASELINE_TABLE`, and `noise` at the
median novelty of each generator label's samples plus a fixed sweep of radii that reaches 1.5x
the largest candidate novelty), so the report compares everything on the same data. With a
`reference` zoo (real models the generators never saw, e.g. held-out fine-tunes) each of its
models is scored as label "gold", kind "reference": a row to read beside the candidates, never a
baseline a candidate must beat. When a group
has a zoo, every label, baseline or generator, fits on the zoo (`prediction.json`'s `training`
records what each fit saw); deterministic labels are predicted and scored with one sample.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from weightsmith.errors import WeightsmithError
from weightsmith.model import ModelRef, parse_model_url
from weightsmith.state import StoreUrl
from weightsmith.vetting import Run  # re-exported: the flow builds Runs

STAGES = ("extract", "predict", "weight-stats", "lm-eval")

NOISE_SWEEP = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # the fixed radii, cut after 1.5x max novelty
NOISE_REACH = 1.5  # the sweep reaches this many times the largest candidate novelty


class PipelineOptions(BaseModel):
    """One pipeline run; written into the report for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: StoreUrl = Field(None, validate_default=True)  # store URL (None: the default store)
    name: str | None = None  # model slug (default as in extract)
    revision: str | None = None  # model revision (default as in extract)
    stages: tuple[str, ...] = ("extract", "weight-stats")  # see STAGES; predict and lm-eval opt-in
    layers: tuple[tuple[str, ...], ...] = ()  # groups of globs; each group is predicted together
    generators: tuple[str, ...] = ("tile-diffusion",)  # generators to vet against the baselines
    generator_config: dict[str, dict] = Field(default_factory=dict)  # options per generator
    samples: int = Field(2, ge=1)  # candidates per generator and group
    seed: int = Field(0, ge=0)
    zoo: str | None = None  # zoos/<id>/ of the chosen tensors: fit zoo generators on it
    reference: str | None = None  # zoos/<id>/ of real models kept out of the zoo: scored whole as label "gold"
    fit_seeds: tuple[int, ...] = Field((0,), min_length=1)  # generators fit once per seed (one label, pooled)
    joint: bool = False  # generators (not baselines) fit a group's same-shape tensors as one stack
    text: str | None = None  # held-out text for lm-perplexity / embedding-similarity
    text_bytes: int | None = Field(None, ge=1)  # score the text's first bytes only (None: all)
    noise_radii: tuple[float, ...] = NOISE_SWEEP  # fixed noise radii (std units), cut at 1.5x max novelty
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
    summary: list[str] = field(default_factory=list)  # the reports' decision sentences
    summaries: list[dict] = field(default_factory=list)  # report.json's `summary` per group


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


@dataclass(frozen=True)
class Planned:
    """A prediction to make: label, generator, config, kind and samples."""

    label: str
    generator: str
    config: dict
    kind: str  # candidate | baseline | reference
    samples: int
    fit: int = 0  # which fit of the label (generators fitted once per `fit_seeds` entry)
    zoo: str | None = None  # fit on this zoo instead of the options' (the reference)


REFERENCE_LABEL = "gold"  # the label of the reference zoo's models


@dataclass(frozen=True)
class ZooFacts:
    """What the plan needs to know of a group's zoo."""

    k: int  # members
    ordered: bool  # zoo.json says the members are one run's checkpoints, first to last
    base: bool  # zoo.json has a base model (the merge baselines apply)


def zoo_facts(store, zoo: str | None) -> ZooFacts | None:
    """The zoo's size, order and base from its zoo.json (None without a zoo)."""
    if not zoo:
        return None
    from weightsmith.store import Store
    from weightsmith.zoo import read_zoo

    manifest = read_zoo(store if not isinstance(store, str) else Store(store), zoo)
    ordered = manifest.get("ordered", manifest.get("attrs", {}).get("ordered")) is True
    return ZooFacts(k=int(manifest["checkpoints"]), ordered=ordered, base=bool(manifest.get("base")))


def predictions_plan(
    options: PipelineOptions, zoo: ZooFacts | None = None, reference: ZooFacts | None = None
) -> list[Planned]:
    """The predictions of one layer group before noise: the generators, then the baselines,
    then the reference.

    Each generator is fitted once per `fit_seeds` entry (the seed goes into its config; one
    seed of 0 leaves the config as given), all under the generator's label, so the statistics
    pool over fits.

    Baselines come from the generator registry's tables: `gaussian` and `permute` always; with a
    zoo of K >= 2 the zoo baselines and their sweeps (`latest`/`extrapolate` for ordered zoos);
    with a base model the merges (`task-arithmetic`, `ties`) over their sweeps. Deterministic
    labels get one sample. `noise` is not here: its radii follow the candidates (`noise_runs`).
    """
    from weightsmith.generators import registry
    from weightsmith.vet import baseline_label

    plan = []
    for g in options.generators:
        config = options.generator_config.get(g, {})
        for fit, seed in enumerate(options.fit_seeds):
            fit_config = config if options.fit_seeds == (0,) else {**config, "seed": seed}
            plan.append(Planned(g, g, fit_config, "candidate", options.samples, fit))
    runs = [registry.BaselineRun(name, {}, False) for name in registry.BASELINES if name != "noise"]
    if zoo is not None:
        runs += registry.zoo_baselines(zoo.k, zoo.ordered)
        if zoo.base:
            runs += registry.merge_baselines(zoo.k)
    for run in runs:
        samples = 1 if run.deterministic else options.samples
        plan.append(Planned(baseline_label(run.generator, run.config), run.generator, run.config, "baseline", samples))
    if reference is not None:  # every reference model, once: a copy of member i for sample i
        plan.append(
            Planned(
                REFERENCE_LABEL, "zoo-member", {"pick": "in-order"}, "reference", reference.k, zoo=options.reference
            )
        )
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
    samples: int | None = None,
    fit: int = 0,
    zoo: str | None = None,
) -> str:
    """One prediction run (reused when complete); returns its run id.

    Every label fits on the group's zoo when there is one: baselines and generators see the same
    examples. `zoo` overrides it (the reference); `fit` numbers a label's fits.
    """
    from weightsmith.predict import PREDICTION, PredictOptions, predict

    pred_id = f"{run_id}-g{gi}-{_slug(label)}" + (f"-f{fit}" if fit else "")
    if model.store.exists(model.key("predictions", pred_id, PREDICTION)):
        return pred_id
    model.store.delete(model.key("predictions", pred_id))  # leftovers of an interrupted try
    # Baselines stay per tensor: per-tensor scales and permutations are the stronger baselines.
    joint = options.joint and generator in options.generators
    predict(
        model.url,
        PredictOptions(
            layer=group,
            generator=generator,
            config=config,
            samples=options.samples if samples is None else samples,
            seed=options.seed,
            device=options.device,
            zoo=zoo or options.zoo,
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
    from weightsmith.vetting import vet_group

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
        for run in runs:
            result.predictions[f"g{gi}:{run.label}"] = run.pred_id
            for s in range(run.samples):
                result.candidates[f"g{gi}:{run.label}#{s}"] = assemble_candidate(model, run.pred_id, s)
        say(f"group {gi}: {len(runs)} prediction runs assembled; vetting")
        vetted = vet_group(model, f"{run_id}-g{gi}", key_of(model, original), runs, options, say)
        result.report_url = vetted.url if result.report_url is None else result.report_url
        result.reports.append(vetted.url)
        result.summary += [f"group {gi}: {s}" for s in vetted.sentences]
        result.summaries.append(vetted.summary)
    return result


def run_group(
    model: ModelRef, run_id: str, gi: int, group: tuple[str, ...], options: PipelineOptions, say: Callable[[str], None]
) -> list[Run]:
    """Predictions of one group: generators, the baseline table, then noise at their novelties."""
    runs = []
    plan = predictions_plan(options, zoo_facts(model.store, options.zoo), zoo_facts(model.store, options.reference))
    for p in plan:
        pred_id = predict_group(
            model, run_id, gi, group, p.label, p.generator, p.config, options, p.samples, p.fit, p.zoo
        )
        runs.append(Run(p.label, p.generator, p.kind, p.config, pred_id, p.samples, p.fit))
        say(f"predicted: group {gi} {p.label}")
    for run in noise_runs(model, run_id, gi, group, [r for r in runs if r.kind == "candidate"], options):
        runs.append(run)
        say(f"predicted: group {gi} {run.label}")
    return runs


def noise_radii_for(per_label: dict[str, float], fixed: tuple[float, ...] = NOISE_SWEEP) -> list[float]:
    """Noise radii: each generator label's median novelty (2 significant digits) and the fixed
    radii up to the first one at or beyond 1.5x the largest of those novelties (all of them
    when there is none)."""
    matched = sorted({float(f"{n:.2g}") for n in per_label.values() if np.isfinite(n) and n > 0})
    sweep = sorted(fixed)
    if matched:
        reach = NOISE_REACH * max(matched)
        cut = next((i for i, r in enumerate(sweep) if r >= reach), None)
        if cut is None:  # the fixed radii fall short: extend them by 3x steps
            while sweep[-1] < reach:
                sweep.append(float(f"{sweep[-1] * 3:.2g}"))
            cut = len(sweep) - 1
        sweep = sweep[: cut + 1]
    return sorted(set(matched) | set(sweep))


def noise_runs(
    model: ModelRef, run_id: str, gi: int, group: tuple[str, ...], generated: list[Run], options: PipelineOptions
) -> list[Run]:
    """Noise baselines at each generator label's median novelty and the fixed sweep (see noise_radii_for)."""
    from weightsmith.vet import baseline_label
    from weightsmith.vetting import group_examples, sample_novelties

    medians = {}
    if generated:
        first = model.store.read_json(model.key("predictions", generated[0].pred_id, "prediction.json"))
        examples = group_examples(model, list(first["tensors"]), options.zoo)
        pooled: dict[str, list[float]] = {}  # a label's fits together
        for r in generated:
            pooled.setdefault(r.label, []).extend(sample_novelties(model, r.pred_id, examples))
        medians = {label: _median(values) for label, values in pooled.items()}
    runs = []
    for r in noise_radii_for(medians, tuple(options.noise_radii)):
        config = {"radius": float(r)}
        label = baseline_label("noise", config)
        pred_id = predict_group(model, run_id, gi, group, label, "noise", config, options)
        runs.append(Run(label, "noise", "baseline", config, pred_id, options.samples))
    return runs


def _median(values: list[float]) -> float:
    """The median of the finite values; NaN when there are none (constant tensors have no novelty)."""
    kept = [v for v in values if np.isfinite(v)]
    return float(np.median(kept)) if kept else float("nan")


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
