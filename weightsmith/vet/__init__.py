"""Vet: score the original, the candidates and the baselines on the same data, and report.

One module per evaluator, listed in `registry.py` (with the shared `Entry`, `Context`,
`Evaluator`); `report.py` holds the stage's entry function `vet` and the `Report`;
`plots.py` draws its charts.
"""

from weightsmith.vet.cache import ScoreCache
from weightsmith.vet.registry import (
    EVALUATORS,
    Context,
    Entry,
    Evaluator,
    EvaluatorConfig,
    Scores,
    for_model,
    get,
)
from weightsmith.vet.report import (
    FRONTIER,
    EntryResult,
    Group,
    Histogram,
    Point,
    Report,
    Verdict,
    baseline_label,
    noise_radii,
    vet,
)

__all__ = [
    "EVALUATORS",
    "FRONTIER",
    "Context",
    "Entry",
    "EntryResult",
    "Evaluator",
    "EvaluatorConfig",
    "Group",
    "Histogram",
    "Point",
    "Report",
    "ScoreCache",
    "Scores",
    "Verdict",
    "baseline_label",
    "for_model",
    "get",
    "noise_radii",
    "vet",
]
