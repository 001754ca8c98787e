"""The report's charts as PNG bytes (matplotlib's Agg renderer, no pyplot state).

Rendering is deterministic: matplotlib's default style whatever the user's rcParams, fixed
sizes and dpi, colours by order of appearance, and no "Software" or date in the PNG
metadata, so the same report gives the same bytes.

Everything here reads plain data (report.json's dict, `Report.to_dict()`), never the report
module: `render(data)` gives the PNGs named in `data["plots"]`.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_DPI = 100
_PALETTE = (
    "tab:red",
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
)
_ORIGINAL = "black"
_RC = {"svg.hashsalt": "weightsmith", "font.size": 9, "figure.dpi": _DPI}


def render(data: Mapping) -> dict[str, bytes]:
    """Every chart of a report (report.json's dict) by report-relative path (`data["plots"]`)."""
    colours = _label_colours(data)
    images = [metric_png(data), frontier_png(data)]
    images += [histogram_png(h, colours) for h in data["histograms"]]
    return dict(zip(data["plots"], images, strict=True))


def _value(entry: Mapping, key: str) -> float:
    """An entry's "evaluator/metric" from report.json's dict (NaN when absent or null)."""
    evaluator, _, name = key.partition("/")
    v = entry.get("metrics", {}).get(evaluator, {}).get(name)
    return math.nan if v is None else float(v)


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _styled(draw):
    """Run `draw` under matplotlib's default style plus _RC, whatever the user's rcParams."""

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context():
            matplotlib.rcdefaults()
            matplotlib.rcParams.update(_RC)
            return draw(*args, **kwargs)

    return wrapper


@_styled
def metric_png(data: Mapping) -> bytes:
    """The primary metric of every entry: bars from the original's value, coloured by label.

    Entries whose value is not finite get a red cross at the original's value.
    """
    entries = data["entries"]
    primary, better = data["primary"]["metric"], data["primary"]["better"]
    fig = _figure(7.0, 1.2 + 0.22 * len(entries))
    ax = fig.add_subplot()
    colours = _label_colours(data)
    values = np.array([_value(e, primary) for e in entries])  # (entries,)
    finite = np.isfinite(values)
    reference = float(values[0]) if finite[0] else 0.0  # the original's value
    y = np.arange(len(entries))
    ax.barh(
        y[finite],
        values[finite] - reference,
        left=reference,
        color=[colours[e["label"]] for e, ok in zip(entries, finite, strict=True) if ok],
    )
    if not finite.all():
        ax.scatter(np.full(int((~finite).sum()), reference), y[~finite], marker="x", color="red")
    ax.axvline(reference, color=_ORIGINAL, linewidth=1)
    ax.set_yticks(y, [e["id"] for e in entries], fontsize=7)
    ax.invert_yaxis()  # the original on top
    ax.set_xlabel(f"{primary} ({better} is better)")
    ax.set_title(f"{primary.split('/', 1)[1]} of every entry, from the original's value")
    return _png(fig)


@_styled
def frontier_png(data: Mapping) -> bytes:
    """Quality against novelty for every sample, with the baselines' frontier as a staircase."""
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    colours = _label_colours(data)
    primary, better = data["primary"]["metric"], data["primary"]["better"]
    points = [{**p, "novelty": _num(p["novelty"]), "quality": _num(p["quality"])} for p in data["frontier"]["points"]]
    shown = [p for p in points if math.isfinite(p["novelty"]) and math.isfinite(p["quality"])]
    for label in dict.fromkeys(p["label"] for p in shown):
        group = [p for p in shown if p["label"] == label]
        marker, size = {"original": ("X", 80), "candidate": ("*", 140)}.get(group[0]["kind"], ("o", 30))
        ax.scatter(
            [p["novelty"] for p in group],
            [p["quality"] for p in group],
            s=size,
            marker=marker,
            color=colours[label],
            label=label,
            zorder=3,
        )
    # the frontier: at novelty x, the best quality of the baseline samples at least as novel
    on = sorted((p for p in shown if p["frontier"] == "on"), key=lambda p: (p["novelty"], p["id"]))
    if on:
        xs = [0.0] + [p["novelty"] for p in on]
        ys = [on[0]["quality"]] + [p["quality"] for p in on]
        ax.step(
            xs,
            ys,
            where="pre",
            color="0.4",
            linestyle="--",
            linewidth=1,
            label="baselines' frontier",
            zorder=2,
        )
    positive = [p["novelty"] for p in shown if p["novelty"] > 0]
    ax.set_xscale("symlog", linthresh=min(positive) if positive else 0.01)
    if better == "lower":
        ax.invert_yaxis()  # better is up
    ax.set_xlabel("novelty (RMS distance of the group to the nearest training example, in per-tensor stds)")
    ax.set_ylabel(f"{primary.split('/', 1)[1]} ({better} is better; better is up)")
    ax.set_title("quality against novelty")
    _legend(fig, ax)
    return _png(fig)


@_styled
def histogram_png(hist: Mapping, colours: Mapping[str, str] | None = None) -> bytes:
    """Value densities of one tensor: the original, a candidate and the baselines, same bins.

    `colours` maps labels (an entry id without "#<sample>") to colours; others get the palette.
    """
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    edges = np.asarray(hist["edges"])
    widths = np.diff(edges)  # (bins,)
    for i, (entry, counts) in enumerate(hist["counts"].items()):
        c = np.asarray(counts, dtype=np.float64)
        density = c / (c.sum() * widths) if c.sum() else c
        original = entry == "original"
        colour = _ORIGINAL if original else (colours or {}).get(entry.rsplit("#", 1)[0], _colour(i))
        ax.stairs(
            density,
            edges,
            label=entry,
            color=colour,
            linewidth=2.0 if original else 1.2,
            zorder=3 if original else 2,
        )
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    ax.set_title(hist["tensor"])
    _legend(fig, ax)
    return _png(fig)


def _legend(fig: Figure, ax) -> None:
    """The legend beside the axes, in as many columns as keep it within the figure's height
    (inside the axes a legend of 30-40 labels squeezed them to nothing)."""
    n = len(ax.get_legend_handles_labels()[1])
    rows = max(1, int(fig.get_figheight() * 72 / 11))  # lines of 7-point text with spacing
    ncol = max(1, -(-n // rows))
    fig.set_figwidth(fig.get_figwidth() + 1.8 * ncol)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=ncol, frameon=False)


def _label_colours(data: Mapping) -> dict[str, str]:
    labels = [g["label"] for g in data["groups"] if g["kind"] != "original"]
    return {"original": _ORIGINAL} | {label: _colour(i) for i, label in enumerate(labels)}


def _colour(i: int) -> str:
    return _PALETTE[i % len(_PALETTE)]


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return buf.getvalue()
