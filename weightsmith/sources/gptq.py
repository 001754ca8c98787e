"""GPTQ checkpoints: group `qweight/qzeros/scales/g_idx` tensors and dequantise them to float32.

A GPTQ linear layer `<prefix>` is stored as (AutoGPTQ / GPTQModel layout, `bits` in 2, 3, 4, 8):
- `qweight` I32 [packed(in), out]: quantised values q[i, o], packed along the input dim;
- `qzeros` I32 [n_groups, packed(out)]: zero points z[g, o], packed along the output dim;
- `scales` F16 [n_groups, out]: s[g, o];
- `g_idx` I32 [in] (optional): the group of each input row (act-order permutes it).
Packing is a little-endian bit stream per column: value k occupies bits k*bits .. k*bits+bits-1
of the column, lowest bits first; 3-bit values straddle int32 words (32 values in 3 words).

The logical weight is `<prefix>.weight` [out, in], as transformers' nn.Linear expects:
    v1 ("gptq"):    W[o, i] = s[g, o] * (q[i, o] - ((z[g, o] + 1) & maxq))
    v2 ("gptq_v2"): W[o, i] = s[g, o] * (q[i, o] - z[g, o])
with g = g_idx[i], or i // group_size without g_idx.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.sources.base import GptqGroup, TensorEntry

# The tensors of one group, by suffix; g_idx is optional and `.bias` stays a normal tensor.
_REQUIRED = ("qweight", "qzeros", "scales")
_OPTIONAL = ("g_idx",)
# Suffixes that only GPTQ uses: a prefix with one of them is a GPTQ group (or a broken one).
# A lone `.scales` is not, since plain models may have tensors of that name.
_MARKERS = ("qweight", "qzeros", "g_idx")

# Allowed safetensors dtypes per component.
_DTYPES: dict[str, tuple[str, ...]] = {
    "qweight": ("I32",),
    "qzeros": ("I32",),
    "g_idx": ("I32",),
    "scales": ("F16", "F32", "BF16"),
}

_BITS = (2, 3, 4, 8)
_FORMATS = ("gptq", "gptq_v2")

# Where each setting comes from, in order after quantize_config.json / quantization_config.
_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "bits": ("bits",),
    "group_size": ("group_size",),
    # GPTQModel writes "checkpoint_format"; its newer configs also carry "format".
    "checkpoint_format": ("checkpoint_format", "format"),
}
_METADATA_KEYS: dict[str, tuple[str, ...]] = {
    "bits": ("bits", "gptq_bits"),
    "group_size": ("group_size", "gptq_group_size"),
    "checkpoint_format": ("checkpoint_format",),
}

# AutoGPTQ QuantLinear's shift table for bits=3 (`wf`): a triple of int32 words holds 32 values;
# row w gives the right shift of each of 12 slots of word w. Slot [0, 10] holds the low 2 bits of
# value 10 (bits 30-31 of word 0) and slot [1, 11] the low bit of value 21 (bit 31 of word 1);
# their high bits come from the bottom of the next word (see `_unpack_3bit`).
_WF3 = np.array(
    [
        [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0],
        [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31],
        [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0],
    ],
    dtype=np.uint32,
)
_WORD_BITS = 32
_VALUES_PER_3BIT_TRIPLE = 32  # 3 int32 words = 96 bits = 32 three-bit values


def find_groups(
    entries: Mapping[str, TensorEntry],
    quant_config: dict | None,
    metadata: Mapping[str, str],
    where: str,
) -> list[GptqGroup]:
    """Group the GPTQ tensors of a checkpoint into logical weights.

    Args:
        entries: every tensor of the checkpoint (or of one file), by name.
        quant_config: contents of quantize_config.json, or config.json's "quantization_config",
            or None. Its settings override the file's metadata.
        metadata: the safetensors `__metadata__` (string values).
        where: the file or URL, for error messages.

    Returns:
        One GptqGroup per `<prefix>.qweight` / `.qzeros` / `.scales` (/ `.g_idx`) set, in the
        order of their first tensor in `entries`; empty when there are none.

    Raises:
        WeightsmithError: a group misses a tensor, has a wrong dtype, inconsistent shapes, or the
            bits / group size / checkpoint format are unsupported or cannot be inferred.
    """
    prefixes = _candidate_prefixes(entries)
    if not prefixes:
        return []
    config = quant_config or {}
    method = config.get("quant_method")
    if method is not None and str(method).lower() != "gptq":
        raise WeightsmithError(where, f"quant_method {method!r} is not GPTQ; its qweight/qzeros cannot be read")
    fmt = _checkpoint_format(config, metadata, where)
    bits = _int_setting("bits", config, metadata, where)
    if bits is not None and bits not in _BITS:
        raise WeightsmithError(where, f"GPTQ bits={bits} is not supported (only {_BITS})")
    group_size = _int_setting("group_size", config, metadata, where)
    if group_size is not None and group_size != -1 and group_size <= 0:
        raise WeightsmithError(where, f"GPTQ group_size={group_size} must be -1 or positive")
    return [_make_group(p, entries, bits, group_size, fmt, where) for p in prefixes]


def dequantize(
    group: GptqGroup,
    qweight: np.ndarray,
    qzeros: np.ndarray,
    scales: np.ndarray,
    g_idx: np.ndarray | None,
    rows: slice = slice(None),
) -> np.ndarray:
    """Dequantise a GPTQ group to its float32 weight [out, in], or a band of its rows.

    Only the columns of `qweight`, `qzeros` and `scales` that the band needs are unpacked, so
    callers can stream a big layer band by band without the whole float32 matrix.

    Args:
        group: the group, from `find_groups`.
        qweight: int32 (or uint32) [packed(in), out].
        qzeros: int32 (or uint32) [n_groups, packed(out)].
        scales: float [n_groups, out].
        g_idx: int [in], or None when the group has none (then g = i // group_size).
        rows: output features o0:o1 to return (step 1); all by default.

    Returns:
        float32 C-contiguous array [o1 - o0, in]: rows o0:o1 of W.

    Raises:
        WeightsmithError: the arrays do not match the group, or g_idx points outside scales.
        ValueError: `rows` has a step other than 1, or g_idx is missing for a group that has one.
    """
    names = _Names(group.qweight, group.qzeros, group.scales, group.g_idx)
    if group.g_idx is not None and g_idx is None:
        raise ValueError(f"{group.name}: the group has {group.g_idx}, but g_idx was not given")
    g_shape = None if g_idx is None else tuple(np.shape(g_idx))
    shapes = (tuple(qweight.shape), tuple(qzeros.shape), tuple(scales.shape), g_shape)
    in_f, out_f = _check_layout(group.bits, group.group_size, *shapes, names, group.name)
    if (out_f, in_f) != group.shape:
        raise WeightsmithError(group.name, f"arrays give shape {(out_f, in_f)}, the group says {group.shape}")
    o0, o1, step = rows.indices(out_f)
    if step != 1:
        raise ValueError(f"rows must have step 1, got {rows}")
    n = max(o1 - o0, 0)
    if n == 0:
        return np.zeros((0, in_f), dtype=np.float32)

    groups = _group_of_rows(group, g_idx, in_f, scales.shape[0])
    q = _unpack_rows(_as_u32(qweight[:, o0:o1], group.qweight), group.bits)[:in_f]  # [in, n]
    z = _zeros_band(group, qzeros, o0, o1)  # [n_groups, n]
    s = np.asarray(scales[:, o0:o1]).astype(np.float32)  # [n_groups, n]

    # W[o, i] = s[g_i, o] * (q[i, o] - z[g_i, o]), written straight into [out, in] C order.
    out = np.empty((n, in_f), dtype=np.float32)
    out[...] = q.T
    out -= z[groups].T
    out *= s[groups].T
    return out


class _Names:
    """Tensor names of one group, for error messages."""

    def __init__(self, qweight: str, qzeros: str, scales: str, g_idx: str | None):
        self.qweight, self.qzeros, self.scales, self.g_idx = qweight, qzeros, scales, g_idx


def _candidate_prefixes(entries: Mapping[str, TensorEntry]) -> list[str]:
    """Prefixes that have a GPTQ-only tensor, in the order first seen."""
    seen: dict[str, None] = {}
    for name in entries:
        prefix, _, suffix = name.rpartition(".")
        if prefix and suffix in _MARKERS:
            seen.setdefault(prefix, None)
    return list(seen)


def _make_group(
    prefix: str,
    entries: Mapping[str, TensorEntry],
    bits: int | None,
    group_size: int | None,
    fmt: str,
    where: str,
) -> GptqGroup:
    """Check one prefix's tensors and build its group."""
    present = {s: f"{prefix}.{s}" for s in _REQUIRED + _OPTIONAL if f"{prefix}.{s}" in entries}
    for suffix in _REQUIRED:
        if suffix not in present:
            have = ", ".join(sorted(present.values()))
            raise WeightsmithError(where, f"GPTQ tensor {prefix}.{suffix} is missing (found only {have})")
    for suffix, name in present.items():
        entry = entries[name]
        if entry.encoding != "raw" or entry.dtype not in _DTYPES[suffix]:
            allowed = " or ".join(_DTYPES[suffix])
            raise WeightsmithError(where, f"GPTQ tensor {name} has dtype {entry.dtype}, expected {allowed}")
    names = _Names(present["qweight"], present["qzeros"], present["scales"], present.get("g_idx"))
    qw, qz, sc = (entries[present[s]].shape for s in _REQUIRED)
    gi = entries[names.g_idx].shape if names.g_idx else None
    _check_ranks(qw, qz, sc, gi, names, where)
    if bits is None:
        bits = _infer_bits(qw, qz, sc, gi, names, where)
    if group_size is None:
        group_size = _infer_group_size(bits, qw, sc, gi, names, where)
    in_f, out_f = _check_layout(bits, group_size, qw, qz, sc, gi, names, where)
    return GptqGroup(
        prefix=prefix,
        qweight=names.qweight,
        qzeros=names.qzeros,
        scales=names.scales,
        g_idx=names.g_idx,
        bits=bits,
        group_size=group_size,
        checkpoint_format=fmt,
        in_features=in_f,
        out_features=out_f,
    )


def _setting(key: str, config: Mapping, metadata: Mapping[str, str]) -> tuple[object, str] | tuple[None, None]:
    """(value, source key) of a setting: the quant config first, then the file's metadata."""
    for k in _CONFIG_KEYS[key]:
        if config.get(k) is not None:
            return config[k], f"quant config {k!r}"
    for k in _METADATA_KEYS[key]:
        if metadata.get(k) is not None:
            return metadata[k], f"metadata {k!r}"
    return None, None


def _int_setting(key: str, config: Mapping, metadata: Mapping[str, str], where: str) -> int | None:
    """An integer setting (bits, group_size), or None when neither source has it."""
    value, source = _setting(key, config, metadata)
    if value is None:
        return None
    # int("4") and int(4) are fine; int(True) and int(4.5) would silently pass as numbers
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise WeightsmithError(where, f"GPTQ {source} is {value!r}, not an integer")


def _checkpoint_format(config: Mapping, metadata: Mapping[str, str], where: str) -> str:
    """ "gptq" (v1, zeros stored minus one) or "gptq_v2"; "gptq" when unspecified.

    Only the leading word counts, so descriptive values such as "gptq (v1 zeros, stored z-1)"
    are read as "gptq".
    """
    value, source = _setting("checkpoint_format", config, metadata)
    if value is None:
        return "gptq"
    match = re.match(r"\s*(\w+)", str(value))
    fmt = match.group(1).lower() if match else ""
    if fmt not in _FORMATS:
        raise WeightsmithError(where, f"GPTQ {source} is {value!r}; supported formats are {', '.join(_FORMATS)}")
    return fmt


def _check_ranks(
    qw: tuple[int, ...],
    qz: tuple[int, ...],
    sc: tuple[int, ...],
    gi: tuple[int, ...] | None,
    names: _Names,
    where: str,
) -> None:
    """qweight, qzeros and scales are matrices, g_idx a vector."""
    for name, shape, rank in ((names.qweight, qw, 2), (names.qzeros, qz, 2), (names.scales, sc, 2)):
        if len(shape) != rank:
            raise WeightsmithError(where, f"GPTQ tensor {name} has shape {list(shape)}, not 2-D")
    if gi is not None and len(gi) != 1:
        raise WeightsmithError(where, f"GPTQ tensor {names.g_idx} has shape {list(gi)}, not 1-D")


def _infer_bits(
    qw: tuple[int, ...],
    qz: tuple[int, ...],
    sc: tuple[int, ...],
    gi: tuple[int, ...] | None,
    names: _Names,
    where: str,
) -> int:
    """Bits from shapes: 32 * qweight rows / len(g_idx), else 32 * qzeros cols / scales cols."""
    if gi is not None:
        num, den = _WORD_BITS * qw[0], gi[0]
        basis = f"{names.qweight} {list(qw)} and {names.g_idx} {list(gi)}"
    else:
        num, den = _WORD_BITS * qz[1], sc[1]
        basis = f"{names.qzeros} {list(qz)} and {names.scales} {list(sc)}"
    if den > 0 and num % den == 0 and num // den in _BITS:
        return num // den
    raise WeightsmithError(where, f"cannot infer GPTQ bits from {basis}; give 'bits' in quantize_config.json")


def _infer_group_size(
    bits: int,
    qw: tuple[int, ...],
    sc: tuple[int, ...],
    gi: tuple[int, ...] | None,
    names: _Names,
    where: str,
) -> int:
    """Group size from shapes: in_features / scales rows; -1 for a single group."""
    in_f = gi[0] if gi is not None else _unpacked_len(qw[0], bits)
    n_groups = sc[0]
    if n_groups == 1:
        return -1
    if n_groups > 0 and in_f % n_groups == 0:
        return in_f // n_groups
    if gi is not None and n_groups > 0:
        # g_idx says which group each row is in, so the size is only informative here.
        return math.ceil(in_f / n_groups)
    raise WeightsmithError(
        where,
        f"cannot infer GPTQ group_size: {in_f} input features over {names.scales} {list(sc)}; "
        "give 'group_size' in quantize_config.json",
    )


def _check_layout(
    bits: int,
    group_size: int,
    qw: tuple[int, ...],
    qz: tuple[int, ...],
    sc: tuple[int, ...],
    gi: tuple[int, ...] | None,
    names: _Names,
    where: str,
) -> tuple[int, int]:
    """Check that all shapes fit `bits` and `group_size`; return (in_features, out_features)."""
    _check_ranks(qw, qz, sc, gi, names, where)
    out_f = sc[1]
    if gi is not None:
        in_f = gi[0]
    elif bits == 3 and qw[0] % 3:
        raise WeightsmithError(where, f"GPTQ tensor {names.qweight} has {qw[0]} rows, not a multiple of 3 for 3 bits")
    else:
        in_f = _unpacked_len(qw[0], bits)
    if qw[0] != _packed_len(in_f, bits) or qw[1] != out_f:
        raise WeightsmithError(
            where,
            f"GPTQ tensor {names.qweight} has shape {list(qw)}; {bits}-bit weights with "
            f"{in_f} inputs and {out_f} outputs ({names.scales} {list(sc)}) need "
            f"{[_packed_len(in_f, bits), out_f]}",
        )
    n_groups = 1 if group_size == -1 else math.ceil(in_f / group_size)
    if sc[0] != n_groups:
        raise WeightsmithError(
            where,
            f"GPTQ tensor {names.scales} has shape {list(sc)}; group_size {group_size} over "
            f"{in_f} inputs needs {n_groups} rows",
        )
    if qz != (n_groups, _packed_len(out_f, bits)):
        raise WeightsmithError(
            where,
            f"GPTQ tensor {names.qzeros} has shape {list(qz)}; {bits}-bit zeros for "
            f"{names.scales} {list(sc)} need {[n_groups, _packed_len(out_f, bits)]}",
        )
    return in_f, out_f


def _packed_len(n: int, bits: int) -> int:
    """int32 words that hold n values: 3-bit values come in triples of words per 32 values."""
    if bits == 3:
        return 3 * math.ceil(n / _VALUES_PER_3BIT_TRIPLE)
    return math.ceil(n / (_WORD_BITS // bits))


def _unpacked_len(words: int, bits: int) -> int:
    """Values held by `words` int32 words (3-bit: 32 per 3 words)."""
    if bits == 3:
        return words // 3 * _VALUES_PER_3BIT_TRIPLE
    return words * (_WORD_BITS // bits)


def _packed_span(o0: int, o1: int, bits: int) -> tuple[int, int, int]:
    """Packed words [w0, w1) that hold values o0:o1, and the offset of o0 in their unpacking."""
    per = _VALUES_PER_3BIT_TRIPLE if bits == 3 else _WORD_BITS // bits
    words = 3 if bits == 3 else 1
    first, last = o0 // per, math.ceil(o1 / per)
    return first * words, last * words, o0 - first * per


def _as_u32(a: np.ndarray, name: str) -> np.ndarray:
    """A uint32 view of int32 data, so that right shifts are logical, not arithmetic."""
    a = np.asarray(a)
    if a.dtype.kind not in "iu" or a.dtype.itemsize != 4:
        raise WeightsmithError(name, f"has dtype {a.dtype}, expected int32")
    return a.view(np.uint32)


def _unpack_rows(packed: np.ndarray, bits: int) -> np.ndarray:
    """Unpack uint32 [words, C] along axis 0 to uint32 [values, C], lowest bits first."""
    if bits == 3:
        return _unpack_3bit(packed)
    per = _WORD_BITS // bits
    shifts = np.arange(0, _WORD_BITS, bits, dtype=np.uint32)
    mask = np.uint32((1 << bits) - 1)
    # value k of word r is (word >> (k * bits)) & maxq, and it is row r * per + k
    values = (packed[:, None, :] >> shifts[None, :, None]) & mask
    return values.reshape(packed.shape[0] * per, packed.shape[1])


def _unpack_3bit(packed: np.ndarray) -> np.ndarray:
    """AutoGPTQ QuantLinear's bits=3 unpacking: 32 values per 3 words, along axis 0.

    Word 0 holds values 0-9 and the low 2 bits of value 10; word 1 the top bit of value 10,
    values 11-20 and the low bit of value 21; word 2 the top 2 bits of value 21 and values 22-31.
    """
    triples, cols = packed.shape[0] // 3, packed.shape[1]
    words = packed.reshape(triples, 3, 1, cols)
    slots = words >> _WF3[None, :, :, None]  # [triples, 3 words, 12 slots, cols]
    # value 10: bits 30-31 of word 0, then bit 0 of word 1 as its bit 2
    slots[:, 0, 10] = (slots[:, 0, 10] & 0x3) | ((slots[:, 1, 0] << 2) & 0x4)
    # value 21: bit 31 of word 1, then bits 0-1 of word 2 as its bits 1-2
    slots[:, 1, 11] = (slots[:, 1, 11] & 0x1) | ((slots[:, 2, 0] << 1) & 0x6)
    slots &= 0x7
    values = np.concatenate([slots[:, 0, :11], slots[:, 1, 1:12], slots[:, 2, 1:11]], axis=1)
    return values.reshape(triples * _VALUES_PER_3BIT_TRIPLE, cols)


def _zeros_band(group: GptqGroup, qzeros: np.ndarray, o0: int, o1: int) -> np.ndarray:
    """Effective zero points [n_groups, o1 - o0] as float32, v1's off-by-one undone."""
    w0, w1, skip = _packed_span(o0, o1, group.bits)
    packed = _as_u32(qzeros[:, w0:w1], group.qzeros)
    # qzeros packs along the output dim: unpack the transpose along its rows.
    z = _unpack_rows(packed.T, group.bits).T[:, skip : skip + (o1 - o0)]
    if group.checkpoint_format == "gptq":
        # v1 stores zero - 1, so a zero of 0 wraps to maxq; AutoGPTQ adds 1 and masks to bits
        # (`zeros = (zeros + 1) & (2**bits - 1)`), which recovers every zero in [0, maxq].
        z = (z + np.uint32(1)) & np.uint32((1 << group.bits) - 1)
    return z.astype(np.float32)


def _group_of_rows(group: GptqGroup, g_idx: np.ndarray | None, in_f: int, n_groups: int) -> np.ndarray:
    """The group of each input row: g_idx (act-order), else i // group_size."""
    if g_idx is None:
        if group.group_size == -1:
            return np.zeros(in_f, dtype=np.intp)
        return np.arange(in_f, dtype=np.intp) // group.group_size
    g = np.asarray(g_idx)
    where = group.g_idx or group.name
    if g.dtype.kind not in "iu":
        raise WeightsmithError(where, f"has dtype {g.dtype}, expected int32")
    if g.size and (int(g.min()) < 0 or int(g.max()) >= n_groups):
        raise WeightsmithError(
            where,
            f"has group indices {int(g.min())}..{int(g.max())}, outside the {n_groups} groups of {group.scales}",
        )
    return g.astype(np.intp)
