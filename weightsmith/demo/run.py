"""The main job (`weightsmith demo`, `make demo`), offline, on the embedded default.

1. Train a small GPT-2-architecture model (byte-level vocabulary of 256) on Python's standard
   library sources to a plateau: the base model; cached in the state folder.
2. Choose the predicted group: one MLP block and its LayerNorm, where replacing the weights by
   Gaussian draws of their own statistics costs at least 0.05 nats/byte of held-out NLL.
3. Make a family of that group (`weightsmith.demo.family`): K fine-tunes of the base, each on
   one slice of the standard library (the files of one package), and 2 more kept out as the gold
   reference; all extracted into the store, the K built into a zoo with the base model.
4. Run the pipeline on it (extract -> zoo-diffusion, tile-diffusion and every baseline fitted
   on the zoo -> assemble -> vet on equal bytes of held-out text from each slice; the gold
   fine-tunes scored as the `gold` row) and print the report.
`--size tiny` runs the same steps on a smaller model in about two minutes.
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


# Per demo size: the family (see weightsmith.demo.family.FamilyPlan) and the generators' options.
DEMO = {
    "tiny": {
        "family": {"members": 4, "gold": 2, "steps": 30, "per_slice": 1_000},
        "samples": 4,  # per label (deterministic baselines: 1); the ensemble NLL uses M = 4
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
        # K = 6 fine-tunes of 100 steps and 2 gold; 2 kB of held-out text per slice (16 kB scored;
        # benchmarks score more). Sized for a first run under 12 min on 2 cores (bench/demo.py).
        "family": {"members": 6, "gold": 2, "steps": 100, "per_slice": 2_000},
        "samples": 4,
        "generator_config": {
            "zoo-diffusion": {"ae_steps": 600, "ddpm_steps": 1200},
            "tile-diffusion": {"ae_train_steps": 120, "unet_train_steps": 240, "batch_size": 32},
        },
    },
}


def run_demo(store: str, size: str = "full", console=None, runner: PipelineRunner | None = None) -> dict:
    """Train (once), make the family (once), run the pipeline, print the report; returns a summary.

    `runner(source, options)` runs the pipeline: the library's `run_pipeline` by default (no
    Prefect); the CLI passes one that runs the `weightsmith-pipeline` flow.
    """
    import torch
    from transformers.utils import logging as hf_logging

    from weightsmith.demo.family import FamilyPlan, build_family
    from weightsmith.demo.train import SPECS, train_lm
    from weightsmith.errors import WeightsmithError
    from weightsmith.pipeline import run_pipeline
    from weightsmith.store import Store

    if size not in DEMO:
        raise WeightsmithError("--size", f"unknown size {size!r} (choose from {', '.join(DEMO)})")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # Training and fine-tuning run alone: up to 4 threads (2 threads: 1.6x faster per step than 1 here).
    # The pipeline runs its tasks in parallel threads: one torch thread each, or OpenMP
    # oversubscribes the cores (measured 5-20x slower for these small models).
    torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
    say = console.print if console is not None else print
    started = time.time()
    spec, plan = SPECS[size], DEMO[size]

    folder = state.cache_dir() / f"demo-base-{size}"
    say(f"1/4 base model: GPT-2 architecture, {spec.layers} layers x {spec.width}, bytes as tokens")
    with _bar(console, "train", spec.max_steps) as advance:
        facts = train_lm(folder, spec, progress=lambda step, total, nll: advance(step, f"held-out {nll:.3f} nats/byte"))
    say(
        f"    {facts['steps']} steps, held-out NLL {facts['heldout_nll_per_byte']:.3f} nats/byte "
        f"({'plateau' if facts.get('plateau') else 'step cap'}); cached in {folder}"
    )
    Store(store).check_writable()
    family_plan = FamilyPlan(**plan["family"])
    total = family_plan.members + family_plan.gold
    say(
        f"2/4 family: {family_plan.members} fine-tunes of one MLP block for the zoo + {family_plan.gold} gold, "
        f"{family_plan.steps} steps each, one standard-library package each"
    )
    with _bar(console, "fine-tune", total) as advance:
        family = build_family(store, folder, family_plan, zoo_seed=0, progress=lambda k, n: advance(k, ""))
    cost = family.costs[family.block]
    say(
        f"3/4 group: block {family.block} ({', '.join(family.patterns)}); Gaussian replacement costs "
        f"{cost:.3f} nats/byte; zoo {family.zoo} ({', '.join(family.slices[: family_plan.members])}), "
        f"gold {', '.join(family.slices[family_plan.members :])}"
    )

    torch.set_num_threads(1)
    say("4/4 pipeline: extract -> zoo-diffusion, tile-diffusion and baselines -> assemble -> vet")
    options = family.pipeline_options(
        store,
        folder.name,
        images="preview",
        generators=("zoo-diffusion", "tile-diffusion"),
        generator_config=plan["generator_config"],
        samples=plan["samples"],
    )
    runner = runner or (lambda source, opts: run_pipeline(source, opts, say=lambda m: None))
    result = runner(str(folder), options)
    model_url, reports, verdicts = result.model_url, result.reports, result.summary
    _print_reports(Store(store), reports, say)
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
        say(f"  {'label':32s} {'n':>3s} {metric + ' ± SE':>34s} {'novelty':>9s} {'functional':>10s}")
        for x in labels:
            mean = f"{_f(x.get('mean'))} ± {_f(x.get('se'))}"
            novelty, functional = _f(x.get("novelty")), _f(x.get("functional_novelty"))
            say(f"  {x['label']:32s} {x['samples']:>3d} {mean:>34s} {novelty:>9s} {functional:>10s}")


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
