"""The vet stage: the original, the candidates and the baselines scored on the same data.

    context = Context(original=original, tensors=names, text=held_out, text_source=path)
    report = vet(context, candidates + baselines, run_id="r1", model="demo-gpt2-tiny")
    report.write(store, "models/demo-gpt2-tiny/<revision>")   # reports/r1/report.{json,md}
    rows = report.table()                                      # a Prefect table artifact

Every evaluator that applies to the model (or those named) scores every entry; the report
ranks them by one *primary* metric: that of the first evaluator in registry order
(lm-perplexity: nll_per_byte, embedding-similarity: cosine, weight-stats: rel_l2). It says,
per candidate sample, which baselines it beats (see `Verdict`) and where it lies against the
baselines' quality-novelty frontier (see `frontier`).

When lm-perplexity ran, the report also decides with statistics (`weightsmith.vet.statistics`):
per label mean ± SE from a paired bootstrap over shared text blocks, the ensemble NLL, and per
candidate label the "beyond" rule (`BEYOND`), summarised in report.json's top-level `summary`.
The per-token log-probabilities behind them are written next to it (`logprobs.npy`, one row per
entry in `token_logprobs.rows` order; `token_bytes.npy`). report.json holds numbers only (no
arrays, no paths, no clock: `created` is whatever the caller passes), with sorted keys, so the
same inputs give the same bytes. A `ScoreCache` makes a re-run score nothing it has scored.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.store import Store
from weightsmith.store.store import dumps
from weightsmith.vet import statistics as st
from weightsmith.vet.cache import ScoreCache
from weightsmith.vet.registry import EVALUATORS, Context, Entry, Scores, for_model, get

FORMAT = 2  # layout of report.json: 2 adds statistics, decisions and summary
NOVELTY = "weight-stats/novelty"  # the metric the frontier's novelty axis uses (group novelty)
FUNCTIONAL = "lm-perplexity/functional_novelty"
NOVELTY_UNITS = (
    "weight novelty: RMS distance from a sample (all its replaced tensors together) to the single "
    "nearest training example, each tensor's difference in units of the pooled std of that tensor's "
    "examples; functional novelty: mean Jensen-Shannon divergence (nats, at most ln 2) of next-token "
    "distributions on the probe from the nearest example's"
)
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHORT = {"radius": "r", "components": "q"}  # parameter names in baseline labels
FRONTIER = (
    "Quality q is the primary metric and novelty n the weight-stats novelty of a sample. "
    "A baseline sample b dominates a point p when n(b) >= n(p) and q(b) is strictly better "
    "than q(p): some baseline is at least as novel and better. A candidate sample lies on or "
    'beyond the baselines\' frontier ("beyond") when no baseline sample dominates it, else '
    '"inside". A baseline sample is "on" the frontier when no other baseline sample dominates '
    'it, else "off". Points without a finite novelty or quality have no frontier status.'
)


@dataclass(frozen=True)
class EntryResult:
    """The numbers of one entry."""

    id: str  # "original" or "<label>#<sample>"
    label: str  # group of samples (generator and its config)
    kind: str  # original | candidate | baseline
    generator: str
    sample: int
    params: dict  # the generator's config
    metrics: dict[str, dict[str, float]]  # evaluator -> metric -> value (NaN where undefined)
    per_tensor: dict[str, dict[str, dict[str, float]]]  # evaluator -> tensor -> metric -> value

    def metric(self, key: str) -> float:
        """The value of "evaluator/metric" (NaN when absent)."""
        evaluator, _, name = key.partition("/")
        return self.metrics.get(evaluator, {}).get(name, math.nan)


@dataclass(frozen=True)
class Group:
    """The samples that share a label, summarised on the primary metric."""

    label: str
    kind: str
    generator: str
    samples: int
    mean: float  # mean over the samples (NaN if any sample's value is not finite)
    best: float  # the best sample's value
    se: float = math.nan  # paired-bootstrap SE of `mean` (NaN without per-token scores)


@dataclass(frozen=True)
class Point:
    """One sample on the quality-novelty chart."""

    id: str
    label: str
    kind: str
    novelty: float  # weight-stats novelty (mean over the replaced tensors)
    quality: float  # the primary metric
    frontier: str | None  # baselines: "on" | "off"; candidates: "beyond" | "inside"; see frontier


@dataclass(frozen=True)
class Verdict:
    """Which baselines a candidate sample beats on the primary metric.

    A candidate beats a baseline label when its value is strictly better than the mean of
    that label's samples; a value that is not finite is worse than any finite one.
    """

    candidate: str  # entry id
    beats: list[str]  # baseline labels, in report order
    does_not_beat: list[str]
    frontier: str | None  # "beyond" | "inside" | None (no finite novelty or quality)
    sentence: str  # the verdict in plain words


@dataclass(frozen=True)
class Histogram:
    """Value histograms of one replaced tensor for a few entries, on the same bins."""

    tensor: str
    edges: list[float]  # bins + 1 edges
    counts: dict[str, list[int]]  # entry id -> count per bin


@dataclass(frozen=True)
class Report:
    """What `vet` found; numbers only. See `to_dict` for report.json."""

    run_id: str
    model: str  # the model's name or store URL, as the caller gave it
    text: dict  # source, sha256 and bytes of the evaluation text
    tensors: list[str]  # the replaced tensors
    evaluators: dict[str, dict]  # evaluator -> its validated config
    device: str
    primary: str  # "evaluator/metric" that ranks the entries
    better: str  # "lower" | "higher": which values of the primary metric are better
    entries: list[EntryResult]  # the original first, then the entries as given
    groups: list[Group]  # one per label, in order of first appearance
    verdicts: list[Verdict]  # one per candidate sample
    points: list[Point]  # every entry with its novelty and quality
    histograms: list[Histogram]  # one per replaced tensor
    created: str | None = None  # whatever the caller passes (e.g. an ISO time); None by default
    labels: list[st.LabelStats] = field(default_factory=list)  # statistics per label (lm-perplexity)
    decisions: list[st.Decision] = field(default_factory=list)  # the beyond rule per candidate label
    comparisons: list[dict] = field(default_factory=list)  # candidate, baseline, d, se
    token_logprobs: dict[str, Any] = field(default_factory=dict)  # entry id -> (tokens,) float32
    token_bytes: Any = None  # (tokens,) bytes per token
    cache: dict[str, int] = field(default_factory=dict)  # score-cache hits and misses
    plot_files: list[str] = field(init=False)  # report-relative paths of the PNGs

    def __post_init__(self) -> None:
        hists = [f"plots/hist-{i:03d}.png" for i in range(len(self.histograms))]
        object.__setattr__(self, "plot_files", ["plots/metric.png", "plots/frontier.png", *hists])

    # -- views -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """report.json's content: JSON-able, NaN and infinities as null."""
        return _clean(
            {
                "format": FORMAT,
                "run_id": self.run_id,
                "model": self.model,
                "created": self.created,
                "text": self.text,
                "tensors": self.tensors,
                "evaluators": self.evaluators,
                "device": self.device,
                "primary": {"metric": self.primary, "better": self.better},
                "entries": [vars(e) for e in self.entries],
                "groups": [vars(g) for g in self.groups],
                "verdicts": [vars(v) for v in self.verdicts],
                "frontier": {"definition": FRONTIER, "points": [vars(p) for p in self.points]},
                "histograms": [vars(h) for h in self.histograms],
                "plots": self.plot_files,
                "novelty_units": NOVELTY_UNITS,
                "statistics": {
                    "definition": st.BEYOND,
                    "block_tokens": st.BLOCK_TOKENS,
                    "replicates": st.REPLICATES,
                    "seed": st.SEED,
                    "ensemble_max": st.ENSEMBLE,
                    "labels": [vars(x) for x in self.labels],
                    "comparisons": self.comparisons,
                    "decisions": [vars(d) for d in self.decisions],
                },
                "token_logprobs": {
                    "file": "logprobs.npy",
                    "bytes_file": "token_bytes.npy",
                    "rows": list(self.token_logprobs),
                }
                if self.token_logprobs
                else None,
                "summary": self.summary(),
            }
        )

    def summary(self) -> dict:
        """The machine-readable verdict of this report's group (report.json's `summary`).

        best_candidate: the candidate label that is beyond with the largest margin / margin_se;
        if none is beyond, the one with the best mean. None without statistics.
        """
        base = {
            "primary": self.primary,
            "text_bytes": self.text.get("scored_bytes", self.text.get("bytes")),
            "novelty_units": NOVELTY_UNITS,
        }
        if not self.decisions:
            return {
                **base,
                "best_candidate": None,
                "verdict": None,
                "beyond": None,
                "margin": None,
                "margin_se": None,
                "bound_by": None,
                "functional_beyond": None,
                "samples": None,
            }
        stats = {x.label: x for x in self.labels}
        beyond = [d for d in self.decisions if d.beyond]
        if beyond:
            best = max(beyond, key=lambda d: d.margin / d.margin_se if d.margin_se else math.inf)
        else:
            best = min(self.decisions, key=lambda d: _score_min(stats[d.label].mean))
        s = stats[best.label]
        return {
            **base,
            "best_candidate": best.label,
            "verdict": best.verdict,
            "beyond": best.beyond,
            "margin": best.margin,
            "margin_se": best.margin_se,
            "bound_by": best.bound_by,
            "functional_beyond": best.functional_beyond,
            "functional_verdict": best.functional_verdict,
            "mean": s.mean,
            "se": s.se,
            "novelty": s.novelty,
            "functional_novelty": s.functional_novelty,
            "functional_upper_bound": s.functional_bound,
            "samples": s.samples,
            "fits": s.fits,
            "baseline_samples": {x.label: x.samples for x in self.labels if x.kind == "baseline"},
            "candidates": {d.label: d.verdict for d in self.decisions},
            # real models kept out of the zoo, read beside the candidates (never a baseline)
            "reference": {
                x.label: {
                    "mean": x.mean,
                    "se": x.se,
                    "novelty": x.novelty,
                    "functional_novelty": x.functional_novelty,
                    "samples": x.samples,
                }
                for x in self.labels
                if x.kind == "reference"
            },
        }

    def summary_line(self) -> str:
        """One line from `summary`."""
        s = self.summary()
        if s["best_candidate"] is None:
            return "no statistics (no per-token scores)"
        margin = (
            "" if s["margin"] is None else f", margin {s['margin']:+.2e} ± {s['margin_se']:.1e} over {s['bound_by']}"
        )
        return (
            f"best {s['best_candidate']}: {s['verdict']}{margin}; functionally {s['functional_verdict']} "
            f"({s['samples']} samples/label, {s['text_bytes']} bytes)"
        )

    def to_json(self) -> str:
        """report.json: canonical JSON (sorted keys), the same bytes for the same report."""
        return dumps(self.to_dict()).decode("utf-8")

    def table(self) -> list[dict]:
        """One flat row per entry (str, int, float or None values), for a Prefect table."""
        verdicts = {v.candidate: v.sentence for v in self.verdicts}
        frontiers = {p.id: p.frontier for p in self.points}
        columns = [f"{n}/{m}" for n in self.evaluators for m in get(n).metrics]
        rows = []
        for e in self.entries:
            row = {
                "entry": e.id,
                "kind": e.kind,
                self.primary: e.metric(self.primary),
                "frontier": frontiers.get(e.id),
                "verdict": verdicts.get(e.id),
                **{c: e.metric(c) for c in columns if c != self.primary},
                "label": e.label,
                "generator": e.generator,
                "sample": e.sample,
            }
            rows.append(_clean(row))
        return rows

    def to_markdown(self) -> str:
        """report.md: verdicts, tables and links to the plots."""
        metric = self.primary.split("/", 1)[1]
        t = self.text
        lines = [
            f"# Vet report `{self.run_id}`",
            "",
            f"- model: `{self.model}`",
            f"- text: `{t['source'] or '(unnamed)'}`, {t['bytes']} bytes, sha256 `{t['sha256']}`",
            f"- primary metric: `{self.primary}` ({self.better} is better)",
            f"- replaced tensors: {len(self.tensors)}; evaluators: {', '.join(self.evaluators)} on {self.device}",
        ]
        if self.created is not None:
            lines.append(f"- created: {self.created}")
        if self.decisions:
            lines += ["", "## Summary", "", f"- {self.summary_line()}"]
            lines += [f"- {decision_sentence(d)}" for d in self.decisions]
            lines += ["", st.BEYOND, "", f"Units: {NOVELTY_UNITS}."]
        lines += ["", "## Verdicts", ""]
        lines += [f"- {v.sentence}" for v in self.verdicts] or ["No candidates were evaluated."]
        lines += [
            "",
            "## Candidates and baselines",
            "",
            f"| label | kind | samples | mean {metric} ± SE | ensemble | best {metric} | mean novelty "
            "| functional novelty |",
            "|---|---|---|---|---|---|---|---|",
        ]
        novelty = {p.id: p.novelty for p in self.points}
        stats = {x.label: x for x in self.labels}
        for g in self.groups:
            mean_novelty = _mean([novelty[e.id] for e in self.entries if e.label == g.label])
            x = stats.get(g.label)
            ens = f"{_fmt(x.ensemble, 6)} (M={x.ensemble_members})" if x else "–"
            fn = (_fmt(x.functional_novelty) + (" (≤)" if x.functional_bound else "")) if x else "–"
            lines.append(
                f"| {g.label} | {g.kind} | {g.samples} | {_fmt(g.mean, 6)} ± {_fmt(g.se, 2)} | {ens} "
                f"| {_fmt(g.best, 6)} | {_fmt(mean_novelty)} | {fn} |"
            )
        lines += [
            "",
            "## Quality against novelty",
            "",
            "![quality against novelty](plots/frontier.png)",
            "",
            FRONTIER,
            "",
            f"| entry | kind | novelty | {metric} | frontier |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {p.id} | {p.kind} | {_fmt(p.novelty)} | {_fmt(p.quality, 6)} | {p.frontier or '–'} |"
            for p in self.points
        ]
        columns = [f"{n}/{m}" for n in self.evaluators for m in get(n).metrics]
        lines += [
            "",
            "## Every entry",
            "",
            f"![{metric} of every entry](plots/metric.png)",
            "",
            "| entry | kind | " + " | ".join(columns) + " |",
            "|---|---|" + "---|" * len(columns),
        ]
        lines += [
            f"| {e.id} | {e.kind} | "
            + " | ".join(_fmt(e.metric(c), 6 if c == self.primary else 4) for c in columns)
            + " |"
            for e in self.entries
        ]
        lines += ["", "## Replaced tensors"]
        stats = list(get("weight-stats").metrics)
        for hist, png in zip(self.histograms, self.plot_files[2:], strict=True):
            lines += [
                "",
                f"### `{hist.tensor}`",
                "",
                f"![values of {hist.tensor}]({png})",
                "",
                "| entry | " + " | ".join(stats) + " |",
                "|---|" + "---|" * len(stats),
            ]
            for e in self.entries:
                values = e.per_tensor.get("weight-stats", {}).get(hist.tensor, {})
                lines.append(f"| {e.id} | " + " | ".join(_fmt(values.get(s, math.nan)) for s in stats) + " |")
        return "\n".join(lines) + "\n"

    def plots(self) -> dict[str, bytes]:
        """The PNGs by report-relative path (the names in `plot_files`)."""
        from weightsmith.vet.plots import render

        return render(self.to_dict())

    def write(self, store: Store, prefix: str) -> list[str]:
        """Write the plots, report.md and, last, report.json under `<prefix>/reports/<run-id>/`.

        Returns the keys written, report.json last: its presence means the report is complete.
        When the store already holds this very report.json and every file beside it (a re-run
        from cached scores), nothing is rewritten: the plots would be the same bytes.
        """
        base = "/".join(p for p in (prefix.strip("/"), "reports", self.run_id) if p)
        report_json = self.to_json().encode("utf-8")
        npy = ["logprobs.npy", "token_bytes.npy"] if self.token_logprobs else []
        keys = [f"{base}/{p}" for p in (*self.plot_files, *npy, "report.md", "report.json")]
        if store.exists(keys[-1]) and store.read_bytes(keys[-1]) == report_json and all(map(store.exists, keys)):
            return keys
        written = []
        for path, png in self.plots().items():
            store.write_bytes(f"{base}/{path}", png)
            written.append(f"{base}/{path}")
        if self.token_logprobs:
            for name, array in (
                ("logprobs.npy", np.stack([np.asarray(v, dtype=np.float32) for v in self.token_logprobs.values()])),
                ("token_bytes.npy", np.asarray(self.token_bytes, dtype=np.float32)),
            ):
                buf = io.BytesIO()
                np.save(buf, array)
                store.write_bytes(f"{base}/{name}", buf.getvalue())
                written.append(f"{base}/{name}")
        store.write_bytes(f"{base}/report.md", self.to_markdown().encode("utf-8"))
        store.write_bytes(f"{base}/report.json", report_json)
        return [*written, f"{base}/report.md", f"{base}/report.json"]


