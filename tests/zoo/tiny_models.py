"""Tiny real transformers models written as safetensors and extracted into a store (zoo tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from weightsmith.extract import ExtractOptions, extract

VOCAB = 64


def gpt2(seed: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy, tied copies (GPT-2's lm_head) left out as safetensors requires."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().numpy().copy()
    return out


def store_model(values: dict[str, np.ndarray], folder: Path, name: str, store: str) -> str:
    """Write `values` as <folder>/<name>/model.safetensors and extract it; returns the model URL."""
    path = folder / name / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(values, str(path))
    return extract(str(path), ExtractOptions(store=store, name=name, images="none")).model_url


def logits(model: torch.nn.Module, values: dict[str, np.ndarray], tokens: torch.Tensor) -> np.ndarray:
    """The model's logits on `tokens` with `values` loaded in place of its weights."""
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in values.items()}, strict=False)
    with torch.no_grad():
        return model(tokens).logits.numpy()
