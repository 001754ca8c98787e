"""The main job (`weightsmith demo`, `make demo`), offline, on the embedded default.

1. Train a small GPT-2-architecture model (byte-level vocabulary of 256) on Python's standard
   library sources to a plateau; cached in the state folder, so later runs skip it.
2. Collect a zoo of a few hundred checkpoints of the chosen tensors (LayerNorms and one block's
   attention weights): continued training with everything else frozen, noisy learning rate.
3. Run the pipeline on it (extract -> zoo-diffusion and tile-diffusion -> baselines ->
   assemble -> vet on held-out text) for two layer groups, and print the report. The generators
   fit same-shape tensors jointly (`joint`): all LayerNorm vectors as one (n, width) stack.
`--size tiny` runs the same steps on a smaller model in under two minutes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from weightsmith import state

if TYPE_CHECKING:
    from weightsmith.pipeline import PipelineOptions, PipelineResult

PipelineRunner = Callable[[str, "PipelineOptions"], "PipelineResult"]  # (source, options) -> result


# Per demo size: zoo checkpoints, steps between them, and the generators' options.
DEMO = {
    "tiny": {
        "checkpoints": 48,
        "every": 2,
        "samples": 4,  # per label (deterministic baselines: 1); the ensemble NLL uses M = 4
        "text_bytes": 16_000,  # of the held-out text scored (benchmarks score all of it)
        "generator_config": {
            "zoo-diffusion": {
                "ae_steps": 150,
                "ddpm_steps": 300,
                "components": 32,
                "hidden": 64,
                "denoiser_width": 64,
                "inference_steps": 10,
            },
            "tile-diffusion": {
                "tile": 16,
                "ae_channels": 16,
                "ae_train_steps": 30,
                "unet_train_steps": 60,
                "batch_size": 16,
                "block_out_channels": [16, 32],
                "sample_steps": 4,
            },
        },
    },
    "full": {
        "checkpoints": 256,
        "every": 2,
        "samples": 4,
        "text_bytes": 16_000,  # sized for a first run under 12 min on 2 cores (check with bench/demo.py)
        "generator_config": {
            "zoo-diffusion": {"ae_steps": 600, "ddpm_steps": 1200},
            "tile-diffusion": {"ae_train_steps": 120, "unet_train_steps": 240, "batch_size": 32},
        },
    },
}
LAYER_GROUPS = (
    ("transformer.h.*.ln_*", "transformer.ln_f.*"),
    ("transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"),
)


def run_demo(store: str, size: str = "full", console=None, runner: PipelineRunner | None = None) -> dict:
    """Train (once), collect a zoo (once), run the pipeline, print the report; returns a summary.

    `runner(source, options)` runs the pipeline: the library's `run_pipeline` by default (no
    Prefect); the CLI passes one that runs the `weightsmith-pipeline` flow.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from weightsmith.demo.train import SPECS, collect_zoo, train_lm
    from weightsmith.errors import WeightsmithError
    from weightsmith.pipeline import PipelineOptions, run_pipeline
    from weightsmith.store import Store
    from weightsmith.zoo import read_zoo, write_zoo

    if size not in DEMO:
        raise WeightsmithError("--size", f"unknown size {size!r} (choose from {', '.join(DEMO)})")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # Training and the zoo run alone: up to 4 threads (2 threads: 1.6x faster per step than 1 here).
    # The pipeline runs its tasks in parallel threads: one torch thread each, or OpenMP
    # oversubscribes the cores (measured 5-20x slower for these small models).
    torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
    say = console.print if console is not None else print
    started = time.time()
    spec, plan = SPECS[size], DEMO[size]

    folder = state.cache_dir() / f"demo-lm-{size}"
    say(f"1/3 language model: GPT-2 architecture, {spec.layers} layers x {spec.width}, bytes as tokens")
    with _bar(console, "train", spec.max_steps) as advance:
        facts = train_lm(folder, spec, progress=lambda step, total, nll: advance(step, f"held-out {nll:.3f} nats/byte"))
    say(
        f"    {facts['steps']} steps, held-out NLL {facts['heldout_nll_per_byte']:.3f} nats/byte "
        f"({'plateau' if facts.get('plateau') else 'step cap'}); cached in {folder}"
    )

    zoo_id = f"demo-{size}-k{plan['checkpoints']}-ordered"  # one run's checkpoints, first to last
    store_obj = Store(store)
    store_obj.check_writable()
    patterns = tuple(p for group in LAYER_GROUPS for p in group)
    try:
        read_zoo(store_obj, zoo_id)
        say(f"2/3 zoo {zoo_id}: already in the store")
    except (WeightsmithError, FileNotFoundError):
        say(f"2/3 zoo: {plan['checkpoints']} checkpoints of {len(patterns)} tensor patterns (others frozen)")
        with _bar(console, "zoo", plan["checkpoints"]) as advance:
            stacks = collect_zoo(
                folder, patterns, plan["checkpoints"], every=plan["every"], progress=lambda k, total: advance(k, "")
            )
        write_zoo(store_obj, zoo_id, stacks, attrs={"model": str(folder), "every": plan["every"], "ordered": True})

    torch.set_num_threads(1)
    say("3/3 pipeline: extract -> zoo-diffusion, tile-diffusion and baselines -> assemble -> vet")
    options = dict(
        store=store,
        name=f"demo-lm-{size}",
        stages=("extract", "predict", "weight-stats", "lm-eval"),
        layers=LAYER_GROUPS,
        generators=("zoo-diffusion", "tile-diffusion"),
        generator_config=plan["generator_config"],
        samples=plan["samples"],
        zoo=zoo_id,
        joint=True,
        text=str(folder / "heldout.txt"),
        text_bytes=plan["text_bytes"],
        images="preview",
    )
    runner = runner or (lambda source, opts: run_pipeline(source, opts, say=lambda m: None))
    result = runner(str(folder), PipelineOptions(**options))
    model_url, reports, verdicts = result.model_url, result.reports, result.summary
    _print_reports(store_obj, reports, say)
    summary = {"model_url": model_url, "reports": reports, "seconds": round(time.time() - started, 1)}
    say("\n".join(["", "verdicts:", *[f"  {v}" for v in verdicts]]))
    say(json.dumps(summary, indent=1))
    print(model_url)
    return summary