def vet(
    context: Context,
    entries: Sequence[Entry],
    *,
    run_id: str,
    model: str,
    evaluators: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str = "cpu",
    created: str | None = None,
    bins: int = 64,
    progress: Callable[[str], None] | None = None,
    cache: ScoreCache | None = None,
) -> Report:
    """Score the original and every entry with every evaluator, and report.

    Args:
        context: the original, the replaced tensors, the text and the training examples.
        entries: the candidates and baselines (not the original: it comes from the context).
        run_id: the report's folder name under reports/.
        model: how the report names the model (a slug or store URL).
        evaluators: names to run; None for every evaluator that applies to the model.
            weight-stats is required (the frontier's novelty comes from it).
        options: evaluator name -> its config (defaults where absent).
        device: where models run ("cpu", "cuda", "cuda:1").
        created: written as is into the report (no clock is read here).
        bins: bins of the value histograms.
        progress: called with "<evaluator> <entry id>" before each evaluation (not for a
            score the cache had).
        cache: where scores are looked up first and stored after (see ScoreCache).
    """
    if not _RUN_ID.fullmatch(run_id):
        raise WeightsmithError(f"run id {run_id!r}", "use letters, digits, '.', '_' and '-'")
    everything = [context.original, *entries]
    ids = [e.id for e in everything]
    if any(e.kind == "original" for e in entries):
        raise WeightsmithError("vet entries", "the original comes from the context; pass it once")
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise WeightsmithError("vet entries", f"entry ids must be unique: {', '.join(twice)}")
    kinds = {(e.label, e.kind) for e in everything}
    if len(kinds) != len({label for label, _ in kinds}):
        raise WeightsmithError("vet entries", "a label may name samples of one kind only")
    config = context.original.config()
    names = list(evaluators) if evaluators is not None else for_model(config)
    options = dict(options or {})
    for name in [*names, *options]:
        get(name)  # unknown names fail here
    for name in names:
        if not get(name).applies(config):
            raise WeightsmithError(f"evaluator {name!r}", "does not apply to this model's config")
    if "weight-stats" not in names:
        raise WeightsmithError("vet evaluators", "weight-stats is needed (it gives the novelty)")
    names = [n for n in EVALUATORS if n in names]  # registry order decides the primary metric

    metrics: dict[str, dict] = {i: {} for i in ids}
    per_tensor: dict[str, dict] = {i: {} for i in ids}
    arrays: dict[str, dict] = {i: {} for i in ids}
    configs = {}
    for name in names:
        evaluator = get(name)(options.get(name), device=device)
        configs[name] = evaluator.config.model_dump(mode="json")
        for e in everything:
            key = cache.key(e, context, name, configs[name]) if cache is not None else None
            scores: Scores | None = cache.get(key) if cache is not None else None
            if scores is None:
                if progress is not None:
                    progress(f"{name} {e.id}")
                scores = evaluator.evaluate(e, context)
                if cache is not None:
                    cache.put(key, scores)
            arrays[e.id].update(scores.arrays)
            metrics[e.id][name] = {k: float(v) for k, v in scores.metrics.items()}
            if scores.per_tensor:
                per_tensor[e.id][name] = scores.per_tensor
    results = [
        EntryResult(
            id=e.id,
            label=e.label,
            kind=e.kind,
            generator=e.generator,
            sample=e.sample,
            params=dict(e.params),
            metrics=metrics[e.id],
            per_tensor=per_tensor[e.id],
        )
        for e in everything
    ]
    first = get(names[0])
    primary, better = f"{names[0]}/{first.primary}", first.metrics[first.primary]
    assert better in ("lower", "higher"), primary
    labels, decisions, comparisons = [], [], []
    logprobs = {i: a["logprob"] for i, a in arrays.items() if "logprob" in a}
    token_bytes = next((a["token_bytes"] for a in arrays.values() if "token_bytes" in a), None)
    if primary == "lm-perplexity/nll_per_byte" and len(logprobs) == len(ids):
        labels, decisions, comparisons = _statistics(everything, results, logprobs, token_bytes)
    groups = _groups(results, primary, better, {x.label: x.se for x in labels})
    points = frontier(results, primary, better)
    scored = round(float(np.sum(token_bytes, dtype=np.float64))) if token_bytes is not None else None
    return Report(
        run_id=run_id,
        model=model,
        text={
            "source": context.text_source,
            "sha256": context.text_sha256,
            "bytes": len(context.text.encode("utf-8")),
            **({"scored_bytes": scored} if scored is not None else {}),
        },
        tensors=list(context.tensors),
        evaluators=configs,
        device=device,
        primary=primary,
        better=better,
        entries=results,
        groups=groups,
        verdicts=_verdicts(results, groups, points, primary, better),
        points=points,
        histograms=[_histogram(name, everything, bins) for name in context.tensors],
        created=created,
        labels=labels,
        decisions=decisions,
        comparisons=comparisons,
        token_logprobs=logprobs if labels else {},
        token_bytes=token_bytes if labels else None,
        cache={"hits": cache.hits, "misses": cache.misses} if cache is not None else {},
    )


