"""The demo's small language model and its zoo of checkpoints, trained here, offline.

`corpus()` is text every machine has: Python's standard-library sources, split into train and
held-out by a hash of each file's name (fixed, so every run sees the same split).
`train_lm()` trains a GPT-2-architecture model with a byte-level vocabulary (256) to a plateau
and saves it in the Hugging Face layout. `collect_zoo()` continues training only the chosen
tensors, everything else frozen, at a noisy learning rate that keeps checkpoints apart, and
snapshots them: K checkpoints of each chosen tensor, stacked (K, ...).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from weightsmith.errors import WeightsmithError


@dataclass(frozen=True)
class LMSpec:
    """Size and training budget of the demo model."""

    layers: int = 4  # transformer blocks
    width: int = 128  # embedding width
    heads: int = 4  # attention heads
    context: int = 128  # tokens (bytes) per window
    batch: int = 16  # windows per step
    decay_steps: int = 1000  # the learning rate's cosine decay to 10%, then held there
    max_steps: int = 1500  # training stops here if no plateau came first (plateau: ~1,200 steps, ~5 min on 2 cores)
    eval_every: int = 100  # steps between held-out evaluations
    patience: int = 3  # evaluations in a row without 1% improvement that mean "plateau"
    lr: float = 3e-3  # AdamW peak learning rate
    train_bytes: int = 4_000_000  # corpus budget
    heldout_bytes: int = 200_000
    seed: int = 0


SPECS = {
    "full": LMSpec(),
    "tiny": LMSpec(
        layers=2,
        width=64,
        heads=2,
        context=64,
        batch=16,
        decay_steps=300,
        max_steps=500,
        eval_every=50,
        train_bytes=400_000,
        heldout_bytes=40_000,
    ),
}


HELDOUT_EVERY = 5  # one file in 5 (by its name's hash) is held out


def heldout_file(rel: str) -> bool:
    """Whether a standard-library file (path relative to the library) is held out: fixed by its name."""
    return int(hashlib.sha256(rel.encode()).hexdigest(), 16) % HELDOUT_EVERY == 0


def corpus(train_bytes: int, heldout_bytes: int) -> tuple[bytes, bytes]:
    """(train, held-out) bytes from the standard library's .py files, split by file name hash."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = bytearray(), bytearray()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "test" in rel.split("/")[0]:
            continue
        held_out = heldout_file(rel)
        target = held if held_out else train
        if len(target) >= (heldout_bytes if held_out else train_bytes):
            if len(train) >= train_bytes and len(held) >= heldout_bytes:
                break
            continue
        target += path.read_bytes()
    return bytes(train[:train_bytes]), bytes(held[:heldout_bytes])


def _batches(data: np.ndarray, context: int, batch: int, rng: np.random.Generator):
    import torch

    while True:
        starts = rng.integers(0, len(data) - context - 1, size=batch)
        x = np.stack([data[s : s + context + 1] for s in starts]).astype(np.int64)
        yield torch.from_numpy(x)


def heldout_nll(model, data: np.ndarray, context: int, max_windows: int = 64) -> float:
    """Mean NLL per byte (nats) on fixed, non-overlapping held-out windows."""
    import torch

    n = min(max_windows, (len(data) - 1) // (context + 1))
    x = torch.from_numpy(data[: n * (context + 1)].reshape(n, context + 1).astype(np.int64))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=x[:, :-1], labels=x[:, :-1])
        logits = out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    model.train()
    return float(loss)


def train_lm(folder: Path, spec: LMSpec, progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train to a plateau and save to `folder` (HF layout); cached: an existing folder is reused."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    facts_path = folder / "training.json"
    if facts_path.exists() and (folder / "model.safetensors").exists():
        import json

        return json.loads(facts_path.read_text())
    torch.manual_seed(spec.seed)
    rng = np.random.default_rng(spec.seed)
    train, held = corpus(spec.train_bytes, spec.heldout_bytes)
    train_ids, held_ids = np.frombuffer(train, np.uint8), np.frombuffer(held, np.uint8)
    config = GPT2Config(
        vocab_size=256,
        n_positions=spec.context,
        n_embd=spec.width,
        n_layer=spec.layers,
        n_head=spec.heads,
        bos_token_id=10,
        eos_token_id=10,
        loss_type="ForCausalLM",
    )
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.decay_steps)))
    )
    best, stale, history, step = math.inf, 0, [], 0
    for step, x in enumerate(_batches(train_ids, spec.context, spec.batch, rng), start=1):
        loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % spec.eval_every == 0 or step == spec.max_steps:
            nll = heldout_nll(model, held_ids, spec.context)
            history.append({"step": step, "train_loss": float(loss.detach()), "heldout_nll_per_byte": nll})
            if progress:
                progress(step, spec.max_steps, nll)
            stale = 0 if nll < best * 0.99 else stale + 1
            best = min(best, nll)
            if stale >= spec.patience or step >= spec.max_steps:
                break
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    facts = {
        "spec": spec.__dict__,
        "steps": step,
        "history": history,
        "heldout_nll_per_byte": best,
        "plateau": stale >= spec.patience,
    }
    import json

    (tmp / "training.json").write_text(json.dumps(facts, indent=1))
    (tmp / "heldout.txt").write_bytes(held)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return facts


def collect_zoo(
    folder: Path,
    patterns: tuple[str, ...],
    checkpoints: int,
    every: int = 4,
    lr: float = 2e-2,
    lr_noise: float = 1.0,
    seed: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, np.ndarray]:
    """K checkpoints of the tensors matching `patterns`: continued training, the rest frozen.

    The learning rate of each step is lr * exp(lr_noise * N(0, 1)) (a noisy schedule), and a
    snapshot is taken every `every` steps, so consecutive checkpoints are apart by several
    noisy steps rather than one smooth trajectory point.
    """
    import torch
    from transformers import GPT2LMHeadModel

    spec_path = Path(folder) / "training.json"
    import json

    spec = LMSpec(**json.loads(spec_path.read_text())["spec"])
    model = GPT2LMHeadModel.from_pretrained(folder)
    model.train()
    chosen = {n: p for n, p in model.named_parameters() if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)}
    if not chosen:
        raise WeightsmithError("zoo patterns", f"no parameter matches {patterns}")
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train, _ = corpus(spec.train_bytes, spec.heldout_bytes)
    data = np.frombuffer(train, np.uint8)
    opt = torch.optim.SGD(list(chosen.values()), lr=lr, momentum=0.0)
    snaps: dict[str, list[np.ndarray]] = {n: [] for n in chosen}
    batches = _batches(data, spec.context, spec.batch, rng)
    for k in range(checkpoints):
        for _ in range(every):
            for g in opt.param_groups:
                g["lr"] = lr * float(np.exp(lr_noise * rng.standard_normal()))
            loss = model(input_ids=(x := next(batches))[:, :-1], labels=x[:, :-1]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        for n, p in chosen.items():
            snaps[n].append(p.detach().cpu().numpy().astype(np.float32).copy())
        if progress:
            progress(k + 1, checkpoints)
    return {_hf_name(model, n): np.stack(v) for n, v in snaps.items()}


def _hf_name(model, param_name: str) -> str:
    """Parameter names as saved in model.safetensors (GPT2LMHeadModel keeps them as they are)."""
    return param_name
