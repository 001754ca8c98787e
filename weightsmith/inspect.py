"""Inspect: the tensors of a source as a user sees them (headers only, nothing written)."""

from __future__ import annotations

from weightsmith.extract import logical_names
from weightsmith.sources import open_source


def inspect_source(url: str) -> list[dict]:
    """One row per logical tensor: name, dtype, shape, bytes in the source.

    GPTQ groups are one row `<prefix>.weight` with dtype like `GPTQ-4bit (F32)`.
    """
    source = open_source(url)
    groups = {g.name: g for g in source.groups}
    rows = []
    for name in logical_names(source):
        group = groups.get(name)
        if group is None:
            e = source.tensors[name]
            rows.append({"name": name, "dtype": e.dtype, "shape": list(e.shape), "bytes": e.nbytes})
        else:
            rows.append(
                {
                    "name": name,
                    "dtype": f"GPTQ-{group.bits}bit (F32)",
                    "shape": list(group.shape),
                    "bytes": sum(source.tensors[c].nbytes for c in group.components),
                }
            )
    return rows