def _statistics(entries: Sequence[Entry], results: Sequence[EntryResult], logprobs, token_bytes):
    """(LabelStats per label, Decision per candidate label, comparisons) from per-token scores."""
    order = list(dict.fromkeys((r.label, r.kind) for r in results))
    by_label: dict[str, list[EntryResult]] = {}
    for r in results:
        by_label.setdefault(r.label, []).append(r)
    fit_of = {e.id: e.fit for e in entries}
    lp = {label: np.stack([logprobs[r.id] for r in rs]) for label, rs in by_label.items()}
    labels, reps = st.label_stats(
        order,
        lp,
        token_bytes,
        novelty={label: [r.metric(NOVELTY) for r in rs] for label, rs in by_label.items()},
        functional={label: [r.metric(FUNCTIONAL) for r in rs] for label, rs in by_label.items()},
        bounds={
            label: any(r.metric("lm-perplexity/functional_upper_bound") == 1.0 for r in rs)
            for label, rs in by_label.items()
        },
        fits={label: [fit_of[r.id] for r in rs] for label, rs in by_label.items()},
    )
    diffs = st.differences(reps, labels)
    baselines = [x for x in labels if x.kind == "baseline"]
    decisions = [
        st.decide(c, baselines, {b: v for (cl, b), v in diffs.items() if cl == c.label})
        for c in labels
        if c.kind == "candidate"
    ]
    comparisons = [{"candidate": c, "baseline": b, "d": d, "se": se} for (c, b), (d, se) in diffs.items()]
    return labels, decisions, comparisons


