"""What every generator shares: examples in, a fitted state, samples out.

A generator learns from *examples* of one tensor, a stack of K checkpoints (K = 1 for one
model, K >= 2 for a zoo), and draws new values for that tensor:

    gen = get("noise")(device="cpu")                  # registry.get
    state = gen.fit(examples, {"radius": 0.1})         # -> State, saved by the caller
    result = gen.sample(state, n=4, spec=SampleSpec(shape), seed=0)   # -> SampleResult

`fit` validates the config and the examples, then calls the generator's `_fit`; `sample`
checks the state and the request, then calls `_sample`, whose default draws one array at a
time with `_draw` from that sample's `Streams`, so the same seed gives the same arrays on the
same device, whatever `n` is.

Randomness (SAMPLING_VERSION 2). Every random number is a pure function of the request:
- per-sample choices (which zoo member, which subset, a shared latent) come from
  `Streams.choice()`, keyed by (seed, sample): the same for every tensor of a sample, so a
  group's tensors are perturbations of one member;
- per-value noise comes from `Streams.normal()`, keyed by (seed, sample, tensor name) and
  drawn in fixed blocks of NOISE_BLOCK elements, so two tensors never share noise (a joint
  stack's tensors each have their own stream, named in `Examples.parts`) and a chunk's values
  are exactly that slice of the whole tensor's draw;
- draws that must be taken whole (a permutation, PCA coefficients) use `Streams.tensor()`,
  keyed by (seed, sample, tensor name).
Version 1 keyed everything by (seed, sample, chunk offset) only, so every tensor of a sample
drew the same numbers; predictions record the version (predict.py) so none of them is reused.

A group (`group_examples`: tensors of any shapes, one flat (K, D) vector per checkpoint, with
`parts` and `sizes`) is fitted only by generators that set `fits_groups` (zoo-diffusion);
`split_group` cuts a sample back into its tensors. Stacks and groups differ in fingerprint.

A `State` is numpy arrays plus JSON; `state_to_bytes` / `state_from_bytes` store it as an
.npz without pickle. `Generator.fingerprint(examples, config)` names the inputs of a fit, so a
caller can reuse a stored state while they are unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from weightsmith.codec import Chunk
from weightsmith.errors import WeightsmithError
from weightsmith.stats import RunningStats

STATE_FORMAT = 1  # layout of the bytes written by state_to_bytes
_META_KEY = "__state__"  # the .npz member holding the JSON part of a State
SAMPLING_VERSION = 2  # how samples derive their random numbers (see the module docstring)
NOISE_BLOCK = 1 << 16  # elements per independently seeded block of a tensor's noise stream


class GeneratorConfig(BaseModel):
    """Base of every generator's options (none here); frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Examples:
    """K checkpoints of one tensor, stacked: what a generator is fitted on."""

    name: str  # the tensor's name
    values: np.ndarray  # (K, *shape) float32, C-contiguous; K = 1 for a single model
    parts: tuple[str, ...] = ()  # a joint stack (K, n, ...) or a group (K, D): its tensors' names, in order
    base: np.ndarray | None = None  # (*shape) float32: the model the K were fine-tuned from (merges)
    # a group (`group_examples`): each part's number of values along the flat (K, D) vector (D = their sum)
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        v = np.asarray(self.values)
        if v.ndim < 1 or v.shape[0] < 1:
            raise WeightsmithError(self.name, f"examples need shape (K>=1, ...), got {v.shape}")
        object.__setattr__(self, "values", np.ascontiguousarray(v, dtype=np.float32))
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "sizes", tuple(int(n) for n in self.sizes))
        if self.sizes:
            if v.ndim != 2 or len(self.sizes) != len(self.parts) or sum(self.sizes) != v.shape[1]:
                raise WeightsmithError(
                    self.name, f"a group of {len(self.parts)} tensors of sizes {self.sizes}, values are {v.shape}"
                )
        elif self.parts and (v.ndim < 2 or v.shape[1] != len(self.parts)):
            raise WeightsmithError(self.name, f"{len(self.parts)} stacked tensors named, values are {v.shape}")
        if self.base is not None:
            if np.shape(self.base) != v.shape[1:]:
                raise WeightsmithError(self.name, f"base of shape {np.shape(self.base)}, examples of {v.shape[1:]}")
            object.__setattr__(self, "base", np.ascontiguousarray(self.base, dtype=np.float32))

    @classmethod
    def stack(cls, name: str, tensors: list[np.ndarray]) -> Examples:
        """Examples from K tensors of the same shape (any real dtypes; read as float32)."""
        shapes = {tuple(np.shape(t)) for t in tensors}
        if len(shapes) != 1:
            raise WeightsmithError(name, f"checkpoints differ in shape: {sorted(shapes)}")
        return cls(name, np.stack([np.asarray(t, dtype=np.float32) for t in tensors]))

    @property
    def k(self) -> int:
        """Number of checkpoints."""
        return self.values.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one checkpoint's tensor."""
        return tuple(self.values.shape[1:])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def flat(self) -> np.ndarray:
        """(K, numel) view of the values."""
        return self.values.reshape(self.k, self.numel)

    @property
    def offsets(self) -> list[int]:
        """A group's part boundaries along the flat vector (len(sizes) + 1 of them); [0, D] otherwise."""
        return [0, *np.cumsum(self.sizes or (self.numel,)).tolist()]

    @cached_property
    def sha256(self) -> str:
        """sha256 of the float32 values (K, *shape) in C order: which examples a fit saw."""
        return hashlib.sha256(self.values.reshape(-1).view(np.uint8)).hexdigest()


