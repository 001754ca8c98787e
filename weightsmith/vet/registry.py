"""The evaluators by name, and what they share: the entries, the context and the interface.

An *entry* is one model that a report evaluates: the original, a candidate, or a baseline.
Each is a Hugging Face folder (config.json + safetensors) that transformers can load, plus the
values of the replaced tensors (given, or read from the folder one tensor at a time):

    context = Context(original=Entry("original", "original", "original", 0, folder),
                      tensors=("h.0.attn.c_attn.weight",), text=held_out)
    evaluator = get("lm-perplexity")(device="cpu")                 # registry.get
    scores = evaluator.evaluate(entry, context)                     # -> Scores

Registry values are "module:Class" paths, so listing the names does not import transformers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from weightsmith.errors import WeightsmithError

_IMPORT_LOCK = threading.Lock()

EVALUATORS: dict[str, str] = {
    "lm-perplexity": "weightsmith.vet.lm_perplexity:LmPerplexity",
    "embedding-similarity": "weightsmith.vet.embedding_similarity:EmbeddingSimilarity",
    "weight-stats": "weightsmith.vet.weight_stats:WeightStats",
}

Kind = Literal["original", "candidate", "baseline", "reference"]  # reference: real models, never a baseline
Better = Literal["lower", "higher"]  # which direction of a metric is better

# files whose presence means the model folder brings its own tokenizer
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)


@dataclass(frozen=True, eq=False)  # compared by identity: it may hold arrays
class Entry:
    """One model a report evaluates.

    `label` names the group of samples the entry belongs to ("original", "tile-diffusion",
    "noise(r=0.1)"; see `weightsmith.vet.report.baseline_label`); `id` adds the sample index.
    """

    label: str  # group name shown in the report; samples of one generator config share it
    kind: Kind  # original | candidate | baseline | reference
    generator: str  # registry name of the generator that made it ("original" for the original)
    sample: int  # sample index within the label
    folder: Path  # Hugging Face layout: config.json + model.safetensors (or a sharded index)
    tensors: Mapping[str, Any] | None = None  # replaced tensor -> values; None: read `folder`
    params: Mapping[str, Any] = field(default_factory=dict)  # JSON-able generator config
    examples: Mapping[str, Any] | None = None  # per tensor (K, *shape): the generator's
    # training examples when they differ from the context's (novelty is measured to these)
    fit: int = 0  # which fit of the label's generator made it (samples of one fit share it)
    sha256: str | None = None  # the model's content hash (None: computed from the folder)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.kind not in ("original", "candidate", "baseline", "reference"):
            raise WeightsmithError(self.label, f"unknown entry kind {self.kind!r}")

    @property
    def id(self) -> str:
        """Unique name in a report: "original", else "<label>#<sample>"."""
        return "original" if self.kind == "original" else f"{self.label}#{self.sample}"

    def tensor(self, name: str) -> np.ndarray:
        """The values of a replaced tensor as float32."""
        if self.tensors is not None:
            if name not in self.tensors:
                raise WeightsmithError(self.id, f"no values given for tensor {name!r}")
            return np.asarray(self.tensors[name], dtype=np.float32)
        return _read_tensor(self.folder, name)

    def fingerprint(self) -> str:
        """`sha256`, else a sha256 of the folder's files (candidate.json's file hashes when present)
        and of any given tensor values: what the score cache keys an entry by."""
        if self.sha256:
            return self.sha256
        h = hashlib.sha256()
        record = self.folder / "candidate.json"
        if record.is_file():
            h.update(json.dumps(json.loads(record.read_text()).get("files", {}), sort_keys=True).encode())
        else:
            for path in sorted(self.folder.glob("*")):
                if path.suffix in (".json", ".safetensors", ".txt", ".model") and path.is_file():
                    h.update(path.name.encode())
                    with path.open("rb") as f:
                        for chunk in iter(lambda: f.read(1 << 24), b""):
                            h.update(chunk)
        for name in sorted(self.tensors or {}):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.tensors[name], dtype=np.float32).tobytes())
        object.__setattr__(self, "sha256", h.hexdigest())
        return self.sha256

    def config(self) -> dict:
        """The model's config.json."""
        path = self.folder / "config.json"
        if not path.is_file():
            raise WeightsmithError(str(self.folder), "no config.json: not a Hugging Face folder")
        return json.loads(path.read_text())


