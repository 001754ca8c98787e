"""Evaluator `weight-stats`: how each replaced tensor compares with the original and the data.

Per replaced tensor, with c the entry's values, o the original's and x_1..x_K the generator's
training examples of that tensor (the original alone when there is no zoo):

- rel_l2 = ||c - o|| / ||o||, and cosine = <c, o> / (||c|| ||o||) (flattened, float64);
- spectral_norm = the largest singular value of the 2-D view (rows = first axis, columns =
  the rest; a vector is one row), exact up to `exact_svd_max_numel` values, else estimated
  from below by `power_iterations` steps of power iteration from a fixed start;
- novelty = min_k ||c - x_k|| / (s sqrt(n)): the RMS distance to the nearest training
  example in units of s, the std of all K examples' values pooled (n values per tensor).
  The `noise` baseline at radius r lies at novelty ~ r from a single example;
- typical_distance = the median over pairs j < k of ||x_j - x_k|| / (s sqrt(n)): how far
  apart the training examples themselves are (NaN for K = 1, and NaN novelty where s = 0).

The entry-level numbers are the means over the replaced tensors (of the finite values), except
`novelty`, which is over the whole group: with s_t the pooled std of tensor t's examples and N
the replaced values in all,

    novelty = min_k sqrt( sum_t ||c_t - x_{k,t}||^2 / s_t^2 / N ),

the RMS distance, in per-tensor std units, from the sample (all its tensors together) to the
single nearest example k (`nearest`, its index). A sample that takes tensor A from one example
and B from another is not near any single one. Tensors whose examples have s = 0 are left out.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field

from weightsmith.errors import WeightsmithError
from weightsmith.stats import RunningStats
from weightsmith.vet.registry import (
    Context,
    Entry,
    Evaluator,
    EvaluatorConfig,
    Scores,
    finite_mean,
)

_BLOCK = 1 << 22  # values read per block across all K examples


class WeightStatsConfig(EvaluatorConfig):
    """How the spectral norm is computed."""

    exact_svd_max_numel: int = Field(1 << 22, ge=1)  # larger 2-D views use power iteration
    power_iterations: int = Field(100, ge=1)  # steps of power iteration for large views


class WeightStats(Evaluator):
    """Distances to the original and to the training examples, and spectral norms."""

    name = "weight-stats"
    Config = WeightStatsConfig
    metrics = {
        "rel_l2": "lower",
        "cosine": "higher",
        "spectral_norm": None,
        "novelty": None,
        "typical_distance": None,
        "nearest": None,
    }
    primary = "rel_l2"

    @classmethod
    def applies(cls, config: dict) -> bool:
        return True  # any model with replaced tensors

    def evaluate(self, entry: Entry, context: Context) -> Scores:
        cache = self.cached(context)
        per_tensor = {}
        group_sq, group_n = None, 0  # (K,) sum over tensors of squared distances in std units
        for name in context.tensors:
            if ("original", name) not in cache:
                cache["original", name] = context.original.tensor(name)
            original = cache["original", name]
            values = original if entry is context.original else entry.tensor(name)
            if values.shape != original.shape:
                raise WeightsmithError(entry.id, f"{name} has shape {values.shape}, the original {original.shape}")
            if entry.examples is None and context.examples is None:
                examples = original[None]  # (1, *shape): the original alone, already read
            else:
                examples = context.examples_for(entry, name)
            key = ("examples", id(entry.examples) if entry.examples is not None else None, name)
            if key not in cache:
                cache[key] = _example_stats(examples)
            std, typical = cache[key]
            sq = _sq_distances(values, examples)
            n = max(1, math.prod(values.shape))
            if std > 0:
                group_sq = sq / std**2 if group_sq is None else group_sq + sq / std**2
                group_n += n
            per_tensor[name] = {
                **_compare(values, original),
                "spectral_norm": self._spectral_norm(values),
                "novelty": float(np.sqrt(sq.min())) / (std * math.sqrt(n)) if std > 0 else math.nan,
                "typical_distance": typical,
            }
        metrics = {m: finite_mean([t[m] for t in per_tensor.values() if m in t]) for m in self.metrics}
        if group_sq is None:
            metrics["novelty"], metrics["nearest"] = math.nan, math.nan
        else:
            metrics["novelty"] = float(np.sqrt(group_sq.min() / group_n))
            metrics["nearest"] = float(np.argmin(group_sq))
        return Scores(metrics=metrics, per_tensor=per_tensor)

    def _spectral_norm(self, values: np.ndarray) -> float:
        import torch

        cfg = self.config
        assert isinstance(cfg, WeightStatsConfig)
        shape = values.shape
        if values.size == 0:
            return math.nan
        rows = shape[0] if len(shape) >= 2 else 1
        a = torch.from_numpy(np.ascontiguousarray(values).reshape(rows, -1)).to(self.device)
        if a.numel() <= cfg.exact_svd_max_numel:
            return float(torch.linalg.matrix_norm(a.double(), ord=2))
        # power iteration on A^T A from a fixed start: sigma_max from below, deterministic
        gen = torch.Generator(device=a.device).manual_seed(0)
        v = torch.randn(a.shape[1], generator=gen, device=a.device, dtype=a.dtype)
        v /= v.norm()
        for _ in range(cfg.power_iterations):
            v = a.T @ (a @ v)
            norm = v.norm()
            if norm == 0:
                return 0.0
            v /= norm
        return float((a @ v).norm())


def _compare(values: np.ndarray, original: np.ndarray) -> dict[str, float]:
    """rel_l2 and cosine of flattened values against the original's, in float64."""
    c = values.reshape(-1)
    o = original.reshape(-1)
    diff = dot = cc = oo = 0.0
    for start in range(0, c.size, _BLOCK):
        cb = c[start : start + _BLOCK].astype(np.float64)
        ob = o[start : start + _BLOCK].astype(np.float64)
        d = cb - ob
        diff += float(d @ d)
        dot += float(cb @ ob)
        cc += float(cb @ cb)
        oo += float(ob @ ob)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "rel_l2": float(np.sqrt(diff) / np.sqrt(oo)) if oo > 0 else math.nan,
            "cosine": float(dot / np.sqrt(cc * oo)) if cc * oo > 0 else math.nan,
        }