def group_examples(examples: Sequence[Examples], name: str | None = None) -> Examples:
    """Tensors of any shapes (e.g. an MLP block's weights, biases and LayerNorm) as one group:
    one flat vector per checkpoint, the tensors flattened and concatenated in order.

    Args:
        examples: the group's tensors, each with the same number K of checkpoints.
        name: name of the group; the tensors' names joined by '+' when None.

    Returns:
        Examples of shape (K, D), D the sum of the tensors' sizes, with `parts` (their names)
        and `sizes`; `split_group` cuts a sample back into the tensors. The base, when every
        tensor has one, is concatenated the same way.
    """
    if not examples:
        raise WeightsmithError("tensor set", "needs at least one tensor")
    ks = {e.k for e in examples}
    if len(ks) != 1:
        raise WeightsmithError("tensor set", f"tensors have different checkpoint counts {sorted(ks)}")
    flat = np.concatenate([e.flat() for e in examples], axis=1)  # (K, D)
    bases = [e.base for e in examples]
    base = None if any(b is None for b in bases) else np.concatenate([b.reshape(-1) for b in bases])
    return Examples(
        name or "+".join(e.name for e in examples),
        flat,
        parts=tuple(e.name for e in examples),
        base=base,
        sizes=tuple(e.numel for e in examples),
    )


