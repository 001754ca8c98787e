"""Tensor names -> store keys: reversible, collision-free, safe as one path component.

Letters, digits, '_', '-' and '.' stay as they are, so `model.layers.0.mlp.weight` reads the
same; every other byte of the UTF-8 name becomes `%XX`, and so does a '.' that starts the key
or follows another '.', so a key is never `..`, never starts with '.', and holds no '/'.
Names longer than fit in a file name keep a readable prefix and a hash (`~` + 16 hex digits);
such keys are still unique, and the manifest maps them back to their names.
"""

from __future__ import annotations

import hashlib

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
MAX_KEY = 160  # leaves room for suffixes like ".zarr" under the usual 255-byte name limit


def encode_key(name: str) -> str:
    """The store key of a tensor name (lone surrogates from JSON escapes are kept exactly)."""
    out: list[str] = []
    prev_dot = True  # a leading '.' is escaped
    for byte in name.encode("utf-8", "surrogatepass"):
        ch = chr(byte)
        if ch in _SAFE or (ch == "." and not prev_dot):
            out.append(ch)
        else:
            out.append(f"%{byte:02X}")
        prev_dot = ch == "."
    key = "".join(out) or "%"  # the empty name gets a key of its own
    if len(key) > MAX_KEY:
        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        cut = MAX_KEY - 17
        cut -= 2 if key[cut - 2] == "%" else 1 if key[cut - 1] == "%" else 0  # keep %XX whole
        key = key[:cut] + "~" + digest
    return key


def decode_key(key: str) -> str:
    """Inverse of `encode_key` for keys without a hash suffix."""
    if "~" in key:
        raise ValueError(f"key {key!r} was shortened; look its name up in the manifest")
    if key == "%":
        return ""
    raw = bytearray()
    i = 0
    while i < len(key):
        if key[i] == "%":
            raw.append(int(key[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(key[i]))
            i += 1
    return raw.decode("utf-8", "surrogatepass")
