"""Statistics that decide: per-label mean ± SE, ensembles, and the "beyond" rule.

Every scored entry keeps its per-token log-probabilities of the held-out text (`Tokens`), so
everything here is computed from stored numbers, with no extra forward passes:

- Blocks. The tokens are cut into contiguous blocks of `BLOCK_TOKENS`; a block's NLL is the sum
  of its tokens' NLLs and its bytes the sum of theirs. A label's value is the mean over its
  samples of (sum of NLL) / (sum of bytes), in nats per byte.
- Paired bootstrap (`bootstrap`). Each of B = 2000 replicates (fixed seed) draws the blocks
  with replacement, once, shared by every label (the pairing: all labels see the same text), and
  for each label draws its fits with replacement and, within each drawn fit, its samples with
  replacement. A label's SE is the std of its replicates; the SE of a difference between two
  labels is the std of the replicates' differences.
- Ensemble (`ensemble_nll`): the NLL of the mixture of M = min(8, samples) samples, whose
  probability of each true token is the mean of theirs: -log(mean_m exp(logprob_m)).
- "Beyond" (`decide`): see `BEYOND`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BLOCK_TOKENS = 1024  # tokens per bootstrap block
REPLICATES = 2000  # B
SEED = 0  # the bootstrap's fixed seed
ENSEMBLE = 8  # M = min(ENSEMBLE, samples)
QUALIFY = 0.95  # a baseline qualifies when its mean novelty >= QUALIFY x the candidate label's
SIGMAS = 2.0  # beyond iff d_b > SIGMAS * SE_b for every qualifying baseline
BEYOND = (
    "Qualifying baselines are the baseline labels whose mean novelty is at least 0.95x the candidate "
    "label's. For each, d_b = baseline mean - candidate mean of the primary metric, signed so that "
    "positive means the candidate is better, and SE_b its paired-bootstrap standard error. The "
    "candidate label is beyond iff d_b > 2 SE_b for every qualifying baseline; margin = min d_b, "
    "margin_se = that baseline's SE_b, and that baseline bounds it (bound_by). With no qualifying "
    "baseline the verdict is unbounded. functional_beyond is the same rule with functional novelty "
    "(the Jensen-Shannon divergence from the nearest example on the probe) in place of weight novelty."
)


@dataclass(frozen=True)
class Blocks:
    """The held-out text cut into bootstrap blocks; shared by every entry of a report."""

    starts: np.ndarray  # (blocks,) first token of each block
    bytes: np.ndarray  # (blocks,) UTF-8 bytes each block's tokens spell

    @classmethod
    def of(cls, token_bytes: np.ndarray, block: int = BLOCK_TOKENS) -> Blocks:
        token_bytes = np.asarray(token_bytes, dtype=np.float64)
        starts = np.arange(0, len(token_bytes), block)
        return cls(starts=starts, bytes=np.add.reduceat(token_bytes, starts) if len(starts) else np.zeros(0))

    def sums(self, logprobs: np.ndarray) -> np.ndarray:
        """Per block, the NLL (nats) of per-token log-probabilities (..., tokens)."""
        return -np.add.reduceat(np.asarray(logprobs, dtype=np.float64), self.starts, axis=-1)


@dataclass(frozen=True)
class LabelStats:
    """One label's quality in nats per byte (lower is better), with its uncertainty."""

    label: str
    kind: str  # original | candidate | baseline
    samples: int
    fits: int
    mean: float  # mean over samples of NLL per byte on the whole scored text
    se: float  # paired-bootstrap standard error of `mean`
    ensemble: float  # NLL per byte of the mixture of the first `ensemble_members` samples
    ensemble_members: int
    novelty: float  # mean over samples of the weight novelty (group, nearest example)
    functional_novelty: float  # mean over samples of the functional novelty (JS, nats)
    functional_bound: bool  # functional novelty is an upper bound (zoo > 32: 16 nearest only)


@dataclass(frozen=True)
class Decision:
    """The "beyond" rule for one candidate label against the baselines (see BEYOND)."""

    label: str
    verdict: str  # "beyond" | "not beyond" | "unbounded"
    margin: float | None  # min d_b over the qualifying baselines (nats per byte)
    margin_se: float | None  # SE_b of that baseline
    bound_by: str | None  # that baseline's label
    qualifying: list[str]  # the qualifying baselines
    functional_verdict: str  # the same rule with functional novelty
    functional_margin: float | None
    functional_margin_se: float | None
    functional_bound_by: str | None

    @property
    def beyond(self) -> bool:
        return self.verdict == "beyond"

    @property
    def functional_beyond(self) -> bool:
        return self.functional_verdict == "beyond"