def decision_sentence(d: st.Decision) -> str:
    """One line per candidate label: its verdict, margin and bound, by weight and by function."""
    if d.verdict == "unbounded":
        text = f"{d.label}: unbounded (no baseline is as novel)"
    else:
        text = (
            f"{d.label}: {d.verdict} ({len(d.qualifying)} baselines as novel); margin "
            f"{d.margin:+.2e} ± {d.margin_se:.1e} nats/byte, bound by {d.bound_by}"
        )
    if d.functional_verdict == "unbounded":
        return text + "; functionally unbounded"
    return text + (
        f"; functionally {d.functional_verdict} (margin {d.functional_margin:+.2e} ± "
        f"{d.functional_margin_se:.1e}, bound by {d.functional_bound_by})"
    )


def baseline_label(generator: str, config: Mapping[str, Any] | None = None) -> str:
    """A group label that names a generator and its options: "noise(r=0.1)", "average(k=16)"."""
    if not config:
        return generator
    parts = [
        f"{_SHORT.get(k, k)}={v:g}" if isinstance(v, float) else f"{_SHORT.get(k, k)}={v}"
        for k, v in sorted(config.items())
    ]
    return f"{generator}({','.join(parts)})"


def noise_radii(novelties: Sequence[float], fixed: Sequence[float] = (0.01, 0.1, 1.0)) -> list[float]:
    """The radii of the `noise` baseline for a report: fixed ones and the candidates' novelties.

    Novelties are rounded to 2 significant digits (so nearby candidates share a baseline);
    non-finite ones are skipped. Sorted, without duplicates.
    """
    radii = {float(f"{r:.2g}") for r in novelties if math.isfinite(r) and r > 0}
    return sorted(radii | {float(r) for r in fixed})


