"""Benchmark: generated float32 bytes per second of tile-diffusion and zoo-diffusion vs. img2img.

    .venv/bin/python bench/predict.py [--quick] [--device cpu|cuda] [--sizes 512 2000]
                                      [--out DIR] [--json FILE]
    .venv/bin/python bench/predict.py --whole-model [--out DIR] [--json FILE]

`--whole-model` (see `whole_model`) instead predicts every tensor of the demo's tiny trained
model with each generator that trains, as `weightsmith predict` now does it (budgets that
follow the data, early stopping, small same-role tensors packed, fits fanned out), and
compares seconds per MB and per tensor, fit and sample apart, with the previous per-tensor
defaults timed on a fixed sample of tensors and extrapolated to the whole model.

All three generators draw whole tensors of the same shape (float32, so the same bytes per
sample) on the same device, in one run:

- img2img:        `weightsmith.generators.img2img` with a pipeline of Stable Diffusion 1.5's
                  architecture and sizes (random init from `build_sd15_like`: the real model's
                  compute), 512 x 512 pixel tiles, steps 3 at strength 1.0, so int(3 * 1.0) = 3
                  denoising steps run per tile, plus the text encoder and the VAE;
- tile-diffusion: fitted (small config) on one "real-ish" tensor, then sampling whole tensors;
- zoo-diffusion:  fitted on a zoo of K = 64 checkpoints (the same real-ish base plus a low-rank
                  random walk), then sampling n = 64 tensors in one batch.

Each generator runs in a fresh child process that fits (timed, reported apart), loads and
warms up untimed, then times `Generator.sample` alone: throughput = samples x tensor bytes /
sample seconds. The ratio to img2img is the point. Targets: zoo-diffusion >= 1000x and
tile-diffusion >= 10x img2img's bytes per second. This checks speed only; the quality of the
samples (held-out loss of the assembled model, novelty) is in the demo's vetting report.

The Stable-Diffusion-sized pipeline (about 4.3 GB of float32) is built once, in about a
minute, into --out/sd15 (git-ignored); img2img is skipped with a note when the disk has less
than 6 GB free for it. On CPU, one 512 x 512 img2img sample takes 40-60 s on 2 cores.
`--device cuda` (when CUDA is available) also runs 2000 x 2000 tensors. Nothing here asserts
wall time, and the exit status is 0 whether the targets pass or not.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c  # noqa: E402

SCRIPT = Path(__file__).resolve()
SD15_BYTES = 4_400 * c.MB  # the built pipeline on disk (float32)
SD15_NEED_FREE = 6_000 * c.MB  # skip img2img below this much free disk (when not built yet)
TARGETS = {"zoo-diffusion": 1000.0, "tile-diffusion": 10.0}  # x img2img bytes per second
ZOO_K = 64
IMG2IMG = {"steps": 3, "strength": 1.0, "image_size": 512, "batch_size": 8, "dtype": "float32"}
# fits: (default, --quick); tile-diffusion's default is the full demo's config
TILE_FIT = (
    {"ae_train_steps": 120, "unet_train_steps": 240, "batch_size": 32},
    {"ae_train_steps": 30, "unet_train_steps": 60, "batch_size": 16},
)
ZOO_FIT = ({"ae_steps": 600, "ddpm_steps": 1200}, {"ae_steps": 150, "ddpm_steps": 300})
# n drawn by the timed call on CPU; on a GPU img2img and tile-diffusion draw 4x as many
SAMPLES = {"img2img": 1, "tile-diffusion": 4, "zoo-diffusion": 64}
METHODS = ("img2img", "tile-diffusion", "zoo-diffusion")


# ---------------------------------------------------------------------------------------------
# data: deterministic from the seed, so every child builds the same tensors
def realish(rows: int, cols: int, seed: int = 0):
    """A tensor with the structure of a trained weight matrix (float32, std 0.02).

    Low rank with a power-law spectrum, heavy-tailed (Student t, 4 dof) noise, and per-row and
    per-column scales, as trained linear layers show.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    rank = max(1, min(rows, cols) // 8)
    spectrum = np.arange(1, rank + 1) ** -0.7
    u = rng.standard_normal((rows, rank), dtype=np.float32) * spectrum.astype(np.float32)
    v = rng.standard_normal((rank, cols), dtype=np.float32)
    w = (u @ v) / math.sqrt(float((spectrum**2).sum()))
    w += 0.5 * rng.standard_t(4, (rows, cols)).astype(np.float32)
    w *= np.exp(0.3 * rng.standard_normal((rows, 1))).astype(np.float32)
    w *= np.exp(0.2 * rng.standard_normal((1, cols))).astype(np.float32)
    return (w * (0.02 / w.std())).astype(np.float32)


def zoo(rows: int, cols: int, k: int = ZOO_K, seed: int = 0, rank: int = 8):
    """(k, rows, cols): the real-ish base plus a rank-`rank` random walk, plus a little noise.

    Checkpoint j is base + U C_j V with U (rows, r) and V (r, cols) fixed and C_j (r, r) a
    Gaussian random walk; each step moves the weights by about 2% of their std, and iid noise
    of 0.5% of it is added, like a zoo of checkpoints saved along one training run.
    """
    import numpy as np

    base = realish(rows, cols, seed)
    scale = float(base.std())
    rng = np.random.default_rng(seed + 1)
    u = rng.standard_normal((rows, rank), dtype=np.float32) / math.sqrt(rank)
    v = rng.standard_normal((rank, cols), dtype=np.float32) / math.sqrt(rank)
    walk = np.zeros((rank, rank), dtype=np.float32)
    out = np.empty((k, rows, cols), dtype=np.float32)
    for j in range(k):
        walk += rng.standard_normal((rank, rank), dtype=np.float32) * (0.02 * scale)
        out[j] = base + u @ walk @ v
        out[j] += rng.standard_normal((rows, cols), dtype=np.float32) * (0.005 * scale)
    return out


# ---------------------------------------------------------------------------------------------
# the child side
def child(spec: dict) -> None:
    import numpy as np
    import torch

    from weightsmith.generators.base import Examples, SampleSpec
    from weightsmith.generators.registry import get
    from weightsmith.generators.zoo_diffusion import _CPU_THREADS

    method, size, device, n = spec["method"], spec["size"], spec["device"], spec["n"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    shape = (size, size)
    config = spec["config"]
    values = zoo(size, size) if method == "zoo-diffusion" else realish(size, size)[None]
    examples = Examples("bench.weight", values)
    gen = get(method)(device=device)
    rss_start, cpu_start = c.peak_rss(), c.cpu_seconds()

    t0 = time.perf_counter()
    state = gen.fit(examples, config)
    fit_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()  # untimed: load the pipeline (img2img) or run a warm-up sample
    if method == "img2img":
        gen._pipeline(config["model_dir"], config.get("dtype", "float32"), device)
    if spec.get("warmup"):
        gen.sample(state, 1, SampleSpec(shape), seed=12345)
    prepare_seconds = time.perf_counter() - t0

    cpu_sample = c.cpu_seconds()
    t0 = time.perf_counter()
    result = gen.sample(state, n, SampleSpec(shape), seed=1)
    seconds = time.perf_counter() - t0
    cpu_sample = c.cpu_seconds() - cpu_sample

    samples = np.stack(result.arrays)
    ref = values.reshape(-1, *shape)
    c.report_child(
        seconds,
        rss_start,
        cpu_start,
        sample_cpu_seconds=cpu_sample,
        fit_seconds=fit_seconds,
        prepare_seconds=prepare_seconds,
        n=n,
        bytes=int(samples.nbytes),
        devices=sorted(set(result.devices)),
        threads=_CPU_THREADS
        if method == "zoo-diffusion" and torch.device(device).type == "cpu"
        else torch.get_num_threads(),
        finite=bool(np.isfinite(samples).all()),
        std_ratio=float(samples.std() / ref.std()),
        # distance of each sample to its nearest example, relative to the examples' norm
        nearest=float(
            np.median([min(np.linalg.norm(s - r) for r in ref[:ZOO_K]) / np.linalg.norm(ref[0]) for s in samples[:8]])
        ),
    )


# ---------------------------------------------------------------------------------------------
# --whole-model: every tensor of the demo's tiny trained model
WHOLE_ZOO = {"checkpoints": 48, "every": 2}  # as the tiny demo's zoo, of every tensor
PREVIOUS = c.PREVIOUS_DEFAULTS  # every tensor alone, fixed steps, no early stop
# the fixed sample the previous defaults are timed on: a LayerNorm vector, a matrix, the largest
PREVIOUS_SAMPLE = ("transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight", "transformer.wte.weight")


def _all_cpu() -> float:
    """CPU seconds of this process and of its finished children (the fit worker processes)."""
    return c.cpu_seconds() + c.cpu_seconds(resource.RUSAGE_CHILDREN)


def whole_child(spec: dict) -> None:
    """Predict twice with the same options: fit + sample, then sample only (the states reused)."""
    import torch

    from weightsmith.generators import state_from_bytes
    from weightsmith.model import parse_model_url
    from weightsmith.predict import PredictOptions, predict

    torch.set_num_threads(spec["threads"])
    previous = spec["mode"] == "previous"
    options = PredictOptions(
        layer=tuple(spec["layer"]),
        generator=spec["method"],
        config=PREVIOUS[spec["method"]] if previous else spec.get("config", {}),
        zoo=spec["zoo"],
        images="none",
        device="cpu",
        pack_bytes=0 if previous else PredictOptions.model_fields["pack_bytes"].default,
        workers=1 if previous else 0,
        run_id=f"bench-{spec['mode']}-{spec['method']}-1",
    )
    rss_start, cpu_start = c.peak_rss(), c.cpu_seconds()
    t0, cpu0 = time.perf_counter(), _all_cpu()
    first = predict(spec["model_url"], options)
    both, both_cpu = time.perf_counter() - t0, _all_cpu() - cpu0
    t0, cpu0 = time.perf_counter(), _all_cpu()
    predict(spec["model_url"], options.model_copy(update={"run_id": options.run_id[:-1] + "2"}))
    sample, sample_cpu = time.perf_counter() - t0, _all_cpu() - cpu0
    model = parse_model_url(spec["model_url"])
    facts = model.store.read_json(model.key("predictions", first.run_id, "prediction.json"))
    keys = sorted({e["generator_state"] for e in facts["tensors"].values()})
    nets: dict[str, list] = {}
    for key in keys:
        info = state_from_bytes(model.store.read_bytes(key)).info
        for net in ("ae_fit", "unet_fit", "ddpm_fit"):
            if net in info:
                nets.setdefault(net, []).append((info[net]["steps"], info[net]["budget"], info[net]["stopped"]))
    c.report_child(
        both,
        rss_start,
        cpu_start,
        fit_seconds=both - sample,
        sample_seconds=sample,
        fit_cpu_seconds=both_cpu - sample_cpu,
        sample_cpu_seconds=sample_cpu,
        tensors=len(facts["tensors"]),
        bytes=sum(4 * math.prod(e["shape"]) for e in facts["tensors"].values()),
        fits=len(keys),
        nets={
            net: {
                "steps": sum(r[0] for r in rows),
                "budget": sum(r[1] for r in rows),
                "plateau": sum(r[2] == "plateau" for r in rows),
                "cap": sum(r[2] == "cap" for r in rows),
            }
            for net, rows in nets.items()
        },
    )


def whole_model(out: Path, new_config: dict | None = None, methods=("tile-diffusion", "zoo-diffusion")) -> dict:
    """Build (once) the demo's tiny trained model and a zoo of all its tensors, then time both ways.

    New: every tensor, the library's defaults (one worker per core). Previous: the fixed sample
    `PREVIOUS_SAMPLE`, one tensor at a time with the previous fixed steps, 1 torch thread (the
    setting the demo used, the faster one here under load); its per-tensor fit and sample times
    are extrapolated to every tensor (a fixed-step fit costs about the same per tensor here,
    whatever its size: that was the problem). Wall seconds; CPU seconds beside them.
    """
    import torch

    from weightsmith import state
    from weightsmith.demo.train import SPECS, collect_zoo, train_lm
    from weightsmith.extract import ExtractOptions, extract
    from weightsmith.store import Store
    from weightsmith.zoo import write_zoo

    folder = state.cache_dir() / "demo-base-tiny"  # where `weightsmith demo --size tiny` caches it
    cached = (folder / "model.safetensors").is_file()
    print(f"model:   the demo's tiny trained model, {folder} ({'cached' if cached else 'training it now'})", flush=True)
    torch.set_num_threads(min(4, c.machine().get("cores") or 1))
    train_lm(folder, SPECS["tiny"])
    root = out / "whole-model"
    c.remove(root)  # a fresh store: no state of an earlier run is reused
    url = extract(str(folder), ExtractOptions(store=str(root / "store"), images="none")).model_url
    zoo_id = "whole-k{checkpoints}".format(**WHOLE_ZOO)
    write_zoo(Store(str(root / "store")), zoo_id, collect_zoo(folder, ("*",), **WHOLE_ZOO))
    print(f"zoo:     {zoo_id}: {WHOLE_ZOO['checkpoints']} checkpoints of every tensor (continued training)\n")
    results: dict = {}
    for method in methods:
        zoo = zoo_id if method == "zoo-diffusion" else None
        runs = {}
        for mode, layer, threads in (("new", ["*"], 1), ("previous", list(PREVIOUS_SAMPLE), 1)):
            print(f"  {method} {mode} ...", end=" ", flush=True)
            spec = {"whole": True, "method": method, "mode": mode, "layer": layer, "zoo": zoo}
            if mode == "new" and new_config and method in new_config:
                spec["config"] = new_config[method]
            r = c.run_child(SCRIPT, {**spec, "model_url": url, "threads": threads}, timeout=7200)
            runs[mode] = r
            print(
                f"{r['tensors']} tensors, {r['fits']} fits in {r['fit_seconds']:.1f}s, sampled in "
                f"{r['sample_seconds']:.1f}s",
                flush=True,
            )
        results[method] = runs
    return results


def whole_table(results: dict) -> tuple[str, list[str]]:
    rows, lines = [], []
    for method, runs in results.items():
        new, old = runs["new"], runs["previous"]
        scale = new["tensors"] / old["tensors"]  # the previous defaults, extrapolated
        old_fit, old_sample = old["fit_seconds"] * scale, old["sample_seconds"] * scale
        for label, r, fit, sample, cpu in (
            ("new, measured", new, new["fit_seconds"], new["sample_seconds"], new["fit_cpu_seconds"]),
            ("previous, extrapolated", old, old_fit, old_sample, old["fit_cpu_seconds"] * scale),
        ):
            mb = new["bytes"] / c.MB
            rows.append(
                [
                    method,
                    label,
                    new["tensors"],
                    r["fits"] if r is new else f"{new['tensors']} ({old['tensors']} timed)",
                    f"{fit:.1f}",
                    f"{cpu:.1f}",
                    f"{sample:.1f}",
                    f"{fit / mb:.1f}",
                    f"{sample / mb:.1f}",
                    f"{fit / new['tensors']:.2f}",
                    f"{sample / new['tensors']:.2f}",
                ]
            )
        speedup = (old_fit + old_sample) / (new["fit_seconds"] + new["sample_seconds"])
        target = " (target >= 10x: " + ("PASS" if speedup >= 10 else "FAIL") + ")" if method == "tile-diffusion" else ""
        lines.append(
            f"{method}: whole model {new['fit_seconds'] + new['sample_seconds']:.0f}s vs previous defaults "
            f"{old_fit + old_sample:.0f}s (extrapolated from {old['tensors']} tensors): {speedup:.1f}x faster{target}; "
            f"fit CPU {old['fit_cpu_seconds'] * scale / max(new['fit_cpu_seconds'], 1e-3):.1f}x less; new fits: "
            + ", ".join(
                f"{n} {v['steps']}/{v['budget']} steps ({v['plateau']} plateau, {v['cap']} cap)"
                for n, v in new["nets"].items()
            )
        )
    headers = [
        "generator",
        "defaults",
        "tensors",
        "fits",
        "fit s",
        "fit CPU s",
        "sample s",
        "fit s/MB",
        "sample s/MB",
        "fit s/tensor",
        "sample s/tensor",
    ]
    return c.table(headers, rows, "llrrrrrrrrr"), lines


# ---------------------------------------------------------------------------------------------
# the parent side
def sd15_dir(out: Path) -> tuple[Path | None, str]:
    """The built SD-1.5-sized pipeline (built now if missing), or None and why not."""
    folder = out / "sd15"
    if (folder / "model_index.json").is_file() and (folder / "unet").is_dir():
        return folder, "cached"
    free = c.disk(out)["free_bytes"]
    if free < SD15_NEED_FREE:
        return None, (
            f"img2img SKIPPED: building the SD-1.5-sized pipeline needs ~"
            f"{SD15_NEED_FREE / 1e9:.0f} GB free disk, {free / 1e9:.1f} GB free at {out}"
        )
    partial = out / "sd15.partial"
    c.remove(partial)
    print(f"building {folder} (SD 1.5 architecture, random init, ~4.3 GB; cached) ...", flush=True)
    t0 = time.perf_counter()
    code = (
        "import sys; from pathlib import Path; "
        "from weightsmith.demo.tiny_pipelines import build_sd15_like; "
        "build_sd15_like(Path(sys.argv[1]))"
    )
    subprocess.run([sys.executable, "-c", code, str(partial)], check=True, cwd=c.ROOT)
    partial.rename(folder)
    return folder, f"built in {time.perf_counter() - t0:.0f}s"


def specs(size: int, device: str, quick: bool, sd15: Path | None, img2img_threads: int = 2) -> list[dict]:
    q = 1 if quick else 0
    cpu = device == "cpu"
    out = []
    if sd15 is not None:
        out.append(
            {
                "method": "img2img",
                "config": {**IMG2IMG, "model_dir": str(sd15)},
                "n": SAMPLES["img2img"] if cpu else 4 * SAMPLES["img2img"],
                "warmup": not cpu,  # a warm-up costs a whole sample on CPU (40-60 s)
                "threads": img2img_threads if cpu else None,
            }
        )
    out.append(
        {
            "method": "tile-diffusion",
            "config": TILE_FIT[q],
            "n": SAMPLES["tile-diffusion"] if cpu else 4 * SAMPLES["tile-diffusion"],
            "warmup": True,
            # small networks: 1 thread, as the demo runs them (2 threads measured 5-8x slower
            # for its fit and sampling on this 2-core machine under load)
            "threads": 1 if cpu else None,
        }
    )
    out.append(
        {
            "method": "zoo-diffusion",
            "config": ZOO_FIT[q],
            "n": SAMPLES["zoo-diffusion"],
            "warmup": True,
            "threads": None,  # the library runs it on 1 thread on CPU (small networks)
        }
    )
    for s in out:
        s.update(size=size, device=device)
    return out


def size_table(rows: dict[str, dict]) -> str:
    ref = rows.get("img2img")
    ref_bps = ref["bytes"] / ref["seconds"] if ref else None
    ref_bpc = ref["bytes"] / ref["sample_cpu_seconds"] if ref else None
    out = []
    for method in METHODS:
        r = rows.get(method)
        if r is None:
            continue
        bps = r["bytes"] / r["seconds"]
        out.append(
            [
                method,
                f"{r['fit_seconds']:.1f}",
                f"{r['prepare_seconds']:.1f}",
                r["n"],
                f"{r['seconds']:.2f}",
                f"{r['sample_cpu_seconds']:.1f}",
                c.fmt_mb(r["bytes"]),
                f"{bps / c.MB:,.3f}",
                c.fmt_ratio(bps / ref_bps) if ref_bps else "",
                c.fmt_ratio(r["bytes"] / max(r["sample_cpu_seconds"], 1e-3) / ref_bpc) if ref_bpc else "",
                r["threads"],
                c.fmt_mb(r["rss_bytes"]),
                f"{r['std_ratio']:.2f}" + ("" if r["finite"] else " NaN!"),
                f"{r['nearest']:.3f}",
            ]
        )
    return c.table(
        [
            "generator",
            "fit s",
            "load s",
            "n",
            "sample s",
            "CPU s",
            "MB out",
            "MB/s",
            "x img2img",
            "x img2img CPU",
            "threads",
            "peak RSS MB",
            "std ratio",
            "nearest",
        ],
        out,
        "lrrrrrrrrrrrrr",
    )


def verdicts(size: int, device: str, rows: dict[str, dict]) -> list[tuple[str | None, str, str]]:
    """(PASS/FAIL or None for a skip, target, detail) per generator with a target."""
    out = []
    ref = rows.get("img2img")
    for method, target in TARGETS.items():
        label = f"{size}x{size} {device}: {method} >= {target:g}x img2img bytes/s"
        r = rows.get(method)
        if r is None or ref is None:
            why = "img2img not measured" if ref is None else f"{method} not measured"
            out.append((None, label, why))
            continue
        ratio = (r["bytes"] / r["seconds"]) / (ref["bytes"] / ref["seconds"])
        cpu_ratio = (r["bytes"] / max(r["sample_cpu_seconds"], 1e-3)) / (ref["bytes"] / ref["sample_cpu_seconds"])
        out.append(
            (
                "PASS" if ratio >= target else "FAIL",
                label,
                f"{ratio:,.1f}x ({r['bytes'] / r['seconds'] / c.MB:,.3f} vs "
                f"{ref['bytes'] / ref['seconds'] / c.MB:,.4f} MB/s; per CPU second "
                f"{cpu_ratio:,.1f}x)",
            )
        )
    return out


def cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", code], cwd=c.ROOT).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller fits (img2img is unchanged)")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where all three run; cuda also runs 2000x2000 (default: cpu)",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="tensor sides (default: 512; cuda: 512 2000)")
    p.add_argument(
        "--img2img-threads",
        type=int,
        default=2,
        help="torch threads of img2img on CPU (default: 2; tile-diffusion uses 1, zoo-diffusion the library's 1)",
    )
    p.add_argument("--out", type=Path, default=c.DEFAULT_OUT, help="work folder (bench/out)")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    p.add_argument(
        "--whole-model",
        action="store_true",
        help="every tensor of the demo's tiny trained model, new defaults vs. the previous ones (CPU)",
    )
    p.add_argument(
        "--new-config",
        type=json.loads,
        default=None,
        help="--whole-model: JSON options per generator over the new defaults, e.g. '{\"tile-diffusion\": {...}}'",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=["tile-diffusion", "zoo-diffusion"],
        choices=["tile-diffusion", "zoo-diffusion"],
        help="--whole-model: the generators to time (default: both)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        (whole_child if spec.get("whole") else child)(spec)
        return 0

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    machine, disk = c.machine(), c.disk(out)
    print(c.describe(machine, disk))
    if args.whole_model:
        started, load_before = time.perf_counter(), c.load()
        results = whole_model(out, args.new_config, tuple(args.methods))
        table, lines = whole_table(results)
        print(f"\nbefore: {load_before}; after: {c.load()} (wall times: other work on the machine slows both)")
        print(table)
        print("\n".join(lines))
        print(
            "previous defaults: timed on the fixed sample of tensors above, one at a time, and extrapolated\n"
            "to every tensor (x tensors / timed tensors); new: measured on every tensor. Quality is not\n"
            "measured here."
        )
        print(f"benchmark took {time.perf_counter() - started:.0f}s")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine, "whole_model": results}, indent=1, default=str) + "\n")
        return 0
    device = args.device
    if device == "cuda" and not cuda_available():
        print("--device cuda: CUDA is not available here; running on cpu instead")
        device = "cpu"
    print(f"device:  {device}" + ("" if device != "cpu" else " (GPU: none used)"))
    sizes = args.sizes or ([512, 2000] if device == "cuda" else [512])
    print(
        "method:  each generator in a fresh child process; fit timed apart, then the pipeline\n"
        "         is loaded (img2img) or one warm-up sample drawn (diffusion generators, and\n"
        "         img2img on GPU) untimed; 'sample s' times Generator.sample(n) alone, and\n"
        "         MB/s = n x tensor bytes / sample s. img2img: SD-1.5-sized random pipeline,\n"
        f"         {IMG2IMG['image_size']} px tiles, steps {IMG2IMG['steps']} x strength "
        f"{IMG2IMG['strength']} = {int(IMG2IMG['steps'] * IMG2IMG['strength'])} denoising "
        "steps, float32.\n"
        "         'std ratio' = std of the samples / std of the examples; 'nearest' = median\n"
        "         distance of a sample to its nearest example / the example's norm (img2img at\n"
        "         strength 1 redraws from pure noise). 'threads': torch threads on CPU: img2img\n"
        "         --img2img-threads (2), tile-diffusion 1 (as the demo), zoo-diffusion 1 (its own\n"
        "         setting). 'x img2img CPU' compares bytes per CPU second (user + system,\n"
        "         all threads), less sensitive to other work on a shared machine than wall time.\n"
        "         Quality is NOT measured here: see the demo's vetting report (`weightsmith\n"
        "         demo`: held-out loss and novelty per entry).\n"
        f"fits:    {'--quick' if args.quick else 'default'}: tile-diffusion "
        f"{TILE_FIT[int(args.quick)]}, zoo-diffusion K={ZOO_K} {ZOO_FIT[int(args.quick)]}\n",
        flush=True,
    )
    started = time.perf_counter()
    sd15, note = sd15_dir(out)
    print(f"img2img pipeline: {sd15 or '-'} ({note})\n", flush=True)
    results: dict = {"machine": machine, "disk": disk, "device": device, "sizes": {}}
    for size in sizes:
        load_before = c.load()
        print(f"== {size}x{size} float32 tensor ({size * size * 4 / c.MB:.2f} MB), {device}")
        rows: dict[str, dict] = {}
        for spec in specs(size, device, args.quick, sd15, args.img2img_threads):
            print(f"  {spec['method']} ...", end=" ", flush=True)
            try:
                r = c.run_child(SCRIPT, spec, timeout=3600)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"FAILED to run: {str(e).strip().splitlines()[-1]}", flush=True)
                continue
            rows[spec["method"]] = r
            print(
                f"fit {r['fit_seconds']:.1f}s, sample n={r['n']} in {r['seconds']:.2f}s "
                f"({r['bytes'] / r['seconds'] / c.MB:,.3f} MB/s)",
                flush=True,
            )
        load_after = c.load()
        print(f"before: {load_before}; after: {load_after}")
        print(size_table(rows))
        checks = verdicts(size, device, rows)
        for verdict, label, detail in checks:
            print(f"{verdict or 'SKIP'}  {label}: {detail}")
        print(flush=True)
        results["sizes"][size] = {
            "rows": rows,
            "load": [load_before, load_after],
            "targets": [{"target": t, "verdict": v, "detail": d} for v, t, d in checks],
        }
    print(
        "quality: not measured by this benchmark; the demo's vetting report shows it "
        "(`weightsmith demo`, report.md per layer group)"
    )
    print(f"benchmark took {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
