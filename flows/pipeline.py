"""The `weightsmith-pipeline` flow: extract -> predict -> assemble -> vet -> report.

Extraction runs as the `extract-model` subflow (its per-unit fan-out); predictions of a layer
group fan out over generators and baselines (all groups at once, so one group is vetted while
the next is still fitting), candidates over samples. Every stage's artifacts
are in the store under ids derived from the run id, so re-running the same request resumes.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from weightsmith.options import from_parameters
from weightsmith.pipeline import PipelineOptions, Run, check, predictions_plan, run_id_for, zoo_facts
from weightsmith_flows.artifacts import _key
from weightsmith_flows.extract import extract_model
from weightsmith_tasks import pipeline as t
from weightsmith_tasks.credentials import use_credentials


@flow(name="weightsmith-pipeline", persist_result=True)
def weightsmith_pipeline(
    source: str,
    store: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    stages: list[str] | None = None,
    layers: list[list[str]] | None = None,
    generators: list[str] | None = None,
    generator_config: dict[str, dict] | None = None,
    samples: int = 2,
    seed: int = 0,
    zoo: str | None = None,
    reference: str | None = None,
    fit_seeds: list[int] | None = None,
    joint: bool = False,
    text: str | None = None,
    text_bytes: int | None = None,
    noise_radii: list[float] | None = None,
    device: str = "auto",
    images: str = "preview",
    run_id: str | None = None,
    credentials: str | None = None,
) -> dict:
    """Returns {"model_url", "report_url", "reports", "status", "verdicts", "summaries"}; raises on failure."""
    log = get_run_logger()
    bucket_url = use_credentials(credentials)
    options = from_parameters(PipelineOptions, locals(), store=store or bucket_url)
    check(options)
    rid = run_id_for(source, options)
    model_url = extract_model(
        source=source, store=options.store, name=name, revision=revision, images=images, credentials=credentials
    )
    if "predict" not in options.stages:
        report = t.stats_report(model_url, rid, credentials)
        return {
            "model_url": model_url,
            "report_url": report,
            "reports": [report],
            "status": "done",
            "verdicts": [],
            "summaries": [],
        }

    original = t.assemble.submit(model_url, None, 0, rid, credentials)
    reports, verdicts, summaries = [], [], []
    plan = predictions_plan(options, zoo_facts(options.store, options.zoo), zoo_facts(options.store, options.reference))
    # Every group's predictions start now, so later groups fit while earlier ones are vetted.
    pending = [
        [
            t.predict_run.submit(
                model_url, rid, gi, group, p.label, p.generator, p.config, options, credentials, p.samples, p.fit, p.zoo
            )
            for p in plan
        ]
        for gi, group in enumerate(options.layers)
    ]
    for gi, group in enumerate(options.layers):
        futures = pending[gi]
        runs = [
            Run(p.label, p.generator, p.kind, p.config, f.result(), p.samples, p.fit)
            for p, f in zip(plan, futures, strict=True)
        ]
        generated = [r for r in runs if r.kind == "candidate"]
        runs += list(t.novelty_noise(model_url, rid, gi, group, generated, options, credentials))
        cands = [t.assemble.submit(model_url, r.pred_id, s, rid, credentials) for r in runs for s in range(r.samples)]
        for f in cands:
            f.result()
        outcome = t.vet(model_url, f"{rid}-g{gi}", original.result(), runs, options, credentials)
        reports.append(outcome["report_url"])
        verdicts += [f"group {gi}: {v}" for v in outcome["verdicts"]]
        summaries.append(outcome["summary"])
        create_table_artifact(
            key=_key(f"report-{rid}-g{gi}"),
            table=outcome["table"],
            description=f"Vetting of group {gi} ({', '.join(group)})",
        )
    create_markdown_artifact(
        key=_key(f"pipeline-{rid}"),
        markdown="# weightsmith pipeline\n\n"
        + f"- model: `{model_url}`\n"
        + "".join(f"- report: `{r}`\n" for r in reports)
        + "\n## Verdicts\n"
        + "".join(f"- {v}\n" for v in verdicts),
    )
    log.info("pipeline %s done: %d report(s)", rid, len(reports))
    return {
        "model_url": model_url,
        "report_url": reports[0] if reports else None,
        "reports": reports,
        "status": "done",
        "verdicts": verdicts,
        "summaries": summaries,
    }