def frontier(entries: Sequence[EntryResult], primary: str, better: str) -> list[Point]:
    """Every entry's (novelty, quality) with its status against the baselines (see FRONTIER)."""
    points = []
    baselines = [
        (e.metric(NOVELTY), _score(e.metric(primary), better))
        for e in entries
        if e.kind == "baseline" and _finite(e, primary)
    ]
    for e in entries:
        status = None
        if e.kind in ("candidate", "baseline") and _finite(e, primary):  # a reference is not rated
            n, s = e.metric(NOVELTY), _score(e.metric(primary), better)
            dominated = any(bn >= n and bs > s for bn, bs in baselines)
            if e.kind == "candidate":
                status = "inside" if dominated else "beyond"
            else:
                status = "off" if dominated else "on"
        points.append(
            Point(
                id=e.id,
                label=e.label,
                kind=e.kind,
                novelty=e.metric(NOVELTY),
                quality=e.metric(primary),
                frontier=status,
            )
        )
    return points


def _groups(
    entries: Sequence[EntryResult], primary: str, better: str, se: Mapping[str, float] | None = None
) -> list[Group]:
    groups = []
    for label in dict.fromkeys(e.label for e in entries):
        members = [e for e in entries if e.label == label]
        values = [e.metric(primary) for e in members]
        groups.append(
            Group(
                label=label,
                kind=members[0].kind,
                generator=members[0].generator,
                samples=len(members),
                mean=_mean(values),
                best=max(values, key=lambda v: _score(v, better)),
                se=(se or {}).get(label, math.nan),
            )
        )
    return groups


