"""Container parsers by format: one module each, one line here."""

from __future__ import annotations

from collections.abc import Callable

from weightsmith.ranged import RangedReader
from weightsmith.sources.base import Container, TensorEntry

Parser = Callable[[RangedReader, int, str], tuple[Container, list[TensorEntry]]]


def parser_for(fmt: str) -> Parser:
    if fmt == "safetensors":
        from weightsmith.sources.safetensors import parse_safetensors

        return parse_safetensors
    if fmt == "gguf":
        from weightsmith.sources.gguf import parse_gguf

        return parse_gguf
    raise KeyError(fmt)


FORMATS = ("safetensors", "gguf")
