"""The main job (`weightsmith demo`, `make demo`) and the GPT-2-shaped models it builds offline.

Until the full pipeline lands, the demo builds a GPT-2-shaped model from a transformers
config (random init, no download), saves it in the Hugging Face layout in the state folder's
cache, extracts it into the store, verifies it, and prints where everything is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from weightsmith import state

SIZES = {
    # name: (layers, width, heads, vocab, context)
    "tiny": (2, 64, 2, 256, 128),
    "small": (4, 256, 4, 50257, 256),
    "gpt2-small": (12, 768, 12, 50257, 1024),  # 124M parameters, as GPT-2 small
}


def build_gpt2(folder: Path, layers: int, width: int, heads: int, vocab: int, context: int,
               seed: int = 0) -> Path:
    """Save a randomly initialised GPT2LMHeadModel (safetensors + config.json) in `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    folder = Path(folder)
    if (folder / "model.safetensors").exists() and (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=context)
    model = GPT2LMHeadModel(config)
    tmp = folder.with_name(folder.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return folder


def run_demo(store: str, size: str = "small", console=None) -> dict:
    """Build (once) and extract a GPT-2-shaped model; returns a summary."""
    from weightsmith.cli import byte_progress
    from weightsmith.errors import WeightsmithError
    from weightsmith.extract import ExtractOptions, extract
    from weightsmith.verify import verify

    if size not in SIZES:
        raise WeightsmithError("--size", f"unknown size {size!r} (choose from {', '.join(SIZES)})")
    say = console.print if console is not None else print
    started = time.time()
    folder = state.cache_dir() / f"demo-gpt2-{size}"
    say(f"model: GPT-2-shaped, {size} {SIZES[size][:3]} (layers, width, heads) in {folder}")
    build_gpt2(folder, *SIZES[size])
    with byte_progress("extract") as (advance, set_total):
        result = extract(str(folder), ExtractOptions(store=store, name=f"demo-gpt2-{size}"),
                         progress=advance, total=set_total)
    report = verify(result.model_url)
    summary = {
        "model_url": result.model_url,
        "tensors": result.tensors,
        "written": result.written,
        "verified": report.ok,
        "seconds": round(time.time() - started, 2),
    }
    say(json.dumps(summary, indent=1))
    print(result.model_url)
    if not report.ok:
        raise WeightsmithError(result.model_url, f"verify failed: {report.problems[0]}")
    return summary