def _verdicts(entries, groups, points, primary: str, better: str) -> list[Verdict]:
    baselines = [g for g in groups if g.kind == "baseline"]
    at = {p.id: p for p in points}
    verdicts = []
    for e in entries:
        if e.kind != "candidate":
            continue
        score = _score(e.metric(primary), better)
        beats = [g.label for g in baselines if score > _score(g.mean, better)]
        rest = [g.label for g in baselines if g.label not in beats]
        if not baselines:
            sentence = f"candidate {e.id} has no baselines to compare with"
        elif not rest:
            sentence = f"candidate {e.id} beats every baseline: {', '.join(beats)}"
        elif not beats:
            sentence = f"candidate {e.id} beats no baseline; does not beat {', '.join(rest)}"
        else:
            sentence = f"candidate {e.id} beats {', '.join(beats)}; does not beat {', '.join(rest)}"
        p = at[e.id]
        if p.frontier == "beyond":
            sentence += f". At novelty {_fmt(p.novelty)} it lies beyond the baselines' quality-novelty frontier"
            sentence += _only_by_novelty(p, points, better)
        elif p.frontier == "inside":
            rival = max(
                (
                    q
                    for q in points
                    if q.kind == "baseline"
                    and q.frontier is not None
                    and q.novelty >= p.novelty
                    and _score(q.quality, better) > _score(p.quality, better)
                ),
                key=lambda q: _score(q.quality, better),
            )
            sentence += (
                f". At novelty {_fmt(p.novelty)} it lies inside the baselines' "
                f"quality-novelty frontier: {rival.id} is as novel and better"
            )
        verdicts.append(
            Verdict(
                candidate=e.id,
                beats=beats,
                does_not_beat=rest,
                frontier=p.frontier,
                sentence=sentence + ".",
            )
        )
    return verdicts


