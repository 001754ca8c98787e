"""Fine-tunes of one block of the demo's model: a zoo that is a distribution of models.

Leaderboard fine-tunes of one base differ because they saw different data. The demo makes such a
family offline: each fine-tune starts from the base model, trains only the chosen group (one MLP
block and its LayerNorm; everything else frozen) on one *slice* of the standard library's
sources (the files of one top-level package), and keeps its final weights. A zoo seed picks the
slices and the fine-tunes' seeds.

- `slices()`: the packages with enough text, each split into train and held-out files by the
  same file-name hash as the base model's corpus (`train.heldout_file`), so no held-out file
  was ever trained on, by the base or by a fine-tune.
- `block_costs()` / `choose_block()`: how much held-out NLL each block's MLP group loses when
  its tensors are replaced by Gaussian draws of their own mean and std; the demo predicts a
  block where that costs at least `MIN_COST` nats/byte (where replacing weights matters).
- `fine_tune()`: one fine-tune, saved in the Hugging Face layout with `finetune.json`; cached.
  `reinit=True` instead starts the group from a fresh random initialisation (independent runs,
  the science bench's aligned zoo).
- `slice_text()`: equal bytes of held-out text from each slice, for scoring.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from weightsmith.demo.train import LMSpec, heldout_file, heldout_nll
from weightsmith.errors import WeightsmithError

MIN_COST = 0.05  # nats/byte a Gaussian replacement of the predicted group must cost at least
MIN_TRAIN_BYTES = 40_000  # a package is a slice when it has this much training text ...
MIN_HELD_BYTES = 10_000  # ... and this much held-out text


@dataclass(frozen=True)
class Slice:
    """A top-level package of the standard library, its files split into train and held-out."""

    name: str
    train: tuple[str, ...]  # paths relative to the standard library
    held: tuple[str, ...]
    train_bytes: int
    held_bytes: int

    def read(self, part: str, limit: int | None = None) -> bytes:
        root = _stdlib()
        data = b"".join((root / rel).read_bytes() for rel in (self.train if part == "train" else self.held))
        return data if limit is None else data[:limit]


@dataclass(frozen=True)
class FineTuneSpec:
    """One fine-tune: its slice, seed and budget."""

    slice: str
    seed: int
    steps: int = 100
    lr: float = 1e-3  # AdamW, cosine decay to 10% over the steps
    batch: int = 16
    reinit: bool = False  # start the group from a fresh random initialisation, not the base


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def all_slices(min_train: int = MIN_TRAIN_BYTES, min_held: int = MIN_HELD_BYTES) -> list[Slice]:
    """Every package with enough train and held-out text, by name."""
    root = _stdlib()
    files: dict[str, tuple[list[str], list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if len(parts) < 2 or "site-packages" in rel or parts[0].startswith("test") or parts[0].startswith("_"):
            continue
        train, held = files.setdefault(parts[0], ([], []))
        (held if heldout_file(rel) else train).append(rel)
    out = []
    for name, (train, held) in sorted(files.items()):
        tb = sum((root / r).stat().st_size for r in train)
        hb = sum((root / r).stat().st_size for r in held)
        if tb >= min_train and hb >= min_held:
            out.append(Slice(name, tuple(train), tuple(held), tb, hb))
    return out


def slices(count: int, seed: int) -> list[Slice]:
    """`count` slices chosen by `seed` (the same seed, the same slices, in the same order)."""
    every = all_slices()
    if len(every) < count:
        raise WeightsmithError("standard library", f"only {len(every)} packages have enough text, {count} needed")
    order = np.random.default_rng(seed).permutation(len(every))[:count]
    return [every[i] for i in order]


def slice_text(chosen: list[Slice], per_slice: int) -> bytes:
    """`per_slice` held-out bytes of each slice, concatenated (cut at a UTF-8 character boundary)."""
    out = bytearray()
    for s in chosen:
        data = s.read("held", per_slice)
        if len(data) < per_slice:
            raise WeightsmithError(s.name, f"has {len(data)} held-out bytes, {per_slice} needed")
        out += data.decode("utf-8", errors="ignore").encode("utf-8")
    return bytes(out)


def group_patterns(block: int) -> tuple[str, ...]:
    """The predicted group of block `block`: its MLP and the LayerNorm in front of it."""
    return (f"transformer.h.{block}.ln_2.*", f"transformer.h.{block}.mlp.*")


def _group_params(model, block: int) -> dict:
    pats = group_patterns(block)
    return {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in pats)}


def block_costs(folder: Path, draws: int = 2, seed: int = 0) -> dict[int, float]:
    """Per block: held-out NLL (nats/byte) with its group drawn from N(mean, std) of each tensor,
    minus the base model's, averaged over `draws` draws."""
    import torch
    from transformers import GPT2LMHeadModel

    folder = Path(folder)
    spec = LMSpec(**json.loads((folder / "training.json").read_text())["spec"])
    held = np.frombuffer((folder / "heldout.txt").read_bytes(), np.uint8)
    model = GPT2LMHeadModel.from_pretrained(folder)
    base = heldout_nll(model, held, spec.context)
    gen = torch.Generator().manual_seed(seed)
    costs = {}
    for block in range(model.config.n_layer):
        params = _group_params(model, block)
        saved = {n: p.detach().clone() for n, p in params.items()}
        total = 0.0
        for _ in range(draws):
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n].mean() + saved[n].std() * torch.randn(p.shape, generator=gen))
            total += heldout_nll(model, held, spec.context) - base
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
        costs[block] = total / draws
    return costs


