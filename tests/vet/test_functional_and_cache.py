"""Functional novelty (weightsmith.vet.functional via lm-perplexity), group novelty, and the score
cache (weightsmith.vet.cache), on a tiny random byte-level GPT-2 written as model folders."""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.store import Store
from weightsmith.vet import Context, Entry, ScoreCache, vet
from weightsmith.vet.weight_stats import group_novelty

pytestmark = pytest.mark.usefixtures("one_thread")

TENSORS = ("transformer.h.0.attn.c_attn.weight", "transformer.wte.weight")
TEXT = inspect.getsource(json)[:3000]
OPTIONS = {"lm-perplexity": {"probe_tokens": 512, "max_tokens": 2000}}


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2(tmp_path_factory.mktemp("gpt") / "original", *SIZES["tiny"])


def noised(original: Path, out: Path, radius: float, seed: int = 0) -> Path:
    """A copy of the original with noise of `radius` (x each tensor's std) on TENSORS."""
    shutil.copytree(original, out)
    values = load_file(out / "model.safetensors")
    rng = np.random.default_rng(seed)
    for name in TENSORS:
        v = values[name]
        values[name] = (v + radius * v.std() * rng.standard_normal(v.shape)).astype(v.dtype)
    save_file(values, out / "model.safetensors", metadata={"format": "pt"})
    return out


def entries(original: Path, tmp: Path, radii=(0.1, 1.0)) -> tuple[Context, list[Entry]]:
    orig = Entry("original", "original", "original", 0, original)
    context = Context(original=orig, tensors=TENSORS, text=TEXT, text_source="json/__init__.py")
    out = [
        Entry(f"noise(r={r:g})", "baseline", "noise", 0, noised(original, tmp / f"r{r:g}", r), params={"radius": r})
        for r in radii
    ]
    return context, out


def test_functional_novelty_is_zero_for_the_model_itself_and_grows_with_noise(original: Path, tmp_path: Path) -> None:
    context, noisy = entries(original, tmp_path)
    report = vet(context, noisy, run_id="f1", model="tiny", options=OPTIONS)
    fn = {e.id: e.metric("lm-perplexity/functional_novelty") for e in report.entries}
    assert fn["original"] == pytest.approx(0.0, abs=1e-9)  # against itself (K = 1: the original)
    assert 0.0 < fn["noise(r=0.1)#0"] < fn["noise(r=1)#0"] <= math.log(2)
    novelty = {e.id: e.metric("weight-stats/novelty") for e in report.entries}
    assert novelty["original"] == 0.0
    assert novelty["noise(r=0.1)#0"] == pytest.approx(0.1, rel=0.1)  # group novelty in std units
    assert novelty["noise(r=1)#0"] == pytest.approx(1.0, rel=0.1)
    assert all(e.metric("lm-perplexity/functional_upper_bound") == 0.0 for e in report.entries)


def test_group_novelty_is_to_one_example_not_per_tensor(original: Path) -> None:
    # A sample that takes tensor A from example 0 and B from example 1 is near no single example.
    a = load_file(original / "model.safetensors")
    rng = np.random.default_rng(0)
    ex = {n: np.stack([a[n], a[n] + a[n].std() * rng.standard_normal(a[n].shape)]) for n in TENSORS}
    mixed = {TENSORS[0]: ex[TENSORS[0]][0], TENSORS[1]: ex[TENSORS[1]][1]}
    assert group_novelty({n: ex[n][1] for n in TENSORS}, ex) == 0.0
    assert group_novelty(mixed, ex) > 0.3