def _row_blocks(shape: tuple[int, ...], k: int) -> list[tuple]:
    """Index tuples along the tensor's first axis that cover it in blocks of ~_BLOCK / k values."""
    if not shape:
        return [()]
    per_row = max(1, math.prod(shape[1:]))
    step = max(1, _BLOCK // (k * per_row))
    return [(slice(a, min(a + step, shape[0])),) for a in range(0, shape[0], step)]


def _example_stats(examples) -> tuple[float, float]:
    """(pooled std, typical pairwise distance in std units) of the examples (K, *shape)."""
    k, shape = examples.shape[0], tuple(examples.shape[1:])
    stats = RunningStats()
    gram = np.zeros((k, k))  # (K, K) inner products of the flattened examples
    for idx in _row_blocks(shape, k):
        block = np.asarray(examples[(slice(None), *idx)], dtype=np.float64).reshape(k, -1)
        stats.update(block)
        gram += block @ block.T
    std = math.sqrt(stats.m2 / stats.n) if stats.n else 0.0
    if k < 2 or std == 0.0:
        return std, math.nan
    sq = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2 * gram
    pairs = np.sqrt(np.clip(sq[np.triu_indices(k, 1)], 0.0, None))  # (K (K - 1) / 2,)
    return std, float(np.median(pairs)) / (std * math.sqrt(stats.n / k))


def _sq_distances(values: np.ndarray, examples) -> np.ndarray:
    """(K,) squared Euclidean distances of `values` to each example (K, *shape), float64."""
    k, shape = examples.shape[0], tuple(examples.shape[1:])
    sq = np.zeros(k)  # (K,) squared distances to each example
    for idx in _row_blocks(shape, k):
        block = np.asarray(examples[(slice(None), *idx)], dtype=np.float64).reshape(k, -1)
        diff = block - np.asarray(values[idx], dtype=np.float64).reshape(1, -1)
        sq += (diff * diff).sum(axis=1)
    return sq


def _novelty(values: np.ndarray, examples, std: float) -> float:
    """RMS distance to the nearest example, in units of the examples' pooled std."""
    if std == 0.0:
        return math.nan
    sq = _sq_distances(values, examples)
    return float(np.sqrt(sq.min())) / (std * math.sqrt(max(1, math.prod(tuple(examples.shape[1:])))))


def group_novelty(values: dict[str, np.ndarray], examples: dict, stds: dict[str, float] | None = None) -> float:
    """The group novelty (see the module's docstring) of tensors `values` to `examples` (K, *shape).

    stds: each tensor's pooled example std, when already known (see `example_stds`).
    """
    total, n_all = None, 0
    for name, v in values.items():
        std = stds[name] if stds is not None else _example_stats(examples[name])[0]
        if std == 0.0:
            continue
        sq = _sq_distances(v, examples[name]) / std**2
        total = sq if total is None else total + sq
        n_all += max(1, v.size)
    return math.nan if total is None else float(np.sqrt(total.min() / n_all))


def example_stds(context: Context | None = None, examples: dict | None = None) -> dict[str, float]:
    """Each replaced tensor's pooled std over its examples (the context's, or those given)."""
    if examples is None:
        assert context is not None
        examples = {
            n: (context.original.tensor(n)[None] if context.examples is None else context.examples[n])
            for n in context.tensors
        }
    return {n: _example_stats(x)[0] for n, x in examples.items()}


def group_distances(entry: Entry, context: Context, stds: dict[str, float] | None = None) -> np.ndarray:
    """(K,) RMS distance of the entry's replaced tensors together to each of the context's examples."""
    stds = stds if stds is not None else example_stds(context)
    total, n_all = None, 0
    for name in context.tensors:
        values = context.original.tensor(name) if entry is context.original else entry.tensor(name)
        examples = context.original.tensor(name)[None] if context.examples is None else context.examples[name]
        if stds[name] == 0.0:
            continue
        sq = _sq_distances(values, examples) / stds[name] ** 2
        total = sq if total is None else total + sq
        n_all += max(1, values.size)
    if total is None:
        return np.zeros(context.k)
    return np.sqrt(total / n_all)
