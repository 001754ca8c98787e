"""A model family in the store: K fine-tunes as a zoo, 2 more as the gold reference, and a text.

`build_family(store, base, plan, zoo_seed)` makes (cached at every step) what the demo and the
science bench vet on:
- kind "finetune": K + 2 fine-tunes of the base model's chosen group, one per standard-library
  slice chosen by the zoo seed (`finetune.slices`), each extracted into the store; the first K
  become the zoo (`zoo build` with the base model, so the merge baselines apply), the last 2 the
  gold zoo (real fine-tunes the generators never saw). The held-out text is `per_slice` bytes of
  held-out files from each of the K + 2 slices.
- kind "independent": K + 2 runs of the group from independent random initialisations, trained
  on the base model's corpus with their own seeds, aligned by permutation of the MLP's hidden
  units (`zoo build --align permutation`; the gold runs with `--align-to` the zoo's member 0, so
  their weight novelty is measured in the zoo's order of units); no base (the members share
  none). The text is the
  base model's held-out text, cut to the same size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from weightsmith.demo.finetune import (
    FineTuneSpec,
    block_costs,
    choose_block,
    fine_tune,
    group_patterns,
    slice_text,
    slices,
)

if TYPE_CHECKING:
    from weightsmith.pipeline import PipelineOptions


@dataclass(frozen=True)
class FamilyPlan:
    """The size of a family: members, gold fine-tunes, steps and text."""

    kind: Literal["finetune", "independent"] = "finetune"
    members: int = 6  # K, the zoo
    gold: int = 2  # kept out of the zoo: the reference
    steps: int = 100  # optimiser steps per fine-tune
    lr: float = 1e-3
    per_slice: int = 2_000  # held-out bytes scored per slice


@dataclass(frozen=True)
class Family:
    """What `build_family` made."""

    zoo: str  # zoo id of the K members
    gold: str  # zoo id of the gold fine-tunes
    block: int  # the predicted block
    patterns: tuple[str, ...]  # its tensors
    costs: dict[int, float]  # Gaussian-replacement cost of every block (nats/byte)
    slices: tuple[str, ...]  # the slices of the members, then of the gold (fine-tunes)
    text: str  # path of the held-out text
    base_url: str  # the base model in the store

    def pipeline_options(self, store: str, name: str, images: str, **choices) -> PipelineOptions:
        """The pipeline run that vets this family: its group, zoo, gold and text, every stage;
        `choices`: generators, generator_config, samples, fit_seeds, device."""
        from weightsmith.pipeline import PipelineOptions

        return PipelineOptions(
            store=store,
            name=name,
            stages=("extract", "predict", "weight-stats", "lm-eval"),
            layers=(self.patterns,),
            zoo=self.zoo,
            reference=self.gold,
            joint=True,
            text=self.text,
            images=images,
            **choices,
        )


def build_family(
    store: str,
    base: Path,
    plan: FamilyPlan,
    zoo_seed: int,
    images: str = "preview",
    progress=lambda done, total: None,
) -> Family:
    """Fine-tune (or train from scratch), extract and build both zoos; everything cached.

    `images`: as the pipeline will extract the base (the same revision with another manifest is
    refused).
    """
    from weightsmith.extract import ExtractOptions, extract
    from weightsmith.zoo.build import ZooOptions, build_zoo

    base = Path(base)
    facts_path = base / "blocks.json"
    if facts_path.exists():
        costs = {int(k): v for k, v in json.loads(facts_path.read_text()).items()}
    else:
        costs = block_costs(base)
        facts_path.write_text(json.dumps(costs))
    block = choose_block(costs)
    patterns = group_patterns(block)
    tag = f"{base.name}-{plan.kind}-k{plan.members}-s{zoo_seed}"
    total = plan.members + plan.gold
    if plan.kind == "finetune":
        chosen = slices(total, zoo_seed)
        names = tuple(s.name for s in chosen)
        datas = [s.read("train") for s in chosen]
        text = slice_text(chosen, plan.per_slice)
    else:
        from weightsmith.demo.train import LMSpec, corpus

        spec = LMSpec(**json.loads((base / "training.json").read_text())["spec"])
        names = tuple(f"init{i}" for i in range(total))
        train, held = corpus(spec.train_bytes, spec.heldout_bytes)
        datas = [train] * total
        text = held[: plan.per_slice * total].decode("utf-8", errors="ignore").encode("utf-8")
    folder = base.parent / f"family-{tag}"
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    base_url = extract(str(base), ExtractOptions(store=store, name=base.name, images=images)).model_url
    for i, (name, data) in enumerate(zip(names, datas, strict=True)):
        spec = FineTuneSpec(
            slice=name,
            seed=1000 * zoo_seed + i,
            steps=plan.steps,
            lr=plan.lr,
            reinit=plan.kind == "independent",
        )
        out = folder / f"m{i}-{name}"
        fine_tune(base, out, block, spec, data)
        urls.append(extract(str(out), ExtractOptions(store=store, name=f"{tag}-m{i}", images="none")).model_url)
        progress(i + 1, total)
    with_base = base_url if plan.kind == "finetune" else None
    zoo_id, gold_id = f"{tag}", f"{tag}-gold"
    for zid, members, align_to in ((zoo_id, urls[: plan.members], None), (gold_id, urls[plan.members :], urls[0])):
        options = ZooOptions(zoo_id=zid, models=tuple(members), store=store, include=patterns, base=with_base)
        if plan.kind == "independent":  # the gold is aligned to the zoo's member 0, as the zoo is
            options = options.model_copy(update={"align": "permutation", "align_to": align_to})
        build_zoo(options)
    text_path = folder / "heldout.txt"
    if not text_path.exists() or text_path.read_bytes() != text:
        text_path.write_bytes(text)
    return Family(zoo_id, gold_id, block, patterns, costs, names, str(text_path), base_url)
