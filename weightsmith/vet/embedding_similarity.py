"""Evaluator `embedding-similarity`: how close a candidate encoder's sentence embeddings stay.

1. Sentences are the non-blank lines of the text (stripped), the first `max_sentences`.
2. Each is tokenized with the original's tokenizer (special tokens included, cut at
   `max_length`), or byte-level when the folder has no tokenizer files.
3. A sentence's embedding is the mean of the encoder's last hidden state over its tokens
   (attention-masked mean pooling, as sentence-transformers does).
4. cosine = mean over sentences of cos(candidate embedding, original embedding): 1.0 for
   the original itself, higher is better; cosine_min is the worst sentence.
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


class EmbeddingSimilarityConfig(EvaluatorConfig):
    """Which sentences and how they are cut."""

    max_sentences: int = Field(256, ge=1)  # lines of the text used at most
    max_length: int = Field(128, ge=1)  # tokens per sentence at most (the model's if less)
    batch_size: int = Field(32, ge=1)  # sentences per forward pass


class EmbeddingSimilarity(Evaluator):
    """Cosine of mean-pooled sentence embeddings to the original's."""

    name = "embedding-similarity"
    Config = EmbeddingSimilarityConfig
    metrics = {"cosine": "higher", "cosine_min": "higher"}
    primary = "cosine"

    @classmethod
    def applies(cls, config: dict) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

        from weightsmith.vet.lm_perplexity import is_causal_lm

        return (
            not is_causal_lm(config)
            and not config.get("is_encoder_decoder", False)
            and config.get("model_type") in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        )

    def evaluate(self, entry: Entry, context: Context) -> Scores:
        cache = self.cached(context)
        if "batches" not in cache:
            cache["batches"] = self._batches(context)
        if "original" not in cache:
            cache["original"] = self._embed(context.original, cache["batches"])
        reference = cache["original"]  # (sentences, hidden) float64
        embedded = reference if entry is context.original else self._embed(entry, cache["batches"])
        dots = (embedded * reference).sum(axis=1)
        norms = np.linalg.norm(embedded, axis=1) * np.linalg.norm(reference, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cosines = dots / norms  # (sentences,); NaN where an embedding is all zeros
        finite = bool(np.isfinite(cosines).all())
        return Scores(
            metrics={
                "cosine": float(cosines.mean()) if finite else math.nan,
                "cosine_min": float(cosines.min()) if finite else math.nan,
                "sentences": float(len(cosines)),
            }
        )

    def _batches(self, context: Context) -> list[tuple]:
        """(input_ids, attention_mask) tensors per batch of sentences, the same for every entry."""
        import torch

        cfg = self.config
        assert isinstance(cfg, EmbeddingSimilarityConfig)
        lines = [line.strip() for line in context.text.splitlines()]
        sentences = [line for line in lines if line][: cfg.max_sentences]
        config = context.original.config()
        limit = min(cfg.max_length, int(config.get("max_position_embeddings") or cfg.max_length))
        tokenizer = load_tokenizer(context.original.folder, vocab_size(config))
        batches = []
        for i in range(0, len(sentences), cfg.batch_size):
            chunk = sentences[i : i + cfg.batch_size]
            if tokenizer is not None:
                enc = tokenizer(chunk, padding=True, truncation=True, max_length=limit, return_tensors="pt")
                batches.append((enc["input_ids"], enc["attention_mask"]))
                continue
            rows = [list(s.encode("utf-8"))[:limit] for s in chunk]
            width = max(len(r) for r in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)  # (B, L), padded with 0
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            batches.append((ids, mask))
        if not batches:
            raise WeightsmithError(context.text_source or "vet text", "no non-blank lines")
        return batches

    def _embed(self, entry: Entry, batches: list[tuple]) -> np.ndarray:
        """Mean-pooled last hidden states, (sentences, hidden) float64."""
        import torch
        from transformers import AutoModel

        model = AutoModel.from_pretrained(
            entry.folder, local_files_only=True, dtype=torch.float32, use_safetensors=True
        )
        model.to(self.device).eval()
        out = []
        with torch.inference_mode():
            for ids, mask in batches:
                hidden = model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state.double()  # (B, L, H)
                m = mask.to(self.device, torch.float64)[..., None]  # (B, L, 1)
                out.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy())
        del model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return np.concatenate(out)