def _only_by_novelty(p: Point, points: Sequence[Point], better: str) -> str:
    """A clause for a candidate 'beyond' the frontier only because no baseline is as novel."""
    rated = [q for q in points if q.kind == "baseline" and q.frontier is not None]
    if not rated or any(q.novelty >= p.novelty for q in rated):
        return ""
    most = max(rated, key=lambda q: (q.novelty, _score(q.quality, better)))
    if _score(most.quality, better) <= _score(p.quality, better):
        return ""
    return (
        f", but only because no baseline is as novel: {most.id}, the most novel baseline "
        f"(novelty {_fmt(most.novelty)}), is better"
    )


def _histogram(name: str, entries: Sequence[Entry], bins: int) -> Histogram:
    """Histograms of the original, the first candidate and the first sample of each baseline."""
    shown: dict[str, Entry] = {}
    for e in entries:
        if e.kind == "candidate" and any(s.kind == "candidate" for s in shown.values()):
            continue
        shown.setdefault(e.label, e)
    values = {e.id: e.tensor(name).reshape(-1) for e in shown.values()}
    finite = [v[np.isfinite(v)] for v in values.values()]
    lo = min((float(v.min()) for v in finite if v.size), default=0.0)
    hi = max((float(v.max()) for v in finite if v.size), default=1.0)
    if lo == hi:  # a constant tensor: bins of width 1 / bins around its value
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    counts = {i: [int(c) for c in np.histogram(v, bins=edges)[0]] for i, v in values.items()}
    return Histogram(tensor=name, edges=[float(x) for x in edges], counts=counts)


def _score(value: float, better: str) -> float:
    """Larger is better; a value that is not finite is the worst."""
    if not math.isfinite(value):
        return -math.inf
    return -value if better == "lower" else value


def _score_min(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _finite(e: EntryResult, primary: str) -> bool:
    return math.isfinite(e.metric(primary)) and math.isfinite(e.metric(NOVELTY))


def _mean(values: list[float]) -> float:
    """The mean; NaN when empty or when any value is not finite."""
    return math.fsum(values) / len(values) if values and all(map(math.isfinite, values)) else math.nan


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _clean(value):
    """A JSON-able copy: floats that are not finite become None, numpy scalars plain numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
