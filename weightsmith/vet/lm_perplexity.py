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
5. Kept for statistics (`Scores.arrays`): `logprob`, each predicted token's log-probability, and
   `token_bytes`, the bytes each token spells (1 for byte-level ids; with a tokenizer, each
   token decoded alone, scaled so the total is the text's bytes).
6. functional_novelty (see `weightsmith.vet.functional`) from the same pass's logits on the
   first `probe_tokens` predicted tokens; functional_upper_bound is 1 when only the nearest
   members were compared.
"""

from __future__ import annotations

import math

import numpy as np
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
    probe_tokens: int = Field(4096, ge=0)  # functional novelty's probe (0: not measured)
    all_members: int = Field(32, ge=1)  # compare with every example up to this many
    nearest: int = Field(16, ge=1)  # else with this many nearest by weight distance (upper bound)


class LmPerplexity(Evaluator):
    """NLL per token and per byte of the held-out text."""

    name = "lm-perplexity"
    Config = LmPerplexityConfig
    metrics = {
        "nll_per_byte": "lower",
        "nll_per_token": "lower",
        "functional_novelty": None,
        "functional_upper_bound": None,
    }
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
        probe = min(cfg.probe_tokens, len(ids) - 1)
        logprob, probe_log = _forward(model, ids, w, cfg.batch_size, self.device, probe)
        del model
        total = -float(logprob.sum())
        predicted = len(logprob)
        assert predicted == len(ids) - 1, (predicted, len(ids))
        metrics = {
            "nll_per_token": total / predicted if math.isfinite(total) else math.nan,
            "nll_per_byte": total / n_bytes if math.isfinite(total) else math.nan,
            "tokens": float(predicted),
            "bytes": float(n_bytes),
            "functional_novelty": math.nan,
            "functional_upper_bound": math.nan,
        }
        if probe_log is not None:
            metrics["functional_novelty"], bound = self._functional(entry, context, probe_log, ids, w)
            metrics["functional_upper_bound"] = float(bound)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        if "token_bytes" not in cache:
            cache["token_bytes"] = _token_bytes(context, ids[1:], n_bytes)
        return Scores(
            metrics=metrics,
            arrays={"logprob": logprob.astype(np.float32), "token_bytes": cache["token_bytes"]},
        )

    def _functional(self, entry: Entry, context: Context, probe_log, ids: list[int], w: int) -> tuple[float, bool]:
        """(functional novelty, whether it is an upper bound) of the entry's probe outputs."""
        from weightsmith.vet.functional import (
            Distribution,
            cached_probe,
            functional_novelty,
            members_to_compare,
            probe_key,
        )
        from weightsmith.vet.weight_stats import example_stds, group_distances

        cfg = self.config
        assert isinstance(cfg, LmPerplexityConfig)
        cache = self.cached(context)
        k = context.k
        if k > cfg.all_members and "stds" not in cache:
            cache["stds"] = example_stds(context)
        distances = group_distances(entry, context, cache.get("stds")) if k > cfg.all_members else np.zeros(k)
        members, bound = members_to_compare(distances, cfg.all_members, cfg.nearest)
        probe_ids = ids[: len(probe_log) + 1]

        def member_probe(m: int) -> Distribution:
            if ("probe", m) not in cache:
                log_probs = cached_probe(
                    probe_key(context, m, probe_ids, w), lambda: self._member_probe(context, m, probe_ids, w)
                )
                cache["probe", m] = Distribution.of(log_probs)
            return cache["probe", m]

        return functional_novelty(probe_log, context, members, member_probe), bound

    def _member_probe(self, context: Context, m: int, probe_ids: list[int], w: int) -> np.ndarray:
        """Probe log-softmax (probe, V) of member m: the original with m's replaced tensors put in.

        The original is loaded once per context; every member replaces the same tensors, so the
        next member's values simply overwrite the last one's.
        """
        import torch
        from transformers import AutoModelForCausalLM

        cfg = self.config
        assert isinstance(cfg, LmPerplexityConfig)
        cache = self.cached(context)
        if "member_model" not in cache:
            model = AutoModelForCausalLM.from_pretrained(
                context.original.folder, local_files_only=True, dtype=torch.float32, use_safetensors=True
            )
            cache["member_model"] = model.to(self.device).eval()
        model = cache["member_model"]
        state = model.state_dict()
        replaced = {}
        for name, values in context.example(m).items():
            if name not in state:
                raise WeightsmithError(str(context.original.folder), f"the model has no tensor {name!r}")
            replaced[name] = torch.from_numpy(np.ascontiguousarray(values)).reshape(state[name].shape)
        model.load_state_dict(replaced, strict=False)
        _, probe_log = _forward(model, probe_ids, w, cfg.batch_size, self.device, len(probe_ids) - 1)
        return probe_log


def _forward(model, ids: list[int], w: int, batch_size: int, device: str, probe: int):
    """(log-probability of each predicted token (tokens,), probe log-softmax (probe, V) or None).

    Windows of w tokens overlapping by one (see the module's docstring); the probe is the first
    `probe` predicted tokens, from the same windows.
    """
    import torch

    seq = torch.tensor(ids, dtype=torch.long)  # (1 + tokens,): prefix, then the text
    starts = list(range(0, len(ids) - 1, w - 1))
    # full windows batch together; a shorter last one runs alone
    full = [s for s in starts if s + w <= len(ids)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + w > len(ids)]
    logprob = np.zeros(len(ids) - 1)
    probe_log = None
    with torch.inference_mode():
        for batch in batches:
            x = torch.stack([seq[s : s + w] for s in batch]).to(device)  # (B, L)
            logits = model(input_ids=x).logits.float()[:, :-1]  # (B, L - 1, V)
            logp = torch.log_softmax(logits, dim=-1)
            true = logp.gather(-1, x[:, 1:, None])[..., 0].double().cpu().numpy()  # (B, L - 1)
            for row, s in enumerate(batch):
                logprob[s : s + true.shape[1]] = true[row]
                if s < probe:
                    if probe_log is None:
                        probe_log = np.zeros((probe, logp.shape[-1]), dtype=np.float32)
                    n = min(probe - s, logp.shape[1])
                    probe_log[s : s + n] = logp[row, :n].cpu().numpy()
    return logprob, probe_log


def _token_bytes(context: Context, ids: list[int], n_bytes: int) -> np.ndarray:
    """(tokens,) UTF-8 bytes of each token, summing to the text's bytes."""
    tokenizer = load_tokenizer(context.original.folder, vocab_size(context.original.config()))
    if tokenizer is None:
        return np.ones(len(ids), dtype=np.float32)
    lengths = {i: len(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8")) for i in set(ids)}
    raw = np.array([lengths[i] for i in ids], dtype=np.float64)
    return (raw * (n_bytes / raw.sum()) if raw.sum() > 0 else np.full(len(ids), n_bytes / len(ids))).astype(np.float32)


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
