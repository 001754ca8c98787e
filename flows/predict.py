"""`predict-layer` (runs a prediction where it is scheduled) and the GPU/CPU dispatcher.

`predict_layer` plans the fits, runs one `fit-generator` task per fit on a process pool of one
worker per core (torch threads per fit: cores // workers; in threads the interpreter lock
serialises these small networks), then samples and writes the run.

`predict_layer` is deployed twice: on the `gpu` pool (DEVICE=cuda) and on the `cpu` pool.
`dispatch_predict` picks where a request runs: the `gpu` pool when it has an online worker,
else the `cpu` pool when it has one, else in this process; a run left waiting on `gpu` past
`gpu_timeout` seconds is cancelled and sent to `cpu`. The choice, the reason and the device
actually used are written as a markdown artifact of the dispatching run.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.task_runners import ProcessPoolTaskRunner

from weightsmith.extract import new_run_id
from weightsmith.model import parse_model_url
from weightsmith.options import from_parameters
from weightsmith.predict import PREDICTION, PredictOptions, cpu_cores, fit_workers
from weightsmith_tasks import predict as t
from weightsmith_tasks.credentials import use_credentials

DEPLOYMENTS = {"gpu": "predict-layer/gpu", "cpu": "predict-layer/cpu"}


@flow(name="predict-layer", task_runner=ProcessPoolTaskRunner(max_workers=cpu_cores()))
def predict_layer(
    model_url: str,
    layer: list[str],
    generator: str,
    config: dict | None = None,
    chunk_size: str | int | None = None,
    chunk_offset: int = 0,
    samples: int = 1,
    seed: int = 0,
    device: str = "auto",
    zoo: str | None = None,
    images: str = "all",
    credentials: str | None = None,
    run_id: str | None = None,
    joint: bool = False,
    pack_bytes: int = 1 << 20,
) -> dict:
    """Fit/sample `generator` on the tensors matching `layer`; returns the prediction run."""
    options = from_parameters(PredictOptions, locals())
    # one task per fit, at most one per core, each with cores // workers torch threads
    units = t.plan_fits(model_url, options, credentials)
    workers, threads = fit_workers(len(units), options.workers)
    fits = [t.fit.submit(model_url, options, names, threads, credentials) for names in units]
    reused = sum(f.result()["reused"] for f in fits)  # raises if a fit failed
    result = t.predict(model_url, options, credentials)  # finds the states the fits stored
    result["host_device_env"] = os.environ.get("DEVICE", "")
    result["fits"] = {"count": len(units), "reused": reused, "workers": workers, "torch_threads": threads}
    get_run_logger().info("prediction %s on %s", result["run_url"], ", ".join(result["devices"]))
    return result


def _online_workers(pool: str) -> int:
    """Workers of `pool` that Prefect counts as online (0 when the pool does not exist)."""
    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(work_pool_name=pool)
        except Exception:  # no such pool, or no API server (ephemeral mode has no workers)
            return 0
    return sum(1 for w in workers if str(getattr(w, "status", "")).upper().endswith("ONLINE"))


def _deployment_exists(name: str) -> bool:
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except Exception:
            return False


def choose_pool() -> tuple[str, str]:
    """("gpu" | "cpu" | "in-process", reason)."""
    for pool in ("gpu", "cpu"):
        if not _deployment_exists(DEPLOYMENTS[pool]):
            continue
        online = _online_workers(pool)
        if online:
            return pool, f"pool {pool!r} has {online} online worker(s)"
    return "in-process", "no pool with an online worker and a predict-layer deployment"


@flow(name="predict-dispatch")
def dispatch_predict(
    model_url: str,
    layer: list[str],
    generator: str,
    config: dict | None = None,
    chunk_size: str | int | None = None,
    chunk_offset: int = 0,
    samples: int = 1,
    seed: int = 0,
    device: str = "auto",
    zoo: str | None = None,
    images: str = "all",
    credentials: str | None = None,
    gpu_timeout: float = 600.0,
    joint: bool = False,
    pack_bytes: int = 1 << 20,
) -> dict:
    """Send the prediction to the GPU pool, the CPU pool or run it here; record why."""
    params = dict(
        model_url=model_url,
        layer=layer,
        generator=generator,
        config=config or {},
        chunk_size=chunk_size,
        chunk_offset=chunk_offset,
        samples=samples,
        seed=seed,
        device=device,
        zoo=zoo,
        images=images,
        credentials=credentials,
        joint=joint,
        pack_bytes=pack_bytes,
    )
    use_credentials(credentials)
    pool, reason = choose_pool()
    attempts: list[tuple[str, str]] = []
    run_id = new_run_id()
    if pool == "gpu":
        state = _run_on("gpu", {**params, "device": "auto", "run_id": run_id}, gpu_timeout)
        attempts.append(("gpu", state))
        if state != "COMPLETED":
            reason += f"; the gpu run ended {state} (timeout {gpu_timeout:g} s): re-sent to cpu"
            pool = "cpu" if _online_workers("cpu") and _deployment_exists(DEPLOYMENTS["cpu"]) else "in-process"
            run_id += "-cpu"  # a cancelled gpu run may still be writing its own folder
    if pool == "cpu":
        state = _run_on("cpu", {**params, "device": "cpu", "run_id": run_id}, None)
        attempts.append(("cpu", state))
        if state != "COMPLETED":
            raise RuntimeError(f"prediction run ended {state} on pool cpu")
    if pool == "in-process":
        predict_layer(**params, run_id=run_id)
        attempts.append(("in-process", "COMPLETED"))
    # The store is the truth: the prediction's own manifest says where and on what it ran.
    run = parse_model_url(model_url)
    facts = run.store.read_json(run.key("predictions", run_id, PREDICTION))
    devices = sorted({d for t in facts["tensors"].values() for d in t["devices"]})
    outcome = {
        "run_url": run.store.url_of(run.key("predictions", run_id)),
        "run_id": run_id,
        "tensors": list(facts["tensors"]),
        "devices": devices,
        "host_device_env": facts["device"]["env"],
    }
    create_markdown_artifact(
        key="predict-dispatch",
        markdown=(
            f"# predict dispatch\n\n- chosen: **{pool}**\n- reason: {reason}\n"
            f"- attempts: {', '.join(f'{p}: {s}' for p, s in attempts)}\n"
            f"- device used: {', '.join(devices)} (worker DEVICE={facts['device']['env'] or 'unset'})\n"
            f"- run: `{outcome['run_url']}`\n"
        ),
        description="Where the prediction ran and why",
    )
    return {**outcome, "pool": pool, "reason": reason, "attempts": attempts}


def _run_on(pool: str, params: dict, timeout: float | None) -> str:
    """Run the pool's deployment and wait; cancel it when it has not finished by `timeout`.

    Returns the final state type ("COMPLETED", "FAILED", ...) or "TIMED_OUT".
    """
    # Prefect's sync run_deployment sleeps a whole poll_interval (5 s by default) before it looks at
    # the timeout again, so a short timeout would silently wait 5 s: poll at a quarter of it.
    poll = 5.0 if timeout is None else min(5.0, max(0.05, timeout / 4))
    run = run_deployment(DEPLOYMENTS[pool], parameters=params, timeout=timeout, poll_interval=poll, as_subflow=True)
    state = run.state
    if state is not None and state.is_final():
        return "COMPLETED" if state.is_completed() else state.type.value
    with get_client(sync_client=True) as client:  # still scheduled or running: take it back
        from prefect.states import Cancelling

        client.set_flow_run_state(run.id, Cancelling(message="dispatch timeout: re-sent to cpu"), force=True)
    return "TIMED_OUT"