def bootstrap(
    nll: Mapping[str, np.ndarray],
    block_bytes: np.ndarray,
    fits: Mapping[str, Sequence[int]] | None = None,
    replicates: int = REPLICATES,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """Bootstrap replicates (B,) of each label's mean NLL per byte.

    Args:
        nll: label -> (samples, blocks) NLL per block of each sample.
        block_bytes: (blocks,) bytes per block.
        fits: label -> the fit of each sample (one fit where absent).
    """
    rng = np.random.default_rng(seed)
    n_blocks = len(block_bytes)
    weights = rng.multinomial(n_blocks, np.full(n_blocks, 1.0 / n_blocks), size=replicates).astype(np.float64)
    denominators = weights @ np.asarray(block_bytes, dtype=np.float64)  # (B,)
    out = {}
    for label, values in nll.items():
        values = np.asarray(values, dtype=np.float64)
        per = (values @ weights.T) / denominators  # (samples, B): each sample's value per replicate
        chosen = _resample(rng, np.asarray((fits or {}).get(label, [0] * len(values))), replicates)  # (B, samples)
        out[label] = np.take_along_axis(per.T, chosen, axis=1).mean(axis=1)
    return out


def _resample(rng: np.random.Generator, fit_of: np.ndarray, replicates: int) -> np.ndarray:
    """(B, samples) indices: fits drawn with replacement, then samples within each drawn fit."""
    n = len(fit_of)
    fit_ids = np.unique(fit_of)
    if len(fit_ids) == 1:
        return rng.integers(0, n, size=(replicates, n))
    members = [np.flatnonzero(fit_of == f) for f in fit_ids]
    rows = []
    for _ in range(replicates):
        row = [rng.choice(members[f], size=len(members[f])) for f in rng.integers(0, len(members), len(members))]
        row = np.concatenate(row)
        rows.append(row[rng.integers(0, len(row), n)] if len(row) != n else row)
    return np.stack(rows)


def ensemble_nll(logprobs: np.ndarray, token_bytes: np.ndarray, members: int = ENSEMBLE) -> tuple[float, int]:
    """(NLL per byte of the mixture of the first M = min(members, samples) samples, M).

    logprobs: (samples, tokens) log-probability of each true token.
    """
    lp = np.asarray(logprobs, dtype=np.float64)[:members]
    m = len(lp)
    peak = lp.max(axis=0)
    mixture = peak + np.log(np.exp(lp - peak).mean(axis=0))  # (tokens,) log of the mean probability
    return float(-mixture.sum() / np.asarray(token_bytes, dtype=np.float64).sum()), m


def label_stats(
    labels: Sequence[tuple[str, str]],
    logprobs: Mapping[str, np.ndarray],
    token_bytes: np.ndarray,
    novelty: Mapping[str, Sequence[float]],
    functional: Mapping[str, Sequence[float]],
    bounds: Mapping[str, bool],
    fits: Mapping[str, Sequence[int]] | None = None,
    block: int = BLOCK_TOKENS,
) -> tuple[list[LabelStats], dict[str, np.ndarray]]:
    """Per label its LabelStats, and the bootstrap replicates (for differences).

    labels: (label, kind) in report order; logprobs: label -> (samples, tokens).
    """
    blocks = Blocks.of(token_bytes, block)
    nll = {label: blocks.sums(logprobs[label]) for label, _ in labels}
    reps = bootstrap(nll, blocks.bytes, fits)
    total = float(np.sum(token_bytes))
    stats = []
    for label, kind in labels:
        per_sample = nll[label].sum(axis=1) / total  # (samples,)
        ens, m = ensemble_nll(logprobs[label], token_bytes)
        stats.append(
            LabelStats(
                label=label,
                kind=kind,
                samples=len(per_sample),
                fits=len(set((fits or {}).get(label, [0]))),
                mean=float(per_sample.mean()),
                se=float(reps[label].std(ddof=1)),
                ensemble=ens,
                ensemble_members=m,
                novelty=_finite_mean(novelty.get(label, [])),
                functional_novelty=_finite_mean(functional.get(label, [])),
                functional_bound=bool(bounds.get(label, False)),
            )
        )
    return stats, reps


def differences(
    reps: Mapping[str, np.ndarray], stats: Sequence[LabelStats]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(candidate, baseline) -> (d_b, SE_b): baseline mean - candidate mean (NLL: positive = candidate better)."""
    means = {s.label: s.mean for s in stats}
    out = {}
    for c in (s for s in stats if s.kind == "candidate"):
        for b in (s for s in stats if s.kind == "baseline"):
            d = means[b.label] - means[c.label]
            out[c.label, b.label] = (d, float((reps[b.label] - reps[c.label]).std(ddof=1)))
    return out


def decide(
    candidate: LabelStats,
    baselines: Sequence[LabelStats],
    diffs: Mapping[str, tuple[float, float]],
    qualify: float = QUALIFY,
    sigmas: float = SIGMAS,
) -> Decision:
    """The "beyond" rule (BEYOND) for one candidate label; diffs: baseline label -> (d_b, SE_b)."""
    weight = _rule(candidate.novelty, [(b.label, b.novelty) for b in baselines], diffs, qualify, sigmas)
    functional = _rule(
        candidate.functional_novelty, [(b.label, b.functional_novelty) for b in baselines], diffs, qualify, sigmas
    )
    return Decision(
        label=candidate.label,
        verdict=weight[0],
        margin=weight[1],
        margin_se=weight[2],
        bound_by=weight[3],
        qualifying=weight[4],
        functional_verdict=functional[0],
        functional_margin=functional[1],
        functional_margin_se=functional[2],
        functional_bound_by=functional[3],
    )


def _rule(novelty: float, baselines, diffs, qualify: float, sigmas: float):
    """(verdict, margin, margin_se, bound_by, qualifying) against baselines as novel (x qualify)."""
    if not math.isfinite(novelty):
        return "unbounded", None, None, None, []
    qualifying = [label for label, n in baselines if math.isfinite(n) and n >= qualify * novelty]
    scored = [(diffs[b][0], diffs[b][1], b) for b in qualifying if b in diffs]
    if not scored:
        return "unbounded", None, None, None, qualifying
    margin, se, bound_by = min(scored, key=lambda x: x[0] if math.isfinite(x[0]) else -math.inf)
    beyond = all(math.isfinite(d) and math.isfinite(s) and d > sigmas * s for d, s, _ in scored)
    return ("beyond" if beyond else "not beyond"), margin, se, bound_by, qualifying


def _finite_mean(values: Sequence[float]) -> float:
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan
