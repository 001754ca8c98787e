"""Quality of the data-sized fit budgets: new defaults against the previous fixed-step ones.

    .venv/bin/python bench/quality.py [--control] [--samples 8] [--home DIR] [--generators ...]
                                      [--new-config JSON] [--json FILE]

Issue 15 changed how the generators that train spend their steps (budgets that follow the
data, early stopping at a validation plateau, small same-role tensors packed). This checks
that quality held, on the demo's trained model and zoo (`weightsmith demo --size full`: the
base model, its chosen MLP block and the zoo of K = 6 fine-tunes, built or reused under
--home, by default the demo benchmark's state), with the demo's text and joint fits:

- for each generator that trains, two labels: `new` (the library's defaults, or --new-config
  over them) and `previous` (`PREVIOUS_DEFAULTS`: every tensor alone, fixed steps, no early
  stop), each fitted once per seed in `FIT_SEEDS`, `--samples` samples per fit (at least 8);
  `--control` adds the previous defaults fitted on `CONTROL_SEEDS`, compared with `previous`
  (an A/A check that the SE covers fit-to-fit variation);
- all of them scored in one vetting report (`weightsmith.vetting.vet_group`: the same held-out
  text, the same evaluators), then for NLL per byte and the report's weight novelty of each
  sample: new - previous with a paired bootstrap SE (`paired`: fits, samples within fits and
  text blocks drawn once for both labels, since fit f and sample s of both used the same seeds).

Target (issue 15): both differences within 2 SE of zero, for every generator. Fit seconds and
steps are printed beside them (wall, on whatever else the machine runs). Nothing is asserted
and the exit status is 0 whether the targets pass or not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

GENERATORS = ("tile-diffusion", "zoo-diffusion")
SIGMAS = 2.0
FIT_SEEDS = (0, 1, 2)  # each label is fitted once per seed; the bootstrap resamples fits
CONTROL_SEEDS = (3, 4, 5)  # --control: the previous defaults fitted again on other seeds (an A/A check)


def label(generator: str, variant: str) -> str:
    return f"{generator} ({variant})"


def run(
    home: Path, samples: int, log, generators=GENERATORS, new_config: dict | None = None, control: bool = False
) -> dict:
    import numpy as np
    import torch

    from weightsmith import state
    from weightsmith.demo.family import FamilyPlan, build_family
    from weightsmith.demo.run import DEMO
    from weightsmith.demo.train import SPECS, train_lm
    from weightsmith.extract import ExtractOptions, extract
    from weightsmith.generators import registry
    from weightsmith.model import parse_model_url
    from weightsmith.pipeline import assemble_candidate, key_of, original_candidate
    from weightsmith.predict import PredictOptions, predict
    from weightsmith.vet import statistics as st
    from weightsmith.vetting import Run, vet_group

    os.environ["WEIGHTSMITH_HOME"] = str(home)
    state.configure_prefect()
    torch.set_num_threads(min(4, c.machine().get("usable_cores") or 1))
    base = state.cache_dir() / "demo-base-full"
    log(f"base model: {base}")
    train_lm(base, SPECS["full"])
    store = str(state.home() / "store")
    family = build_family(store, base, FamilyPlan(**DEMO["full"]["family"]), zoo_seed=0)
    options = family.pipeline_options(store, base.name, images="preview", samples=samples)
    model = parse_model_url(extract(str(base), ExtractOptions(store=store, name=base.name, images="preview")).model_url)
    log(f"group: block {family.block} {family.patterns}; zoo {family.zoo}")
    torch.set_num_threads(1)

    variants = [("new", None, FIT_SEEDS), ("previous", "previous", FIT_SEEDS)]
    if control:
        variants.append(("previous, other seeds", "previous", CONTROL_SEEDS))
    runs, fits, pred_ids = [], {}, {}
    for generator in generators:
        config_cls = registry.get(generator).Config
        for variant, defaults, seeds in variants:
            lab = label(generator, variant)
            base_config = c.PREVIOUS_DEFAULTS[generator] if defaults else (new_config or {}).get(generator, {})
            for fit, seed in enumerate(seeds):
                config = {**base_config, "seed": seed}
                resolved = config_cls(**config).model_dump(mode="json")  # the defaults as they are now
                digest = hashlib.sha256(json.dumps([resolved, defaults], sort_keys=True).encode()).hexdigest()[:10]
                pred_id = f"quality-{generator}-{defaults or 'new'}-{digest}"
                pred_ids.setdefault(lab, []).append(pred_id)
                t0 = time.perf_counter()
                if not model.store.exists(model.key("predictions", pred_id, "prediction.json")):
                    predict(
                        model.url,
                        PredictOptions(
                            layer=family.patterns,
                            generator=generator,
                            config=config,
                            samples=samples,
                            zoo=family.zoo,
                            joint=True,
                            images="preview",
                            device="cpu",
                            pack_bytes=0 if defaults else PredictOptions.model_fields["pack_bytes"].default,
                            run_id=pred_id,
                        ),
                    )
                    fits.setdefault(lab, []).append(time.perf_counter() - t0)
                log(f"predicted {lab}, seed {seed} ({pred_id}) in {time.perf_counter() - t0:.0f}s")
                for s in range(samples):
                    assemble_candidate(model, pred_id, s)
                runs.append(Run(lab, generator, "candidate", config, pred_id, samples, fit))
    vetted = vet_group(
        model, "quality", key_of(model, original_candidate(model, "quality")), runs, options, lambda m: log(f"  {m}")
    )
    key = vetted.url[len(model.store.url) + 1 :]
    report = model.store.read_json(f"{key}/report.json")
    logprobs = np.load(model.store.path(f"{key}/logprobs.npy"))  # a local store (--home)
    token_bytes = np.load(model.store.path(f"{key}/token_bytes.npy"))
    rows = report["token_logprobs"]["rows"]
    blocks = st.Blocks.of(token_bytes)
    novelty = {p["id"]: p["novelty"] for p in report["frontier"]["points"]}
    out = {
        "report": vetted.url,
        "samples": samples,
        "fit_seeds": list(FIT_SEEDS),
        "text_bytes": float(token_bytes.sum()),
        "generators": {},
    }
    for generator in generators:
        res = out["generators"][generator] = {"comparisons": {}}
        labs = [label(generator, v) for v, _, _ in variants]
        fits_of = {lab: len(pred_ids[lab]) for lab in labs}
        # (fits, samples, blocks) NLL per block and (fits, samples) novelty of each label
        ids = {lab: [f"{lab}#{i}" for i in range(fits_of[lab] * samples)] for lab in labs}
        nll = {
            lab: blocks.sums(np.stack([logprobs[rows.index(i)] for i in ids[lab]])).reshape(fits_of[lab], samples, -1)
            for lab in labs
        }
        nov = {lab: np.array([novelty[i] for i in ids[lab]]).reshape(fits_of[lab], samples, 1) for lab in labs}
        for other in labs[1:]:
            new = labs[0] if other == labs[1] else labs[1]  # new vs previous; previous vs its control
            res["comparisons"][f"{new} - {other}"] = {
                "nll": paired(nll[new], nll[other], blocks.bytes),
                "novelty": paired(nov[new], nov[other], np.ones(1)),
            }
        res["fit_seconds"] = {lab: fits.get(lab) for lab in labs}
        res["steps"] = {lab: _steps(model, pred_ids[lab]) for lab in labs}
    return out


def paired(a, b, weights) -> dict:
    """Mean difference a - b and its SE by a paired bootstrap.

    a, b: (fits, samples, blocks) per-block values of two labels whose fit f and sample s were
    made with the same seeds (fit seed f, sample noise s); `weights` (blocks,): bytes per block
    (one block of weight 1 for a per-sample value). Each replicate draws the fits with
    replacement, then the samples within each drawn fit, then the blocks (`REPLICATES`, seeded),
    the same draws for both labels; a label's value is sum(values) / sum(weights) over the draw.
    Unlike `statistics.bootstrap` (labels of different generators: only the text blocks are
    shared), the fits and samples are paired too.
    """
    import numpy as np

    from weightsmith.vet import statistics as st

    rng = np.random.default_rng(st.SEED)
    f, s, k = a.shape
    w = np.asarray(weights, dtype=np.float64)

    def value(x, fi, si, bw):  # (fits, samples, blocks) -> the drawn mean per unit weight
        drawn = x[fi[:, None], si]  # (f, s, blocks)
        return float((drawn @ bw).sum() / (bw @ w) / (f * s))

    reps = []
    for _ in range(st.REPLICATES):
        fi = rng.integers(0, f, f)
        si = rng.integers(0, s, (f, s))
        bw = rng.multinomial(k, np.full(k, 1.0 / k)).astype(np.float64) if k > 1 else np.ones(1)
        reps.append(value(a, fi, si, bw) - value(b, fi, si, bw))
    ma, mb = (float(x.sum() / (w.sum() * f * s)) for x in (a, b))
    return {"a": ma, "b": mb, "d": ma - mb, "se": float(np.std(reps, ddof=1))}


def _steps(model, pred_ids: list[str]) -> dict:
    """Steps taken and planned per network, summed over the fits of a label's prediction runs."""
    from weightsmith.generators import state_from_bytes

    totals: dict[str, list[int]] = {}
    for pred_id in pred_ids:
        facts = model.store.read_json(model.key("predictions", pred_id, "prediction.json"))
        for key in sorted({e["generator_state"] for e in facts["tensors"].values()}):
            info = state_from_bytes(model.store.read_bytes(key)).info
            for net in ("ae_fit", "unet_fit", "ddpm_fit"):
                if net in info:
                    t = totals.setdefault(net, [0, 0, 0])
                    t[0] += info[net]["steps"]
                    t[1] += info[net]["budget"]
                    t[2] += 1
    return {net: f"{s}/{b} steps in {n} fits" for net, (s, b, n) in totals.items()}


def _se_units(d: float, se: float) -> float:
    """d / se; with se 0 (every replicate gave the same difference), 0 for no difference at all
    (the same samples under both labels) and +-inf for any other."""
    if se:
        return d / se
    return 0.0 if d == 0 else math.copysign(math.inf, d)


def print_results(res: dict) -> None:
    rows, checks = [], []
    for r in res["generators"].values():
        for pair, metrics in r["comparisons"].items():
            for metric, m in metrics.items():
                z = _se_units(m["d"], m["se"])
                rows.append(
                    [pair, metric, f"{m['a']:.5f}", f"{m['b']:.5f}", f"{m['d']:+.5f}", f"{m['se']:.5f}", f"{z:+.1f}"]
                )
                checks.append(
                    f"{'PASS' if abs(z) <= SIGMAS else 'FAIL'}  {pair}: {metric} within {SIGMAS:g} paired SE: "
                    f"{m['d']:+.5f} ± {m['se']:.5f} ({z:+.1f} SE)"
                )
    print(c.table(["labels a - b", "metric", "a", "b", "a - b", "paired SE", "SE units"], rows))
    for r in res["generators"].values():
        for lab, seconds in r["fit_seconds"].items():
            wall = "reused" if not seconds else "fit + sample " + " ".join(f"{x:.0f}s" for x in seconds)
            print(f"{lab}: {wall}; {', '.join(f'{n} {t}' for n, t in r['steps'][lab].items())}")
    print(
        f"{res['samples']} samples per fit, fit seeds {res['fit_seeds']}; "
        f"{res['text_bytes']:.0f} bytes of text; {res['report']}"
    )
    print("\n== targets (new against previous; a control row is the previous defaults against themselves)")
    for line in checks:
        print(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=8, help="samples per label (default: 8)")
    p.add_argument(
        "--home",
        type=Path,
        default=c.DEFAULT_OUT / "demo-home-full",
        help="state folder: the demo's base, family and store (default: bench/out/demo-home-full, bench/demo.py's)",
    )
    p.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=GENERATORS)
    p.add_argument(
        "--new-config", type=json.loads, default=None, help="JSON: options per generator over the new defaults"
    )
    p.add_argument(
        "--control", action="store_true", help="also fit the previous defaults on other seeds (an A/A check of the SE)"
    )
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = p.parse_args(argv)
    print(c.describe(c.machine(), c.disk(args.home.parent if not args.home.exists() else args.home)))
    print(f"before: {c.load()}", flush=True)
    t0 = time.time()
    say = lambda m: print(f"[{time.time() - t0:6.0f}s] {m}", flush=True)  # noqa: E731
    res = run(args.home.resolve(), args.samples, say, tuple(args.generators), args.new_config, args.control)
    print(f"after: {c.load()}\n")
    print_results(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    print(f"benchmark took {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
