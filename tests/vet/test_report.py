"""Tests for the vet stage and its report (weightsmith.vet.report, weightsmith.vet.plots).

A tiny byte-level GPT-2 is trained for a few seconds on Python source (the `json` package's
decoder and encoder), so that it predicts held-out Python (`json/__init__.py`) far better
than chance; three snapshots of the training run form a zoo (K = 3, the last one is the
original). The baselines come from the real generators (weightsmith.generators) and are
written as model folders, as the assembler would.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.errors import WeightsmithError
from weightsmith.generators import Examples, SampleSpec
from weightsmith.generators import get as generator
from weightsmith.store import Store
from weightsmith.vet import (
    FRONTIER,
    Context,
    Entry,
    EntryResult,
    Report,
    baseline_label,
    noise_radii,
    vet,
)
from weightsmith.vet.report import _groups, _verdicts, frontier

pytestmark = pytest.mark.usefixtures("one_thread")

TENSORS = ("transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight")
TRAIN = inspect.getsource(json.decoder) + inspect.getsource(json.encoder)
HELD_OUT = inspect.getsource(json)
SNAPSHOTS = (100, 150, 200)  # training steps kept in the zoo; the last is the original
OPTIONS = {"lm-perplexity": {"max_tokens": 4000}}
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(the trained model's folder, the zoo: per replaced tensor its (K, ...) snapshots)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("trained")
    model = AutoModelForCausalLM.from_pretrained(build_gpt2(root / "init", *SIZES["tiny"]), local_files_only=True)
    data = torch.tensor(list(TRAIN.encode()))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    snapshots = []
    for step in range(1, SNAPSHOTS[-1] + 1):
        starts = torch.randint(0, len(data) - 65, (8,))
        x = torch.stack([data[s : s + 64] for s in starts])  # (8, 64) bytes
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in SNAPSHOTS:
            state = model.state_dict()
            snapshots.append({n: state[n].detach().numpy().copy() for n in TENSORS})
    model.save_pretrained(root / "original")
    zoo = {n: np.stack([s[n] for s in snapshots]) for n in TENSORS}
    return root / "original", zoo


def make_entries(original: Path, zoo: dict, out: Path, seed: int) -> list[Entry]:
    """A toy candidate (noise of radius 0.03) and every baseline, as model folders."""
    one = {n: zoo[n][-1:] for n in TENSORS}  # the original alone (K = 1)
    plan = [  # (label, kind, generator, config, samples, examples)
        ("toy", "candidate", "noise", {"radius": 0.03}, 2, one),
        ("gaussian", "baseline", "gaussian", {}, 2, one),
        ("permute", "baseline", "permute", {}, 2, one),
        *[
            (baseline_label("noise", {"radius": r}), "baseline", "noise", {"radius": r}, 1, one)
            for r in noise_radii([0.03])
        ],
        ("coord-gaussian", "baseline", "coord-gaussian", {}, 1, zoo),
        ("pca-gaussian", "baseline", "pca-gaussian", {}, 1, zoo),
        ("average(k=2)", "baseline", "average", {"k": 2}, 1, zoo),
    ]
    entries = []
    for i, (label, kind, name, config, n, examples) in enumerate(plan):
        gen = generator(name)()
        drawn = {}
        for t in TENSORS:
            state = gen.fit(Examples(t, examples[t]), config)
            drawn[t] = gen.sample(state, n, SampleSpec(zoo[t].shape[1:]), seed=seed + i).arrays
        for k in range(n):
            folder = out / f"{label}-{k}"
            shutil.copytree(original, folder)
            weights = load_file(folder / "model.safetensors")
            weights.update({t: drawn[t][k] for t in TENSORS})
            save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
            entries.append(Entry(label, kind, name, k, folder, params=config))
    return entries


def context_for(original: Path, zoo: dict) -> Context:
    return Context(
        original=Entry("original", "original", "original", 0, original),
        tensors=TENSORS,
        text=HELD_OUT,
        text_source="json/__init__.py",
        examples=zoo,
    )


def run(trained, out: Path, seed: int = 0, **kwargs) -> Report:
    original, zoo = trained
    entries = make_entries(original, zoo, out, seed)
    kwargs.setdefault("options", OPTIONS)
    return vet(context_for(original, zoo), entries, run_id="r1", model="tiny-gpt2", **kwargs)


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory: pytest.TempPathFactory) -> Report:
    return run(trained, tmp_path_factory.mktemp("entries"))


def by_id(report: Report) -> dict[str, EntryResult]:
    return {e.id: e for e in report.entries}


# --- what the numbers say -----------------------------------------------------------------


def test_the_original_scores_better_than_gaussian_and_permute(report: Report) -> None:
    assert report.primary == "lm-perplexity/nll_per_byte" and report.better == "lower"
    entries = by_id(report)
    best = entries["original"].metric(report.primary)
    assert best < math.log(256) - 1.5  # trained: far better than chance
    for e in report.entries:
        if e.generator in ("gaussian", "permute"):
            assert best < e.metric(report.primary), e.id


def test_weight_stats_numbers(report: Report, trained: tuple[Path, dict[str, np.ndarray]]) -> None:
    entries = by_id(report)
    # noise's radius is in the original's std, novelty in the zoo's pooled std
    _, zoo = trained
    scale = float(np.mean([zoo[t][-1].std() / zoo[t].std() for t in TENSORS]))
    own = entries["original"].metrics["weight-stats"]
    assert own["rel_l2"] == 0.0 and own["novelty"] == 0.0  # the original is in the zoo
    for e in report.entries:
        stats = e.metrics["weight-stats"]
        assert math.isfinite(stats["novelty"]) and math.isfinite(stats["typical_distance"]), e.id
        assert set(e.per_tensor["weight-stats"]) == set(TENSORS)
    for r in noise_radii([0.03]):  # noise of radius r lies at novelty ~ r (in the zoo's std)
        novelty = entries[f"{baseline_label('noise', {'radius': r})}#0"].metric("weight-stats/novelty")
        assert novelty == pytest.approx(r * scale, rel=0.2)


def test_verdicts_name_the_baselines_each_candidate_beats(report: Report) -> None:
    entries = by_id(report)
    baselines = [g.label for g in report.groups if g.kind == "baseline"]
    assert [v.candidate for v in report.verdicts] == ["toy#0", "toy#1"]
    for v in report.verdicts:
        assert {"gaussian", "permute"} <= set(v.beats)
        assert sorted(v.beats + v.does_not_beat) == sorted(baselines)  # each baseline once
        value = entries[v.candidate].metric(report.primary)
        for g in report.groups:
            if g.label in v.beats:
                assert value < g.mean
            elif g.label in v.does_not_beat:
                assert value >= g.mean
        assert v.sentence.startswith(f"candidate {v.candidate} beats ")
        assert v.frontier in ("beyond", "inside")


def test_frontier_statuses_follow_the_definition(report: Report) -> None:
    points = {p.id: p for p in report.points}
    baselines = [p for p in report.points if p.kind == "baseline"]
    assert points["original"].frontier is None
    for p in report.points:
        if p.kind == "original":
            continue
        dominated = any(b.novelty >= p.novelty and b.quality < p.quality for b in baselines)
        expected = {"candidate": ("inside", "beyond"), "baseline": ("off", "on")}[p.kind]
        assert p.frontier == expected[0 if dominated else 1], p.id


def test_frontier_on_hand_made_points() -> None:
    def result(id_: str, kind: str, quality: float, novelty: float) -> EntryResult:
        metrics = {"lm-perplexity": {"nll_per_byte": quality}, "weight-stats": {"novelty": novelty}}
        return EntryResult(id_, id_, kind, id_, 0, {}, metrics, {})

    points = frontier(
        [
            result("original", "original", 2.0, 0.0),
            result("b-near", "baseline", 3.0, 0.1),
            result("b-far", "baseline", 3.5, 1.0),
            result("b-worse", "baseline", 3.2, 0.05),  # b-near is more novel and better
            result("c-beyond", "candidate", 3.2, 0.5),  # only b-far is as novel, and worse
            result("c-inside", "candidate", 3.1, 0.05),  # b-near is as novel and better
            result("c-tie", "candidate", 3.0, 0.1),  # equal to b-near: not dominated
            result("c-nan", "candidate", math.nan, 0.2),
        ],
        "lm-perplexity/nll_per_byte",
        "lower",
    )
    status = {p.id: p.frontier for p in points}
    assert status == {
        "original": None,
        "b-near": "on",
        "b-far": "on",
        "b-worse": "off",
        "c-beyond": "beyond",
        "c-inside": "inside",
        "c-tie": "beyond",
        "c-nan": None,
    }


def test_beyond_only_by_novelty_is_said_plainly() -> None:
    def result(id_: str, kind: str, quality: float, novelty: float) -> EntryResult:
        metrics = {"lm-perplexity": {"nll_per_byte": quality}, "weight-stats": {"novelty": novelty}}
        return EntryResult(id_, id_, kind, id_, 0, {}, metrics, {})

    entries = [
        result("original", "original", 2.0, 0.0),
        result("b-far", "baseline", 3.0, 1.0),
        result("c-far-worse", "candidate", 3.5, 1.5),  # beyond only because nothing is as novel
        result("c-far-better", "candidate", 2.9, 1.5),  # more novel and better: plainly beyond
        result("c-mid", "candidate", 2.5, 0.5),  # b-far is as novel and worse: plainly beyond
    ]
    primary = "lm-perplexity/nll_per_byte"
    points = frontier(entries, primary, "lower")
    groups = _groups(entries, primary, "lower")
    sentences = {v.candidate: v.sentence for v in _verdicts(entries, groups, points, primary, "lower")}
    assert all("beyond" in s for s in sentences.values())
    assert "only because no baseline is as novel: b-far" in sentences["c-far-worse"]
    assert "only because" not in sentences["c-far-better"]
    assert "only because" not in sentences["c-mid"]


# --- the report's views -------------------------------------------------------------------


def test_report_is_complete(report: Report) -> None:
    labels = [
        "original",
        "toy",
        "gaussian",
        "permute",
        *[baseline_label("noise", {"radius": r}) for r in noise_radii([0.03])],
        "coord-gaussian",
        "pca-gaussian",
        "average(k=2)",
    ]
    assert [g.label for g in report.groups] == labels
    assert report.entries[0].id == "original" and len(report.points) == len(report.entries)
    for e in report.entries:
        assert set(e.metrics) == {"lm-perplexity", "weight-stats"}
        assert {"nll_per_byte", "nll_per_token"} <= set(e.metrics["lm-perplexity"])
        assert all(math.isfinite(v) for v in e.metrics["lm-perplexity"].values())
    assert [h.tensor for h in report.histograms] == list(TENSORS)
    for h in report.histograms:  # the original, one candidate and one sample per baseline
        assert list(h.counts) == ["original", "toy#0", *[f"{b}#0" for b in labels[2:]]]
        assert all(sum(c) == np.prod(h_shape(h.tensor)) for c in h.counts.values())

    data = json.loads(report.to_json(), parse_constant=pytest.fail)  # no NaN or Infinity
    assert data["primary"] == {"metric": "lm-perplexity/nll_per_byte", "better": "lower"}
    assert data["frontier"]["definition"] == FRONTIER
    assert data["text"]["sha256"] and data["created"] is None
    assert "folder" not in json.dumps(data)  # no local paths in the report
    assert len(data["verdicts"]) == 2 and data["plots"] == report.plot_files


def h_shape(name: str) -> tuple[int, ...]:
    return {TENSORS[0]: (64,), TENSORS[1]: (64, 192)}[name]


def test_markdown_states_the_verdicts_and_shows_the_plots(report: Report) -> None:
    md = report.to_markdown()
    for g in report.groups:
        assert f"| {g.label} |" in md
    for v in report.verdicts:
        assert v.sentence in md
    for path in report.plot_files:
        assert f"]({path})" in md
    assert FRONTIER in md


def test_table_rows_are_flat(report: Report) -> None:
    rows = report.table()
    assert [r["entry"] for r in rows] == [e.id for e in report.entries]
    assert len({tuple(r) for r in rows}) == 1  # the same columns in every row
    for row in rows:
        assert all(v is None or isinstance(v, str | int | float) for v in row.values())
    toy = rows[1]
    assert toy["verdict"] == report.verdicts[0].sentence and toy["frontier"] in ("beyond", "inside")
    assert rows[0]["lm-perplexity/nll_per_byte"] < rows[2]["lm-perplexity/nll_per_byte"]


def test_write_puts_the_report_in_the_store(report: Report, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    keys = report.write(store, "models/tiny-gpt2/abc")
    base = "models/tiny-gpt2/abc/reports/r1"
    assert keys[-1] == f"{base}/report.json"  # written last: its presence means complete
    assert sorted(keys) == store.list(base)
    assert store.read_bytes(f"{base}/report.json").decode() == report.to_json()
    assert store.read_bytes(f"{base}/report.md").decode() == report.to_markdown()
    for path in report.plot_files:
        assert store.read_bytes(f"{base}/{path}").startswith(PNG)


def test_writing_the_same_report_again_rewrites_nothing(report: Report, tmp_path: Path) -> None:
    store = Store(str(tmp_path / "store"))
    keys = report.write(store, "m")
    png = tmp_path / "store" / keys[0]
    before = png.stat().st_mtime_ns
    assert report.write(store, "m") == keys
    assert png.stat().st_mtime_ns == before  # not rewritten: the same report.json and every file
    png.unlink()  # a lost plot: written again
    report.write(store, "m")
    assert png.read_bytes().startswith(PNG)


# --- determinism --------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_report(trained, report: Report, tmp_path: Path) -> None:
    again = run(trained, tmp_path / "again")
    assert again.to_json() == report.to_json()
    assert again.to_markdown() == report.to_markdown()
    assert again.plots() == report.plots()  # the PNGs too, byte for byte


def test_another_seed_gives_other_numbers(trained, report: Report, tmp_path: Path) -> None:
    other = run(trained, tmp_path / "other", seed=7, evaluators=["weight-stats"], options={})
    assert other.primary == "weight-stats/rel_l2" and other.better == "lower"
    novelty = {e.id: e.metric("weight-stats/novelty") for e in report.entries}
    changed = [e.id for e in other.entries if e.metric("weight-stats/novelty") != novelty[e.id]]
    assert changed == [e.id for e in other.entries[1:]]  # every sample, not the original


# --- refusals -----------------------------------------------------------------------------


def test_vet_refuses_bad_requests(trained, tmp_path: Path) -> None:
    original, zoo = trained
    context = context_for(original, zoo)
    same = Entry("toy", "candidate", "noise", 0, original)
    with pytest.raises(WeightsmithError, match="unique"):
        vet(context, [same, same], run_id="r1", model="m")
    with pytest.raises(WeightsmithError, match="original comes from the context"):
        vet(context, [context.original], run_id="r1", model="m")
    with pytest.raises(WeightsmithError, match="run id"):
        vet(context, [same], run_id="../r1", model="m")
    with pytest.raises(WeightsmithError, match="does not apply"):
        vet(context, [same], run_id="r1", model="m", evaluators=["embedding-similarity"])
    with pytest.raises(WeightsmithError, match="weight-stats is needed"):
        vet(context, [same], run_id="r1", model="m", evaluators=["lm-perplexity"])
    with pytest.raises(WeightsmithError, match="one kind"):
        vet(context, [same, Entry("toy", "baseline", "noise", 1, original)], run_id="r", model="m")