def split_group(vec: np.ndarray, offsets: Sequence[int], shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The tensors of one sample of a group (`group_examples`; offsets: `Examples.offsets`), as views of `vec`."""
    flat = np.asarray(vec).reshape(-1)
    assert len(offsets) == len(shapes) + 1 and offsets[-1] == flat.size, (offsets, flat.size)
    return [flat[a:b].reshape(s) for a, b, s in zip(offsets[:-1], offsets[1:], shapes, strict=True)]


@dataclass(frozen=True)
class SampleSpec:
    """What to draw: a tensor of `shape`, or only its chunk (a run of elements in C order)."""

    shape: tuple[int, ...]  # the target tensor's shape
    chunk: Chunk | None = None  # with a chunk, each sample is the 1-D run of chunk.size values

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        numel = math.prod(self.shape)
        c = self.chunk
        if c is not None and not (c.size >= 1 and 0 <= c.offset and c.stop <= numel):
            raise WeightsmithError("sample spec", f"chunk {c} is outside the tensor of shape {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one sample: `shape`, or `(chunk.size,)` with a chunk."""
        return self.shape if self.chunk is None else (self.chunk.size,)

    @property
    def region(self) -> slice:
        """The sampled elements of the flattened tensor."""
        return slice(0, self.numel) if self.chunk is None else slice(self.chunk.offset, self.chunk.stop)


@dataclass(frozen=True)
class State:
    """A fitted generator: numpy arrays plus JSON-able facts; see state_to_bytes."""

    generator: str  # registry name of the generator that fitted it
    version: int  # that generator's `version` at fit time
    config: dict  # the validated config (JSON-able)
    tensor: str  # name of the examples' tensor
    shape: tuple[int, ...]  # shape of one example
    checkpoints: int  # K, the number of examples
    fingerprint: str  # Generator.fingerprint of the fit's inputs
    arrays: dict[str, np.ndarray]  # learned arrays (numeric dtypes; names without "__state__")
    info: dict = field(default_factory=dict)  # JSON-able extras (e.g. training losses)
    parts: tuple[str, ...] = ()  # Examples.parts of a joint fit: the stacked tensors' names

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors along the flattened values: a joint stack's parts, else the one tensor."""
        return self.parts or (self.tensor,)


@dataclass(frozen=True)
class SampleResult:
    """The samples of one `sample` call and where each was computed."""

    arrays: list[np.ndarray]  # n arrays, float32, each of spec.out_shape
    devices: list[str]  # device that produced each array ("cpu", "cuda:0", ...)
    seed: int  # the seed they were drawn with


def device_name(device) -> str:
    """How samples name their device: "cuda:0" for a bare "cuda" (the current GPU), else as is."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def state_to_bytes(state: State) -> bytes:
    """The state as .npz bytes (arrays + one JSON member); never pickled."""
    meta = {
        "format": STATE_FORMAT,
        "generator": state.generator,
        "version": state.version,
        "config": state.config,
        "tensor": state.tensor,
        "shape": list(state.shape),
        "checkpoints": state.checkpoints,
        "fingerprint": state.fingerprint,
        "info": state.info,
        "parts": list(state.parts),
    }
    blob = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    members = {_META_KEY: blob, **{k: np.asarray(a) for k, a in state.arrays.items()}}
    assert len(members) == len(state.arrays) + 1, "an array may not be called " + _META_KEY
    buf = io.BytesIO()
    # what np.savez writes, by hand: any array names, and a fixed timestamp so the same
    # state always gives the same bytes
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for key, a in members.items():
            assert a.dtype.kind in "biufc", (key, a.dtype)  # numeric only: loads without pickle
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    return buf.getvalue()


def state_from_bytes(data: bytes) -> State:
    """The state written by `state_to_bytes`."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz[_META_KEY].tobytes())
            arrays = {k: npz[k] for k in npz.files if k != _META_KEY}
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise WeightsmithError("generator state", f"not a weightsmith generator state ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise WeightsmithError("generator state", f"unsupported state format {meta.get('format')!r}")
    return State(
        generator=meta["generator"],
        version=meta["version"],
        config=meta["config"],
        tensor=meta["tensor"],
        shape=tuple(meta["shape"]),
        checkpoints=meta["checkpoints"],
        fingerprint=meta["fingerprint"],
        arrays=arrays,
        info=meta["info"],
        parts=tuple(meta.get("parts", ())),
    )


def _seed_sequence(*key: str | int, spawn: int | None = None) -> np.random.SeedSequence:
    """A SeedSequence named by `key` (a tag, then seed, sample, ...): sha256 of its JSON, so keys
    of any length and any tensor name never collide; `spawn` picks a block of that stream."""
    words = np.frombuffer(hashlib.sha256(json.dumps(key).encode()).digest(), dtype="<u4")
    return np.random.SeedSequence([int(w) for w in words], spawn_key=() if spawn is None else (spawn,))


def sample_seed(seed: int, index: int, name: str | None = None) -> int:
    """A 63-bit seed for torch generators: sample `index` of a request, shared by every tensor
    of the sample (name None: a shared latent) or a tensor's own (`name`).

    Use it as `torch.Generator(d).manual_seed(...)`.
    """
    key = ("sample", seed, index) if name is None else ("tensor-seed", seed, index, name)
    return int(_seed_sequence(*key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def standard_normal(seed: int, index: int, name: str, start: int, stop: int, stream: str = "values") -> np.ndarray:
    """Values [start, stop) of tensor `name`'s N(0, 1) stream in sample `index` (float32).

    The stream is cut into blocks of NOISE_BLOCK values, each from its own seeded generator,
    so any range costs at most one block more than its length and equals the same range of
    any longer draw. `stream` names independent streams of one tensor (e.g. a tile's latent
    and its pixels).
    """
    out = np.empty(max(stop - start, 0), dtype=np.float32)
    for b in range(start // NOISE_BLOCK, -(-stop // NOISE_BLOCK)):
        b0 = b * NOISE_BLOCK
        lo, hi = max(start, b0), min(stop, b0 + NOISE_BLOCK)
        rng = np.random.Generator(np.random.PCG64(_seed_sequence("normal", stream, seed, index, name, spawn=b)))
        # values are drawn in order, so the first hi - b0 of a block are the same in any draw
        out[lo - start : hi - start] = rng.standard_normal(hi - b0, dtype=np.float32)[lo - b0 :]
    return out


@dataclass(frozen=True)
class Streams:
    """The random numbers of sample `index` of a request (see the module docstring)."""

    seed: int
    index: int
    names: tuple[str, ...]  # the tensors along the flattened values (State.names)
    spec: SampleSpec

    def choice(self) -> np.random.Generator:
        """Per-sample choices: the same generator for every tensor of the sample."""
        return np.random.default_rng(_seed_sequence("choice", self.seed, self.index))

    def member(self, k: int) -> int:
        """The zoo member (of k) that sample `index` starts from, the same for every tensor."""
        return int(self.choice().integers(k))

    def tensor(self, name: str) -> np.random.Generator:
        """Tensor `name`'s own generator, for draws taken whole (a permutation, coefficients)."""
        return np.random.default_rng(_seed_sequence("tensor", self.seed, self.index, name))

    def normal(self) -> np.ndarray:
        """N(0, 1) values of spec.region, shaped spec.out_shape, each tensor from its own stream."""
        region, numel = self.spec.region, self.spec.numel
        assert numel % len(self.names) == 0, (self.names, self.spec.shape)
        m = numel // len(self.names)  # values per stacked tensor
        pieces = []
        for j, name in enumerate(self.names):
            lo, hi = max(region.start, j * m), min(region.stop, (j + 1) * m)
            if lo < hi:
                pieces.append(standard_normal(self.seed, self.index, name, lo - j * m, hi - j * m))
        return np.concatenate(pieces).reshape(self.spec.out_shape)

    def spread(self, per_part: np.ndarray) -> np.ndarray:
        """One value per stacked tensor (len(names),), spread over spec.region: flat, or the
        one value itself (0-d) for a single tensor, so a big tensor costs no index array."""
        if len(self.names) == 1:
            return per_part[0]
        m = self.spec.numel // len(self.names)
        r = self.spec.region
        counts = [max(0, min(r.stop, (j + 1) * m) - max(r.start, j * m)) for j in range(len(self.names))]
        return np.repeat(per_part, counts)


def moments(values: np.ndarray, block: int = 1 << 22) -> tuple[float, float]:
    """Mean and (population) std of all values, accumulated in float64 one block at a time."""
    stats = RunningStats()
    flat = values.reshape(-1)
    for start in range(0, flat.size, block):
        stats.update(flat[start : start + block])
    return stats.mean, math.sqrt(stats.m2 / stats.n) if stats.n else 0.0


class Generator(ABC):
    """A way to draw new values of a tensor from examples of it.

    Subclasses set `name`, `Config`, `min_checkpoints` (2 for zoo methods) and implement
    `_fit`, and either `_draw` (one sample from its `Streams`) or `_sample` (whole
    batches, e.g. on a GPU with torch generators seeded by `sample_seed`).
    """

    name: ClassVar[str]  # registry name
    Config: ClassVar[type[GeneratorConfig]] = GeneratorConfig  # the options of `fit`
    min_checkpoints: ClassVar[int] = 1  # fewest examples K that `fit` accepts
    ordered: ClassVar[bool] = False  # needs the examples in training order (first .. last)
    version: ClassVar[int] = 1  # bump when `_fit` changes, so stored states are not reused
    fits_groups: ClassVar[bool] = False  # fits a group of tensors of any shapes as one object (`group_examples`)

    def __init__(self, device: str = "cpu"):
        self.device = device  # where sampling (and fitting) runs; numpy baselines ignore it

    def config(self, config: GeneratorConfig | Mapping[str, Any] | None = None) -> GeneratorConfig:
        """The validated config: defaults for None, a mapping checked against `Config`."""
        if isinstance(config, self.Config):
            return config
        try:
            return self.Config.model_validate(dict(config or {}))
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "config"
            raise WeightsmithError(f"{self.name} {where}", first["msg"]) from None

    def fingerprint(self, examples: Examples, config: GeneratorConfig | Mapping[str, Any] | None = None) -> str:
        """sha256 of the generator (name, version), its config and the examples' name and bytes."""
        h = hashlib.sha256()
        head = {
            "generator": self.name,
            "version": self.version,
            "config": self.config(config).model_dump(mode="json"),
            "tensor": examples.name,
            "shape": list(examples.values.shape),
        }
        if examples.parts:  # single tensors keep the fingerprints they had before parts existed
            head["parts"] = list(examples.parts)
        if examples.sizes:  # a group, not a stack
            head["sizes"] = list(examples.sizes)
        h.update(json.dumps(head, sort_keys=True).encode())
        h.update(examples.values.reshape(-1).view(np.uint8))
        if examples.base is not None:  # after the values: fingerprints of base-less examples are unchanged
            h.update(b"base")
            h.update(examples.base.reshape(-1).view(np.uint8))
        return h.hexdigest()

    def deterministic(self, config: GeneratorConfig | Mapping[str, Any] | None, k: int) -> bool:
        """True when every sample of a fit on k examples with this config is the same (score one)."""
        return False

    def fit(self, examples: Examples, config: GeneratorConfig | Mapping[str, Any] | None = None) -> State:
        """Learn from the examples.

        Args:
            examples: K checkpoints of one tensor; all values must be finite.
            config: a `Config`, a mapping of its fields, or None for the defaults.

        Returns:
            The state that `sample` draws from; the caller stores it under `fingerprint`. Its
            info["examples"] says which examples it saw (K and the values' sha256).
        """
        cfg = self.config(config)
        if examples.k < self.min_checkpoints:
            raise WeightsmithError(
                examples.name,
                f"{self.name} needs at least {self.min_checkpoints} checkpoints, got {examples.k}",
            )
        if examples.numel == 0:
            raise WeightsmithError(examples.name, f"examples of shape {examples.shape} hold no values")
        if not np.isfinite(examples.values).all():
            raise WeightsmithError(examples.name, "examples hold NaN or Inf values")
        if examples.sizes and not self.fits_groups:
            raise WeightsmithError(examples.name, f"{self.name} fits one tensor or a same-shape stack, not a group")
        arrays, info = self._fit(examples, cfg)
        return State(
            generator=self.name,
            version=self.version,
            config=cfg.model_dump(mode="json"),
            tensor=examples.name,
            shape=examples.shape,
            checkpoints=examples.k,
            fingerprint=self.fingerprint(examples, cfg),
            arrays=arrays,
            info={**info, "examples": {"k": examples.k, "sha256": examples.sha256}},
            parts=examples.parts,
        )

    def sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        """Draw `n` new arrays of `spec.out_shape` (float32, finite).

        The same (state, n, spec, seed) gives the same arrays on the same device; sample i
        does not depend on n.
        """
        if state.generator != self.name or state.version != self.version:
            raise WeightsmithError(
                state.tensor,
                f"state of {state.generator} v{state.version} given to {self.name} v{self.version}",
            )
        if n < 1:
            raise WeightsmithError(self.name, f"number of samples must be at least 1, got {n}")
        if seed < 0:
            raise WeightsmithError(self.name, f"seed must be non-negative, got {seed}")
        result = self._sample(state, n, spec, seed)
        assert len(result.arrays) == n and all(
            a.dtype == np.float32 and a.shape == spec.out_shape for a in result.arrays
        ), self.name
        return result

    @abstractmethod
    def _fit(self, examples: Examples, config: GeneratorConfig) -> tuple[dict[str, np.ndarray], dict]:
        """The learned arrays and JSON-able info."""

    def _sample(self, state: State, n: int, spec: SampleSpec, seed: int) -> SampleResult:
        config = self.Config.model_validate(state.config)
        arrays = []
        for i in range(n):
            streams = Streams(seed, i, state.names, spec)
            arrays.append(np.ascontiguousarray(self._draw(state, config, spec, streams), dtype=np.float32))
        return SampleResult(arrays=arrays, devices=["cpu"] * n, seed=seed)

    def _draw(self, state: State, config: GeneratorConfig, spec: SampleSpec, streams: Streams) -> np.ndarray:
        """One sample of spec.out_shape (used by the default `_sample`)."""
        raise NotImplementedError(f"{self.name} implements neither _draw nor _sample")

    def _require_shape(self, state: State, spec: SampleSpec) -> None:
        """For coordinate-wise methods: the target must have the examples' shape."""
        if tuple(spec.shape) != tuple(state.shape):
            raise WeightsmithError(
                state.tensor,
                f"{self.name} samples the examples' shape {state.shape}, not {spec.shape}",
            )