def test_more_members_than_all_members_compares_the_nearest_only(original: Path, tmp_path: Path) -> None:
    a = load_file(original / "model.safetensors")
    rng = np.random.default_rng(1)
    k = 5
    zoo = {
        n: np.stack([a[n] + 0.3 * i * a[n].std() * rng.standard_normal(a[n].shape) for i in range(k)]) for n in TENSORS
    }
    orig = Entry("original", "original", "original", 0, original)
    context = Context(original=orig, tensors=TENSORS, text=TEXT, examples=zoo)
    options = {"lm-perplexity": {"probe_tokens": 256, "max_tokens": 1000, "all_members": 3, "nearest": 2}}
    report = vet(context, [], run_id="f2", model="tiny", options=options)
    original_row = report.entries[0]
    assert original_row.metric("lm-perplexity/functional_upper_bound") == 1.0
    assert original_row.metric("lm-perplexity/functional_novelty") == pytest.approx(0.0, abs=1e-9)  # member 0
    assert original_row.metric("weight-stats/nearest") == 0.0


def test_a_rerun_scores_nothing_it_scored(original: Path, tmp_path: Path) -> None:
    context, noisy = entries(original, tmp_path, radii=(0.3,))
    store = Store(str(tmp_path / "store"))
    calls: list[str] = []
    first = vet(
        context,
        noisy,
        run_id="c1",
        model="tiny",
        options=OPTIONS,
        cache=ScoreCache(store, "scores"),
        progress=calls.append,
    )
    evaluations = len(calls)
    assert evaluations == 2 * len(first.evaluators)  # the original and one baseline, each evaluator
    assert first.cache == {"hits": 0, "misses": evaluations}
    calls.clear()
    # a new process would build new objects: new entries and context, same content
    context2, noisy2 = entries(original, tmp_path / "again", radii=(0.3,))
    again = vet(
        context2,
        noisy2,
        run_id="c1",
        model="tiny",
        options=OPTIONS,
        cache=ScoreCache(store, "scores"),
        progress=calls.append,
    )
    assert calls == []  # no evaluator ran
    assert again.cache == {"hits": evaluations, "misses": 0}
    assert again.to_json() == first.to_json()
    # another evaluator config is another key: scored again
    other = {"lm-perplexity": {"probe_tokens": 512, "max_tokens": 1500}}
    vet(
        context2,
        noisy2,
        run_id="c2",
        model="tiny",
        options=other,
        cache=ScoreCache(store, "scores"),
        progress=calls.append,
    )
    assert calls and all(c.startswith("lm-perplexity") for c in calls)


def test_js_divergence_matches_its_definition() -> None:
    from weightsmith.vet.functional import js_divergence

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 50, 7))
    p_log = a - np.log(np.exp(a).sum(-1, keepdims=True))
    q_log = b - np.log(np.exp(b).sum(-1, keepdims=True))
    p, q = np.exp(p_log), np.exp(q_log)
    m = (p + q) / 2
    hand = (0.5 * (p * np.log(p / m)).sum(-1) + 0.5 * (q * np.log(q / m)).sum(-1)).mean()
    assert js_divergence(p_log, q_log) == pytest.approx(hand, rel=1e-10)
    assert js_divergence(p_log, p_log) == 0.0
    assert js_divergence(np.log([[1.0, 1e-300]]), np.log([[1e-300, 1.0]])) == pytest.approx(math.log(2))


def test_large_vocabularies_take_the_chunked_path_to_the_same_number() -> None:
    from weightsmith.vet.functional import Distribution, _js

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 600, 9))
    p_log = (a - np.log(np.exp(a).sum(-1, keepdims=True))).astype(np.float32)
    q_log = (b - np.log(np.exp(b).sum(-1, keepdims=True))).astype(np.float32)
    fast = _js(Distribution.of(p_log), Distribution.of(q_log))
    chunked_p, chunked_q = Distribution.of(p_log, in_memory=10), Distribution.of(q_log, in_memory=10)
    assert chunked_p.probs is None  # only the float32 log-probabilities are kept
    assert _js(chunked_p, chunked_q) == pytest.approx(fast, rel=1e-9)
    assert _js(chunked_p, Distribution.of(p_log)) == pytest.approx(0.0, abs=1e-12)  # mixed paths
