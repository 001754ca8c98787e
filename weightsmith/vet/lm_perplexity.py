"""Evaluator `lm-perplexity`: held-out negative log-likelihood of a causal language model.

1. Tokenize the text once with the original's tokenizer (the same ids for every entry), or
   byte-level (byte b is token b) when the folder has no tokenizer files; keep the first
   `max_tokens` ids.
2. Put one prefix token before them (the tokenizer's BOS, else its EOS as lm-evaluation-harness
   does for GPT-2, else the newline byte 0x0A), so that every kept token is predicted.
3. Cut the sequence into windows of W tokens (W = min(`window`, the model's context)) that
   overlap by one token: window i covers positions [i (W - 1), i (W - 1) + W) and predicts
   each of its tokens after the first. Every token is predicted exactly once, from the
   tokens before it in its window; the windows, and so the numbers, are deterministic.
4. nll_per_token = total NLL / tokens; nll_per_byte = total NLL / UTF-8 bytes of the
   evaluated text (nats; lower is better). Byte-level ids give equal numbers.
"""

from __future__ import annotations

import math

from pydantic import Field

from weightsmith.errors import WeightsmithError
from weightsmith.vet.registry import (
    Context,
    Entry,
    Evaluator,
    EvaluatorConfig,
    Scores,
    load_tokenizer,
    vocab_size,
)

_NEWLINE = 0x0A  # the prefix token of byte-level ids


class LmPerplexityConfig(EvaluatorConfig):
    """How much text and how it is cut."""

    max_tokens: int = Field(20_000, ge=1)  # tokens of the text evaluated at most
    window: int = Field(1024, ge=2)  # tokens per window at most (the model's context if less)
    batch_size: int = Field(4, ge=1)  # windows per forward pass


class LmPerplexity(Evaluator):
    """NLL per token and per byte of the held-out text."""

    name = "lm-perplexity"
    Config = LmPerplexityConfig
    metrics = {"nll_per_byte": "lower", "nll_per_token": "lower"}
    primary = "nll_per_byte"

    @classmethod
    def applies(cls, config: dict) -> bool:
        return is_causal_lm(config)

    def evaluate(self, entry: Entry, context: Context) -> Scores:
        import torch
        from transformers import AutoModelForCausalLM

        cfg = self.config
        assert isinstance(cfg, LmPerplexityConfig)
        cache = self.cached(context)
        if "ids" not in cache:
            cache["ids"], cache["bytes"] = _token_ids(context, cfg.max_tokens)
        ids, n_bytes = cache["ids"], cache["bytes"]

        model = AutoModelForCausalLM.from_pretrained(
            entry.folder, local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
        model.to(self.device).eval()
        context_length = getattr(model.config, "max_position_embeddings", None) or cfg.window
        w = min(cfg.window, int(context_length))
        if w < 2:
            raise WeightsmithError(str(entry.folder), f"a context of {w} tokens predicts nothing")
        seq = torch.tensor(ids, dtype=torch.long)  # (1 + tokens,): prefix, then the text
        starts = list(range(0, len(ids) - 1, w - 1))
        windows = [seq[s : s + w] for s in starts]
        # full windows batch together; a shorter last one runs alone
        full = [x for x in windows if len(x) == w]
        batches = [full[i : i + cfg.batch_size] for i in range(0, len(full), cfg.batch_size)]
        batches += [[x] for x in windows if len(x) != w]
        total, predicted = 0.0, 0
        with torch.inference_mode():
            for batch in batches:
                x = torch.stack(batch).to(self.device)  # (B, L)
                logits = model(input_ids=x).logits.float()  # (B, L, V)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    x[:, 1:].reshape(-1),
                    reduction="none",
                )  # (B * (L - 1),)
                total += float(nll.double().sum())
                predicted += nll.numel()
        del model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        assert predicted == len(ids) - 1, (predicted, len(ids))
        return Scores(
            metrics={
                "nll_per_token": total / predicted if math.isfinite(total) else math.nan,
                "nll_per_byte": total / n_bytes if math.isfinite(total) else math.nan,
                "tokens": float(predicted),
                "bytes": float(n_bytes),
            }
        )


def is_causal_lm(config: dict) -> bool:
    """Whether config.json describes a causal LM (by its architectures, else its model_type)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    architectures = config.get("architectures") or []
    if architectures:
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    model_type = config.get("model_type")
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _token_ids(context: Context, max_tokens: int) -> tuple[list[int], int]:
    """The prefix token and the text's first `max_tokens` ids, and the UTF-8 bytes they spell."""
    original = context.original
    tokenizer = load_tokenizer(original.folder, vocab_size(original.config()))
    data = context.text.encode("utf-8")
    if tokenizer is None:
        ids = list(data[:max_tokens])
        return [_NEWLINE, *ids], len(ids)
    ids = tokenizer(context.text, add_special_tokens=False)["input_ids"]
    n_bytes = len(data)
    if len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids, clean_up_tokenization_spaces=False).encode("utf-8"))
    if not ids:
        raise WeightsmithError(context.text_source or "vet text", "the text gives no tokens")
    prefix = tokenizer.bos_token_id
    if prefix is None:
        prefix = tokenizer.eos_token_id
    if prefix is None:
        prefix = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    return [prefix, *ids], n_bytes
