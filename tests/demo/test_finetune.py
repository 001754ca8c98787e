"""The demo's family: standard-library slices, block choice, fine-tunes of one group."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from weightsmith.demo.finetune import (
    FineTuneSpec,
    all_slices,
    block_costs,
    choose_block,
    fine_tune,
    group_patterns,
    slice_text,
    slices,
)
from weightsmith.demo.train import SPECS, corpus, heldout_file


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A randomly initialised tiny byte-level GPT-2 in the demo's layout (training.json, heldout.txt)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    spec = SPECS["tiny"]
    folder = tmp_path_factory.mktemp("base") / "demo-base-tiny"
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=spec.context, n_embd=spec.width, n_layer=spec.layers, n_head=spec.heads
    )
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    (folder / "training.json").write_text(json.dumps({"spec": asdict(spec)}))
    (folder / "heldout.txt").write_bytes(corpus(20_000, 20_000)[1])
    return folder


def test_slices_are_packages_split_like_the_base_corpus() -> None:
    every = all_slices()
    assert len(every) >= 8  # the demo needs K + 2 = 8
    for s in every:
        assert all(rel.split("/")[0] == s.name for rel in s.train + s.held)
        assert all(heldout_file(rel) for rel in s.held) and not any(heldout_file(rel) for rel in s.train)
        assert s.train_bytes >= 40_000 and s.held_bytes >= 10_000
    assert [x.name for x in slices(8, 0)] == [x.name for x in slices(8, 0)]  # a seed fixes the slices
    assert [x.name for x in slices(8, 0)] != [x.name for x in slices(8, 1)]
    chosen = slices(3, 0)
    text = slice_text(chosen, 1_000)
    assert 2_990 <= len(text) <= 3_000  # equal bytes per slice (a cut character dropped at most)
    assert text.startswith(chosen[0].read("held", 100))


def test_block_costs_and_choice(base: Path) -> None:
    costs = block_costs(base)
    assert set(costs) == {0, 1} and all(np.isfinite(c) for c in costs.values())
    assert choose_block({0: 0.3, 1: 0.06, 2: 0.01}) == 1  # the deepest block costing >= 0.05
    assert choose_block({0: 0.01, 1: 0.02}) == 1  # none does: the costliest


@pytest.mark.parametrize("reinit", [False, True])
def test_fine_tune_changes_only_the_group(base: Path, tmp_path: Path, reinit: bool) -> None:
    data = slices(1, 0)[0].read("train", 50_000)
    spec = FineTuneSpec(slice="x", seed=3, steps=4, reinit=reinit)
    facts = fine_tune(base, tmp_path / "ft", 1, spec, data)
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "ft" / "model.safetensors")
    prefixes = tuple(p.rstrip("*") for p in group_patterns(1))
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and all(n.startswith(prefixes) for n in changed), changed
    assert {n for n in before if n.startswith(prefixes) and n.endswith(".weight") and ".ln_" not in n} <= changed
    if reinit:  # a fresh init is far from the base, a fine-tune near it
        w = "transformer.h.1.mlp.c_fc.weight"
        assert np.abs(after[w] - before[w]).mean() > 0.5 * np.abs(before[w]).mean()
    # cached: the same spec is not trained again; another spec is
    mtime = (tmp_path / "ft" / "model.safetensors").stat().st_mtime_ns
    assert fine_tune(base, tmp_path / "ft", 1, spec, data) == facts
    assert (tmp_path / "ft" / "model.safetensors").stat().st_mtime_ns == mtime
    fine_tune(base, tmp_path / "ft", 1, FineTuneSpec(slice="x", seed=4, steps=4, reinit=reinit), data)
    assert not np.array_equal(
        load_file(tmp_path / "ft" / "model.safetensors")["transformer.h.1.mlp.c_fc.weight"],
        after["transformer.h.1.mlp.c_fc.weight"],
    )
