"""What every source parser produces: containers, raw tensor entries and their byte ranges.

A *container* is one file of the source (a safetensors file, a shard, a .gguf). Its bytes are
a sequence of *segments*: opaque bytes kept verbatim (headers, padding) and tensors, in file
order, covering the file exactly; `weightsmith restore` writes the segments back in order and
so rebuilds the file byte for byte.

A *tensor entry* is one tensor's byte range in a container and how its bytes map to values:
- encoding "raw": little-endian values of a safetensors dtype (`dtype`), C order, `shape`;
- encoding "gguf": GGUF block-quantised bytes of ggml type `dtype` (e.g. "Q4_K"); stored as
  uint8 rows of `row_bytes` bytes, one row per `shape[-1]` values; values via `gguf.quants`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as it lies in a container."""

    name: str
    dtype: str  # safetensors dtype name ("BF16") or, with encoding "gguf", a ggml type ("Q4_K")
    shape: tuple[int, ...]  # numpy order
    container: int  # index into Source.containers
    start: int  # absolute byte offsets in the container file: [start, end)
    end: int
    encoding: str = "raw"  # "raw" | "gguf"
    row_bytes: int = 0  # with encoding "gguf": bytes of one row of shape[-1] values

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Segment:
    """A piece of a container: verbatim bytes [start, end) or the tensor called `tensor`."""

    start: int
    end: int
    tensor: str | None = None  # None: opaque bytes kept in files/


@dataclass(frozen=True)
class Container:
    """One file of a source."""

    name: str  # file name relative to the source root, e.g. "model-00001-of-00004.safetensors"
    url: str
    size: int
    format: str  # "safetensors" | "gguf"
    segments: tuple[Segment, ...]
    metadata: dict = field(default_factory=dict)  # safetensors __metadata__ / GGUF key-values


@dataclass(frozen=True)
class GptqGroup:
    """A GPTQ-quantised linear layer: four raw tensors that make one logical weight."""

    prefix: str  # e.g. "model.layers.0.mlp.gate_proj"
    qweight: str  # tensor names
    qzeros: str
    scales: str
    g_idx: str | None
    bits: int
    group_size: int  # -1: one group over the whole input dimension
    checkpoint_format: str  # "gptq" (v1: zero + 1) | "gptq_v2"
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return f"{self.prefix}.weight"

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)  # as transformers' nn.Linear expects

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(n for n in (self.qweight, self.qzeros, self.scales, self.g_idx) if n)