def _print_reports(store, reports: list[str], say) -> None:
    """Per report: one line from its `summary`, then mean ± SE and novelties per label."""
    for gi, url in enumerate(reports):
        key = url[len(store.url) + 1 :] if url.startswith(store.url) else url
        report = store.read_json(f"{key}/report.json")
        say(f"\nreport {url}/report.md")
        say(f"  group {gi}: {_summary_line(report.get('summary') or {})}")
        labels = (report.get("statistics") or {}).get("labels") or []
        metric = report.get("primary", {}).get("metric", "")
        say(f"  {'label':28s} {'n':>3s} {metric + ' ± SE':>34s} {'novelty':>9s} {'functional':>10s}")
        for x in labels:
            mean = f"{_f(x.get('mean'))} ± {_f(x.get('se'))}"
            novelty, functional = _f(x.get("novelty")), _f(x.get("functional_novelty"))
            say(f"  {x['label']:28s} {x['samples']:>3d} {mean:>34s} {novelty:>9s} {functional:>10s}")


def _summary_line(s: dict) -> str:
    """One line from report.json's `summary`."""
    if not s.get("best_candidate"):
        return "no statistics (lm-eval did not run)"
    margin = (
        "" if s.get("margin") is None else f", margin {s['margin']:+.2e} ± {s['margin_se']:.1e} over {s['bound_by']}"
    )
    return (
        f"best {s['best_candidate']}: {s['verdict']}{margin}; functionally {s.get('functional_verdict')} "
        f"({s['samples']} samples/label, {s['text_bytes']} bytes)"
    )


def _f(x) -> str:
    return "-" if x is None else f"{x:.4g}" if abs(x) < 1e-3 else f"{x:.4f}"


class _bar:
    """A rich progress bar when a console is given (else silent)."""

    def __init__(self, console, what: str, total: int):
        self.console, self.what, self.total = console, what, total

    def __enter__(self):
        if self.console is None or not self.console.is_terminal:
            return lambda done, note: None
        from rich.progress import Progress

        self.progress = Progress(console=self.console, transient=True)
        self.progress.start()
        task = self.progress.add_task(self.what, total=self.total)
        return lambda done, note: self.progress.update(task, completed=done, description=f"{self.what} {note}")

    def __exit__(self, *exc):
        if hasattr(self, "progress"):
            self.progress.stop()
        return False
