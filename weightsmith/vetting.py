"""The pipeline's vet stage: candidates and baselines from the store -> one report per group.

Each layer group gets its own report (`reports/<run>-g<i>/`): the original, every generator's
candidates and every baseline's, scored on the same held-out text with the same evaluators.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from weightsmith.model import ModelRef
from weightsmith.predict import PREDICTION, read_values


class VetOptions(Protocol):
    """What the vet stage reads of the pipeline's options (weightsmith.pipeline.PipelineOptions)."""

    stages: tuple[str, ...]
    text: str | None
    text_bytes: int | None
    zoo: str | None
    device: str


@dataclass(frozen=True)
class Run:
    """One prediction run of a group: a label's samples."""

    label: str
    generator: str
    kind: str  # candidate | baseline | reference
    config: dict
    pred_id: str
    samples: int
    fit: int = 0  # which fit of the label made it


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
    """Per sample of a prediction run: its group novelty (vet's weight-stats `novelty`: all the
    sample's tensors together, to the single nearest example)."""
    from weightsmith.store import arrays
    from weightsmith.vet.weight_stats import example_stds, group_novelty

    pred = model.store.read_json(model.key("predictions", pred_id, PREDICTION))
    stacks = {name: arrays.open_array(model.store, entry["zarr"]) for name, entry in pred["tensors"].items()}
    n = min(s.shape[0] for s in stacks.values())
    stds = example_stds(examples={name: examples[name] for name in stacks})
    return [group_novelty({name: np.asarray(s[i]) for name, s in stacks.items()}, examples, stds) for i in range(n)]


@dataclass(frozen=True)
class GroupVet:
    """What vetting one group gives: the report's URL, its sentences, table and summary."""

    url: str
    sentences: list[str]  # the summary line, then one decision per candidate label
    table: list[dict]  # one flat row per entry (a Prefect table)
    summary: dict  # report.json's `summary`
    cache: dict  # score-cache hits and misses


def vet_group(
    model: ModelRef,
    report_id: str,
    original_key: str,
    runs: list[Run],
    options: VetOptions,
    say: Callable[[str], None],
) -> GroupVet:
    """Score one group's runs (`pipeline.Run`s) with the options' text and device; scores are
    cached in the store under the model's `scores/`, so a re-run re-scores nothing it scored."""
    from weightsmith.vet import Context, Entry, ScoreCache, vet
    from weightsmith.vet.report import decision_sentence

    text = options.text if "lm-eval" in options.stages else None
    first = model.store.read_json(model.key("predictions", runs[0].pred_id, PREDICTION))
    names = list(first["tensors"])
    examples = group_examples(model, names, options.zoo)
    orig = Entry(label="original", kind="original", generator="", sample=0, folder=local_folder(model, original_key))
    entries = []
    numbered: dict[str, int] = {}  # a label's samples are numbered across its fits: ids stay unique
    for run in runs:
        first = numbered.get(run.label, 0)
        numbered[run.label] = first + run.samples
        for s in range(run.samples):
            folder = local_folder(model, model.key("candidates", f"{run.pred_id}-s{s}"))
            entries.append(
                Entry(
                    label=run.label,
                    kind=run.kind,
                    generator=run.generator,
                    sample=first + s,
                    folder=folder,
                    params=run.config,
                    fit=run.fit,
                )
            )
    text_value = read_text(text, options.text_bytes) if text else ""
    context = Context(
        original=orig,
        tensors=tuple(names),
        text=text_value,
        text_source=text or "",
        examples=examples,
        examples_id=_examples_id(model, options.zoo),
    )
    evaluators = None if text else ["weight-stats"]
    cache = ScoreCache(model.store, model.key("scores"))
    report = vet(
        context,
        entries,
        run_id=report_id,
        model=f"{model.slug}@{model.revision}",
        evaluators=evaluators,
        options={"lm-perplexity": {"max_tokens": 1 << 40}} if text else None,  # the text is cut to text_bytes here
        device="cpu" if options.device == "auto" else options.device,
        progress=lambda msg: say(f"  vet {msg}"),
        cache=cache,
    )
    report.write(model.store, model.prefix)
    url = model.store.url_of(model.key("reports", report_id))
    sentences = [report.summary_line(), *[decision_sentence(d) for d in report.decisions]]
    if not report.decisions:
        sentences += [v.sentence for v in report.verdicts]
    return GroupVet(url, sentences, report.table(), report.to_dict()["summary"], dict(report.cache))


def read_text(path: str, limit: int | None) -> str:
    """The held-out text, cut to its first `limit` UTF-8 bytes (at a character boundary)."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    if limit is None:
        return text
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")  # drops a cut character only


def _examples_id(model: ModelRef, zoo: str | None) -> str:
    """Names the examples for the score cache: the zoo's id and zoo.json's sha256, else the original."""
    if not zoo:
        return "original"
    import hashlib

    from weightsmith.zoo import ZOO_MANIFEST, zoo_prefix

    return f"zoo:{zoo}:{hashlib.sha256(model.store.read_bytes(f'{zoo_prefix(zoo)}/{ZOO_MANIFEST}')).hexdigest()}"
