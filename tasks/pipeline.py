"""Pipeline tasks: one library stage call each (keys in, keys out), retried on storage errors."""

from __future__ import annotations

from prefect import task

from weightsmith import pipeline as lib
from weightsmith.model import parse_model_url
from weightsmith_tasks.credentials import use_credentials
from weightsmith_tasks.policy import policy

_POLICY = policy("pipeline")


@task(name="predict-run", **_POLICY)
def predict_run(
    model_url: str,
    run_id: str,
    gi: int,
    group: tuple[str, ...],
    label: str,
    generator: str,
    config: dict,
    options: lib.PipelineOptions,
    credentials: str | None = None,
    samples: int | None = None,
    fit: int = 0,
    zoo: str | None = None,
) -> str:
    use_credentials(credentials)
    return lib.predict_group(
        parse_model_url(model_url), run_id, gi, group, label, generator, config, options, samples, fit, zoo
    )


@task(name="novelty-noise-runs", **_POLICY)
def novelty_noise(
    model_url: str,
    run_id: str,
    gi: int,
    group: tuple[str, ...],
    generated: list[lib.Run],
    options: lib.PipelineOptions,
    credentials: str | None = None,
) -> list[lib.Run]:
    """Noise baselines at each generator label's median novelty and the fixed sweep."""
    use_credentials(credentials)
    return lib.noise_runs(parse_model_url(model_url), run_id, gi, group, generated, options)


@task(name="assemble-candidate", **_POLICY)
def assemble(model_url: str, pred_id: str | None, sample: int, run_id: str, credentials: str | None = None) -> str:
    use_credentials(credentials)
    model = parse_model_url(model_url)
    if pred_id is None:
        return lib.original_candidate(model, run_id)
    return lib.assemble_candidate(model, pred_id, sample)


@task(name="vet-group", **_POLICY)
def vet(
    model_url: str,
    report_id: str,
    original: str,
    runs: list[lib.Run],
    options: lib.PipelineOptions,
    credentials: str | None = None,
) -> dict:
    from weightsmith.vetting import vet_group

    use_credentials(credentials)
    model = parse_model_url(model_url)
    out = vet_group(model, report_id, lib.key_of(model, original), runs, options, lambda m: None)
    return {"report_url": out.url, "verdicts": out.sentences, "table": out.table, "summary": out.summary}


@task(name="weight-stats-report", **_POLICY)
def stats_report(model_url: str, run_id: str, credentials: str | None = None) -> str:
    use_credentials(credentials)
    return lib.write_stats_report(parse_model_url(model_url), run_id)