@dataclass(frozen=True, eq=False)  # compared by identity: it may hold arrays
class Context:
    """What every entry of a report is evaluated against: the same data for all of them."""

    original: Entry  # the model the candidates replace tensors of
    tensors: tuple[str, ...]  # names of the replaced tensors
    text: str  # the held-out evaluation text (never used for training anything)
    text_source: str = ""  # where the text came from (a path or URL), for the report
    examples: Mapping[str, Any] | None = None  # per tensor (K, *shape): the generators'
    # training examples; None means the original alone (K = 1)
    examples_id: str | None = None  # names the examples for the score cache (e.g. the zoo's id
    # and hash); None: their values are hashed

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if self.original.kind != "original":
            raise WeightsmithError(self.original.id, "the context's original has another kind")
        if not self.tensors:
            raise WeightsmithError("vet context", "no replaced tensors named")
        if not self.text.strip():
            raise WeightsmithError(self.text_source or "vet context", "the evaluation text is empty")

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def fingerprint(self) -> str:
        """A sha256 of the original, the replaced tensors and the examples (not the text)."""
        cached = self.__dict__.get("_fingerprint")
        if cached:
            return cached
        h = hashlib.sha256(json.dumps([self.original.fingerprint(), list(self.tensors)]).encode())
        if self.examples_id is not None:
            h.update(self.examples_id.encode())
        elif self.examples is not None:
            for name in self.tensors:
                h.update(np.ascontiguousarray(np.asarray(self.examples[name]), dtype=np.float32).tobytes())
        object.__setattr__(self, "_fingerprint", h.hexdigest())
        return self.__dict__["_fingerprint"]

    @property
    def k(self) -> int:
        """How many training examples there are (1: the original alone)."""
        return 1 if self.examples is None else int(self.examples[self.tensors[0]].shape[0])

    def example(self, k: int) -> dict[str, np.ndarray]:
        """The k-th training example: every replaced tensor, float32."""
        if self.examples is None:
            return {n: self.original.tensor(n) for n in self.tensors}
        return {n: np.asarray(self.examples[n][k], dtype=np.float32) for n in self.tensors}

    def examples_for(self, entry: Entry, name: str) -> Any:
        """The training examples (K, *shape) that `entry`'s novelty is measured to."""
        source = entry.examples if entry.examples is not None else self.examples
        if source is None:
            return self.original.tensor(name)[None]
        if name not in source:
            raise WeightsmithError(entry.id, f"no training examples given for tensor {name!r}")
        return source[name]


@dataclass(frozen=True)
class Scores:
    """What one evaluator says about one entry."""

    metrics: dict[str, float]  # entry-level numbers (NaN where undefined)
    per_tensor: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> numbers
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. per-token log-probabilities


class EvaluatorConfig(BaseModel):
    """Base of every evaluator's options; frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Evaluator(ABC):
    """A way to score an entry; one instance evaluates every entry of a report.

    Subclasses set `name`, `Config`, `metrics` (name -> which direction is better) and
    `primary` (the metric a report ranks by), and implement `applies` and `evaluate`.
    Instances may cache what depends only on the context (the original's outputs, the
    tokenized text); the cache is dropped when a different context comes in.
    """

    name: ClassVar[str]  # registry name
    Config: ClassVar[type[EvaluatorConfig]] = EvaluatorConfig
    metrics: ClassVar[dict[str, Better | None]]  # entry-level metrics; which way is better
    primary: ClassVar[str]  # the metric a report ranks entries by

    def __init__(self, config: EvaluatorConfig | Mapping[str, Any] | None = None, device: str = "cpu"):
        self.device = device
        if isinstance(config, self.Config):
            self.config = config
        else:
            try:
                self.config = self.Config.model_validate(dict(config or {}))
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "config"
                raise WeightsmithError(f"{self.name} {where}", first["msg"]) from None
        self._context: Context | None = None
        self._cache: dict[str, Any] = {}

    @classmethod
    @abstractmethod
    def applies(cls, config: dict) -> bool:
        """Whether the evaluator can score a model with this config.json."""

    @abstractmethod
    def evaluate(self, entry: Entry, context: Context) -> Scores:
        """Score one entry against the context."""

    def cached(self, context: Context) -> dict[str, Any]:
        """A cache that lives as long as the same context object is evaluated."""
        if self._context is not context:
            self._context, self._cache = context, {}
        return self._cache


def get(name: str) -> type[Evaluator]:
    """The evaluator class registered as `name`."""
    if name not in EVALUATORS:
        raise WeightsmithError(f"evaluator {name!r}", f"unknown (choose from {', '.join(EVALUATORS)})")
    module, cls = EVALUATORS[name].split(":")
    # diffusers/transformers import lazily and are not safe to import from two threads at once
    # (flows run tasks in threads): "cannot import name 'DDIMScheduler'" was seen here.
    with _IMPORT_LOCK:
        evaluator = getattr(importlib.import_module(module), cls)
    assert evaluator.name == name, (name, evaluator.name)
    return evaluator


def for_model(config: dict) -> list[str]:
    """Names of the evaluators that apply to a model with this config.json, in registry order."""
    return [name for name in EVALUATORS if get(name).applies(config)]


def load_tokenizer(folder: Path, vocab_size: int):
    """The folder's Hugging Face tokenizer, or None for byte-level ids (a byte b is token b).

    Byte-level needs a vocabulary of at least 256 tokens; a smaller one is an error.
    """
    folder = Path(folder)
    if any((folder / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if vocab_size < 256:
        raise WeightsmithError(
            str(folder),
            f"no tokenizer files, and vocab_size {vocab_size} < 256 rules out "
            "byte-level ids: add the model's tokenizer files to the folder",
        )
    return None


def vocab_size(config: dict) -> int:
    """The vocabulary size in a config.json (top level or its text_config)."""
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int):
        return 0
    return size


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values; NaN when there are none."""
    kept = [v for v in values if math.isfinite(v)]
    return math.fsum(kept) / len(kept) if kept else math.nan


def _read_tensor(folder: Path, name: str) -> np.ndarray:
    """One tensor of a (possibly sharded) safetensors model folder, as float32."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        if name not in weight_map:
            raise WeightsmithError(str(folder), f"no tensor {name!r} in the sharded index")
        file = folder / weight_map[name]
    else:
        file = folder / "model.safetensors"
    if not file.is_file():
        raise WeightsmithError(str(folder), f"no {file.name}")
    with safe_open(file, framework="pt") as f:
        if name not in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
            raise WeightsmithError(str(file), f"no tensor {name!r}")
        return f.get_tensor(name).float().numpy()
