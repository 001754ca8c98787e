"""Random GPT-2-shaped models for tests and benchmarks (`build_gpt2`, sizes in `SIZES`)."""

from __future__ import annotations

from pathlib import Path

SIZES = {
    # name: (layers, width, heads, vocab, context) of random GPT-2-shaped models (benchmarks)
    "tiny": (2, 64, 2, 256, 128),
    "small": (4, 256, 4, 50257, 256),
    "gpt2-small": (12, 768, 12, 50257, 1024),  # 124M parameters, as GPT-2 small
}


def build_gpt2(folder: Path, layers: int, width: int, heads: int, vocab: int, context: int, seed: int = 0) -> Path:
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