def choose_block(costs: dict[int, float], threshold: float = MIN_COST) -> int:
    """The deepest block whose Gaussian replacement costs at least `threshold`, else the costliest."""
    qualifying = [b for b, c in costs.items() if c >= threshold]
    return max(qualifying) if qualifying else max(costs, key=costs.get)


def fine_tune(base: Path, out: Path, block: int, spec: FineTuneSpec, data: bytes) -> dict:
    """Train block `block`'s group from the base (or a fresh init) on `data`; save to `out`.

    Cached: an `out` folder with the same spec in its finetune.json is reused.
    """
    import torch
    from transformers import GPT2LMHeadModel

    from weightsmith.demo.train import _batches

    out = Path(out)
    facts_path = out / "finetune.json"
    want = {"base": str(base), "block": block, **asdict(spec)}
    if facts_path.exists() and (out / "model.safetensors").exists():
        facts = json.loads(facts_path.read_text())
        if facts.get("spec") == want:
            return facts
    lm = LMSpec(**json.loads((Path(base) / "training.json").read_text())["spec"])
    model = GPT2LMHeadModel.from_pretrained(base)
    params = _group_params(model, block)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    torch.manual_seed(spec.seed)
    if spec.reinit:
        _reinit(params, model.config, torch.Generator().manual_seed(spec.seed))
    ids = np.frombuffer(data, np.uint8)
    rng = np.random.default_rng(spec.seed)
    opt = torch.optim.AdamW(list(params.values()), lr=spec.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    model.train()
    losses = []
    for _, x in zip(range(spec.steps), _batches(ids, lm.context, spec.batch, rng), strict=False):
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    facts = {"spec": want, "first_loss": losses[0], "last_loss": float(np.mean(losses[-10:]))}
    (tmp / "finetune.json").write_text(json.dumps(facts, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return facts


def _reinit(params: dict, config, gen) -> None:
    """GPT-2's initialisation: N(0, 0.02) weights (c_proj scaled by 1/sqrt(2 n_layer)), zero
    biases, LayerNorm weight 1."""
    import torch

    with torch.no_grad():
        for name, p in params.items():
            if ".ln_" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                std = 0.02 / (math.sqrt(2 * config.n_layer) if "c_proj" in name else 1.0)
                p.copy_(torch.randn(p.shape, generator=gen) * std)
