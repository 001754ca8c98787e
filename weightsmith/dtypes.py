"""Tables of tensor dtypes: safetensors names -> numpy dtypes, how Zarr stores them, sizes.

Zarr has no bfloat16 or float8 dtypes, so those are stored as their raw bits (uint16 / uint8)
with a `dtype` attribute and viewed back exactly on read (ml_dtypes gives the numpy views).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# safetensors dtype name -> numpy dtype of the values (little-endian, as on disk)
_NUMPY: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# dtypes Zarr cannot hold natively -> the unsigned integer of the same width that holds the bits
_BITS: dict[str, np.dtype] = {
    "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}

SAFETENSORS_DTYPES = tuple(_NUMPY)


def is_known(dtype: str) -> bool:
    return dtype in _NUMPY


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype that holds values of a safetensors dtype."""
    return _NUMPY[dtype]


def itemsize(dtype: str) -> int:
    return _NUMPY[dtype].itemsize


def storage_dtype(dtype: str) -> np.dtype:
    """The dtype Zarr stores: the raw bits for BF16/F8, the value dtype otherwise."""
    return _BITS.get(dtype, _NUMPY[dtype])


def from_bytes(buf: bytes | memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """View raw little-endian bytes as an array of `dtype` (no copy where possible)."""
    return np.frombuffer(buf, dtype=_NUMPY[dtype]).reshape(shape)


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """The array as Zarr stores it (bit views for BF16/F8)."""
    bits = _BITS.get(dtype)
    return values.view(bits) if bits is not None else values


def from_storage(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Inverse of `to_storage`: exact, a view."""
    return stored.view(_NUMPY[dtype]) if dtype in _BITS else stored


def to_float32(values: np.ndarray) -> np.ndarray:
    """Values as float32 for images and statistics (bool and ints included)."""
    return values.astype(np.float32, copy=False)


def float_name(np_dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (inverse of `numpy_dtype`)."""
    for name, dt in _NUMPY.items():
        if dt == np_dtype:
            return name
    raise KeyError(str(np_dtype))
