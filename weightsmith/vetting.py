"""The pipeline's vet stage: candidates and baselines from the store -> one report per group.

Each layer group gets its own report (`reports/<run>-g<i>/`): the original, every generator's
candidates and every baseline's, scored on the same held-out text with the same evaluators.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import numpy as np

from weightsmith.model import ModelRef
from weightsmith.predict import PREDICTION, read_values


def local_folder(model: ModelRef, key: str) -> str:
    """A local folder holding the candidate at `key` (downloaded from S3 once, into the cache)."""
    if model.store.protocol == "file":
        return model.store.path(key)
    from weightsmith.state import cache_dir

    target = cache_dir() / "candidates" / model.store.url_of(key).replace("://", "__").replace("/", "__")
    if not (target / "candidate.json").exists():
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for k in model.store.list(key):
            (tmp / os.path.basename(k)).write_bytes(model.store.read_bytes(k))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return str(target)


def group_examples(model: ModelRef, names: list[str], zoo: str | None) -> dict[str, np.ndarray]:
    """Training examples of each replaced tensor: the zoo's K checkpoints, else the original."""
    manifest = model.manifest()
    if zoo:
        from weightsmith.zoo import read_zoo_tensor

        return {n: read_zoo_tensor(model.store, zoo, n) for n in names}
    return {n: read_values(model, manifest["tensors"][n])[None] for n in names}


def sample_novelties(model: ModelRef, pred_id: str, examples: dict[str, np.ndarray]) -> list[float]:
    """Per sample of a prediction run: mean novelty over its tensors (vet's weight-stats unit)."""
    from weightsmith.store import arrays
    from weightsmith.vet.weight_stats import novelty

    pred = model.store.read_json(model.key("predictions", pred_id, PREDICTION))
    per_sample: list[list[float]] = []
    for name, entry in pred["tensors"].items():
        stacked = arrays.open_array(model.store, entry["zarr"])
        for s in range(stacked.shape[0]):
            if len(per_sample) <= s:
                per_sample.append([])
            per_sample[s].append(novelty(np.asarray(stacked[s]), examples[name]))
    return [float(np.nanmean(v)) for v in per_sample]


def vet_group(
    model: ModelRef,
    report_id: str,
    original_key: str,
    runs: list[tuple[str, str, str, dict, str]],
    samples: int,
    zoo: str | None,
    text: str | None,
    device: str,
    say: Callable[[str], None],
) -> tuple[str, list[str], list[dict]]:
    """Score one group's runs; `runs` are (label, generator, kind, config, prediction id).

    Returns (report URL, verdict sentences, table rows).
    """
    from weightsmith.vet import Context, Entry, vet

    first = model.store.read_json(model.key("predictions", runs[0][4], PREDICTION))
    names = list(first["tensors"])
    examples = group_examples(model, names, zoo)
    orig = Entry(label="original", kind="original", generator="", sample=0, folder=local_folder(model, original_key))
    entries = []
    for label, generator, kind, config, pred_id in runs:
        for s in range(samples):
            folder = local_folder(model, model.key("candidates", f"{pred_id}-s{s}"))
            entries.append(Entry(label=label, kind=kind, generator=generator, sample=s, folder=folder, params=config))
    text_value = open(text, encoding="utf-8", errors="replace").read() if text else ""
    context = Context(original=orig, tensors=tuple(names), text=text_value, text_source=text or "", examples=examples)
    evaluators = None if text else ["weight-stats"]
    report = vet(
        context,
        entries,
        run_id=report_id,
        model=f"{model.slug}@{model.revision}",
        evaluators=evaluators,
        device="cpu" if device == "auto" else device,
        progress=lambda msg: say(f"  vet {msg}"),
    )
    report.write(model.store, model.prefix)
    url = model.store.url_of(model.key("reports", report_id))
    return url, [v.sentence for v in report.verdicts], report.table()
