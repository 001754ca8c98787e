"""The science bench: is a generator label beyond every baseline where generation could matter?

    .venv/bin/python bench/science.py [--quick] [--out DIR] [--results FILE] [--device cpu|cuda]
                                      [--settings finetune independent] [--zoo-seeds 0 1 2]

The judged label is fixed here, before any run: JUDGED (below). Nothing in this script or in
the vetting it calls is tuned to it.

Settings, each with 3 zoo seeds (a zoo seed changes the slices and the fine-tunes' seeds):
(a) `finetune`: the demo's family (`weightsmith.demo.family`): K = 6 fine-tunes of one MLP
    block (and its LayerNorm) of the demo's base model, each on one standard-library package,
    built into a zoo with the base (so the merge baselines apply); 2 more fine-tunes, on two
    other packages, are the gold reference. Scored on equal bytes of held-out files of all 8.
(b) `independent`: K = 6 runs of the same block from independent random initialisations (the
    rest of the base frozen), aligned by permutation of the MLP's hidden units; 2 more runs are
    the gold reference (aligned to the zoo's member 0). Scored on the base model's held-out text.

Per setting and zoo seed the pipeline (`weightsmith.pipeline.run_pipeline`, no Prefect) fits
each generator once per fit seed (3), draws samples from each, and scores every label of the
report (generators, every registered baseline with its sweeps, noise at matched radii, the gold
row) on the whole held-out text with the paired bootstrap of `weightsmith.vet.statistics`.

The goal (issue 16), stated before the run: JUDGED, with its SE pooled over fits, beats every
qualifying baseline (merges included) by more than 2 SE each, at equal or greater functional
novelty (the report's `functional_beyond`: qualifying baselines are those whose mean functional
novelty is at least 0.95x the label's), in at least 2 of the 3 zoo seeds of a setting. The
weight-novelty verdict (`beyond`) is reported beside it.

`--quick` (CPU, within 60 minutes on 2 cores; the setting SCIENCE.md records for this machine):
fewer samples per label, shorter fine-tunes and the judged generator only. The full setting
(at least 32 samples per label, both generators, longer runs) is meant for a GPU.
The output is bench/SCIENCE.md (--results) and, per run, its report.json under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

JUDGED = "zoo-diffusion"  # the generator label that is judged: fixed before the run

SETTINGS = {
    # smoke: the tiny base, for the test that runs this script end to end (no science in it)
    "smoke": {
        "base": "tiny",
        "family": {
            "finetune": {"members": 3, "gold": 2, "steps": 10, "per_slice": 500},
            "independent": {"members": 3, "gold": 2, "steps": 10, "lr": 3e-3, "per_slice": 500},
        },
        "generators": (JUDGED,),
        "fit_seeds": (0, 1),
        "samples": 2,
        "generator_config": {JUDGED: {"ae_steps": 20, "ae_min_steps": 10, "ddpm_steps": 20, "ddpm_min_steps": 10}},
    },
    # quick: CPU within 60 minutes (2 cores)
    "quick": {
        "base": "full",
        "family": {
            "finetune": {"members": 6, "gold": 2, "steps": 100, "lr": 1e-3, "per_slice": 2_000},
            "independent": {"members": 6, "gold": 2, "steps": 150, "lr": 3e-3, "per_slice": 2_000},
        },
        "generators": (JUDGED,),
        "fit_seeds": (0, 1, 2),
        "samples": 8,  # per fit for generators (3 fits: 24 per label), per label for baselines
        "generator_config": {JUDGED: {"ae_steps": 600, "ddpm_steps": 1200}},
    },
    # full: a GPU (or a long CPU run)
    "full": {
        "base": "full",
        "family": {
            "finetune": {"members": 6, "gold": 2, "steps": 200, "lr": 1e-3, "per_slice": 10_000},
            "independent": {"members": 6, "gold": 2, "steps": 400, "lr": 3e-3, "per_slice": 10_000},
        },
        "generators": (JUDGED, "tile-diffusion"),
        "fit_seeds": (0, 1, 2),
        "samples": 32,
        "generator_config": {
            JUDGED: {"ae_steps": 1000, "ddpm_steps": 2000},
            "tile-diffusion": {"ae_train_steps": 120, "unet_train_steps": 240, "batch_size": 32},
        },
    },
}


def run_setting(kind: str, zoo_seed: int, plan: dict, store: str, base: Path, device: str, log) -> dict:
    """One family and one pipeline run; returns the rows SCIENCE.md needs."""
    from weightsmith.demo.family import FamilyPlan, build_family
    from weightsmith.pipeline import run_pipeline
    from weightsmith.store import Store

    started = time.time()
    family = build_family(store, base, FamilyPlan(kind=kind, **plan["family"][kind]), zoo_seed, images="none")
    made = time.time()
    options = family.pipeline_options(
        store,
        base.name,
        images="none",
        generators=plan["generators"],
        generator_config=plan["generator_config"],
        samples=plan["samples"],
        fit_seeds=plan["fit_seeds"],
        device=device,
    )
    result = run_pipeline(str(base), options, say=lambda m: log(f"    {m}"))
    store_obj = Store(store)
    url = result.reports[0]
    key = url[len(store_obj.url) + 1 :] if url.startswith(store_obj.url) else url
    report = store_obj.read_json(f"{key}/report.json")
    stats = report["statistics"]
    decision = next(d for d in stats["decisions"] if d["label"] == JUDGED)
    return {
        "kind": kind,
        "zoo_seed": zoo_seed,
        "block": family.block,
        "cost": family.costs[family.block],
        "slices": list(family.slices),
        "zoo": family.zoo,
        "report": url,
        "text_bytes": report["summary"]["text_bytes"],
        "labels": stats["labels"],
        "decision": decision,
        "seconds_family": round(made - started, 1),
        "seconds_pipeline": round(time.time() - made, 1),
    }


def _f(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if abs(x) >= 1e-3 else f"{x:.2e}"


def write_markdown(path: Path, runs: list[dict], meta: dict) -> None:
    lines = [
        "# The science bench (issue 16)",
        "",
        f"`{meta['command']}`, {meta['date']}, on {meta['machine']}; {meta['minutes']:.1f} minutes in all.",
        f"Setting: **{meta['setting']}** ({meta['setting_note']}).",
        "",
        f"Judged label (fixed in bench/science.py before the run): **{JUDGED}**. Goal: beyond every",
        "qualifying baseline by more than 2 SE each at equal or greater functional novelty",
        "(`functional_beyond`), in at least 2 of 3 zoo seeds of a setting.",
        "",
        "## Verdicts",
        "",
        "| setting | zoo seed | block (Gaussian cost) | JUDGED mean ± SE | novelty | functional | gold mean ± SE "
        "| gold novelty | gold functional | beyond (weights) | functional_beyond | functional margin ± SE (bound by) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goal = {}
    for r in runs:
        stats = {x["label"]: x for x in r["labels"]}
        j, g, d = stats[JUDGED], stats.get("gold", {}), r["decision"]
        fb = d["functional_verdict"] == "beyond"
        goal.setdefault(r["kind"], []).append(fb)
        lines.append(
            f"| {r['kind']} | {r['zoo_seed']} | {r['block']} ({r['cost']:.3f}) | {_f(j['mean'])} ± {_f(j['se'])} "
            f"| {_f(j['novelty'])} | {_f(j['functional_novelty'])} | {_f(g.get('mean'))} ± {_f(g.get('se'))} "
            f"| {_f(g.get('novelty'))} | {_f(g.get('functional_novelty'))} | {d['verdict']} "
            f"| {d['functional_verdict']} "
            f"| {_f(d.get('functional_margin'))} ± {_f(d.get('functional_margin_se'))} "
            f"({d.get('functional_bound_by') or '–'}) |"
        )
    lines += ["", "Goal per setting:"]
    for kind, flags in goal.items():
        met = sum(flags) >= 2 and len(flags) >= 3
        lines.append(
            f"- {kind}: functional_beyond in {sum(flags)} of {len(flags)} zoo seeds: goal {'MET' if met else 'NOT met'}"
        )
    lines += ["", "## Every label, per setting and zoo seed", ""]
    for r in runs:
        lines += [
            f"### {r['kind']}, zoo seed {r['zoo_seed']}",
            "",
            f"Zoo `{r['zoo']}`; slices {', '.join(r['slices'])}; {r['text_bytes']} bytes of held-out text; "
            f"family {r['seconds_family']} s, pipeline {r['seconds_pipeline']} s. NLL in nats/byte; SE from the "
            "paired bootstrap (fits and samples resampled); ensemble: NLL of the mean probabilities of "
            "min(8, samples) samples.",
            "",
            "| label | kind | samples | fits | mean ± SE | ensemble | weight novelty | functional novelty |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for x in r["labels"]:
            lines.append(
                f"| {x['label']} | {x['kind']} | {x['samples']} | {x.get('fits', 1)} | {_f(x['mean'])} ± {_f(x['se'])} "
                f"| {_f(x.get('ensemble'))} | {_f(x.get('novelty'))} | {_f(x.get('functional_novelty'))} |"
            )
        d = r["decision"]
        lines += [
            "",
            f"{JUDGED}: {d['verdict']} by weight novelty (margin {_f(d.get('margin'))} ± {_f(d.get('margin_se'))}, "
            f"bound by {d.get('bound_by')}); functionally {d['functional_verdict']} (margin "
            f"{_f(d.get('functional_margin'))} ± {_f(d.get('functional_margin_se'))}, bound by "
            f"{d.get('functional_bound_by')}).",
            "",
        ]
    lines += meta.get("discussion", [])
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the CPU setting (within 60 minutes on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="a tiny run that only checks the script works")
    ap.add_argument("--out", type=Path, default=Path("bench/out/science"))
    ap.add_argument("--results", type=Path, default=None, help="markdown output (default: --out/SCIENCE.md)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--settings", nargs="+", default=["finetune", "independent"], choices=["finetune", "independent"])
    ap.add_argument("--zoo-seeds", nargs="+", type=int, default=[0, 1, 2])
    args = ap.parse_args()
    setting = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = SETTINGS[setting]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["WEIGHTSMITH_HOME"] = str((args.out / "home").absolute())  # models, zoos, cache: all under --out
    import torch

    from weightsmith import state
    from weightsmith.demo.train import SPECS, train_lm

    state.configure_prefect()
    torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    base = state.cache_dir() / f"demo-base-{plan['base']}"
    log(f"base model ({base})")
    train_lm(base, SPECS[plan["base"]])
    store = str(state.home() / "store")
    runs = []
    for kind in args.settings:
        for zs in args.zoo_seeds:
            log(f"{kind}, zoo seed {zs}")
            torch.set_num_threads(min(4, len(os.sched_getaffinity(0))))
            r = run_setting(kind, zs, plan, store, base, args.device, log)
            runs.append(r)
            d = r["decision"]
            log(f"  {JUDGED}: {d['verdict']}; functionally {d['functional_verdict']}")
            (args.out / "science.json").write_text(json.dumps(runs, indent=1))
    minutes = (time.time() - t0) / 60
    m = c.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = {
        "command": "bench/science.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{m['cpu']}, {m['usable_cores']} usable cores, GPU: {gpu or 'none'}, device {args.device}",
        "minutes": minutes,
        "setting": setting,
        "setting_note": json.dumps({k: v for k, v in plan.items() if k != "generator_config"}),
        "judged": JUDGED,
    }
    write_markdown(args.results or args.out / "SCIENCE.md", runs, meta)
    log(f"done in {minutes:.1f} min: {args.results or args.out / 'SCIENCE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
