"""Scores are reused: one record per (entry, text, evaluator config, context), in a store.

    cache = ScoreCache(store, "models/demo/<revision>/scores")
    report = vet(context, entries, run_id="r1", model="demo", cache=cache)   # scores what is new

The key is a sha256 of the entry's content hash (`Entry.fingerprint`: candidate.json's file
hashes, else the folder's files), the text's sha256, the evaluator's name and validated config,
the context's fingerprint (the original and the training examples, which novelty and functional
novelty are measured to) and `VERSION` (bumped when an evaluator's numbers change). A record is
`<key>.json` (metrics and per-tensor numbers, NaN kept) plus one `<key>.<array>.npy` per array,
written first: the JSON's presence means the record is complete.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np

from weightsmith.store import Store
from weightsmith.vet.registry import Context, Entry, Scores

VERSION = 2  # of the evaluators' numbers: 2 = group novelty, per-token log-probs, functional novelty


class ScoreCache:
    """Scores by key in `store` under `prefix`; counts `hits` and `misses`."""

    def __init__(self, store: Store, prefix: str):
        self.store, self.prefix = store, prefix.strip("/")
        self.hits = self.misses = 0

    def key(self, entry: Entry, context: Context, evaluator: str, config: dict) -> str:
        payload = {
            "version": VERSION,
            "entry": entry.fingerprint(),
            "text": context.text_sha256,
            "evaluator": evaluator,
            "config": config,
            "context": context.fingerprint(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> Scores | None:
        record_key = f"{self.prefix}/{key}.json"
        if not self.store.exists(record_key):
            self.misses += 1
            return None
        record = json.loads(self.store.read_bytes(record_key))
        arrays = {
            name: np.load(io.BytesIO(self.store.read_bytes(f"{self.prefix}/{key}.{name}.npy")))
            for name in record["arrays"]
        }
        self.hits += 1
        return Scores(metrics=record["metrics"], per_tensor=record["per_tensor"], arrays=arrays)

    def put(self, key: str, scores: Scores) -> None:
        for name, values in scores.arrays.items():
            buf = io.BytesIO()
            np.save(buf, np.asarray(values))
            self.store.write_bytes(f"{self.prefix}/{key}.{name}.npy", buf.getvalue())
        record = {
            "metrics": {k: float(v) for k, v in scores.metrics.items()},
            "per_tensor": scores.per_tensor,
            "arrays": sorted(scores.arrays),
        }
        self.store.write_bytes(f"{self.prefix}/{key}.json", json.dumps(record, sort_keys=True).encode())
