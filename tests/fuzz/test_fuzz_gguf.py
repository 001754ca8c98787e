"""Fuzzing the GGUF header parser with hypothesis.

Inputs: mutations and truncations of the two real GGUF fixtures and of files written here with
`gguf.GGUFWriter`, and GGUF headers built field by field with hostile values (counts, string
and array lengths, dims and offsets up to 2**64 - 1, unknown types, nesting bombs). For every
input, `parse_gguf` on an in-memory ranged reader either returns or raises `WeightsmithError`
with a one-line message; any other exception fails. It never asks for a byte past the end of
the file, never reads a byte twice, reads at most max(64 KiB, 2 x the header) and stays under
a traced-memory cap however large the declared sizes are.

The budget is small and fixed for CI; `WEIGHTSMITH_FUZZ_EXAMPLES=N` raises it (docs/FUZZING.md).
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from fuzz_helpers import FIXTURES, accepted_or_refused, fuzz_settings, probe
from gguf import GGMLQuantizationType
from hypothesis import given
from hypothesis import strategies as st

from weightsmith.sources.gguf import MAX_HEADER_BYTES, parse_gguf

FUZZ = fuzz_settings(300)
FIRST_WINDOW = 64 * 1024
REAL = sorted(FIXTURES.glob("gguf/*.gguf"))
BAD = sorted(FIXTURES.glob("bad/*.gguf"))
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    8,
    9,
    12,
    13,
    31,
    2**31,
    2**32 - 1,
    2**32,
    2**62,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


# ---------------------------------------------------------------------------------------------
# one input: the error contract, the memory cap and the ranges read


def parse_checked(data: bytes):
    """Parse under a memory cap; check the error contract and the ranges read."""
    reader = probe(data, "fuzz.gguf")
    result = accepted_or_refused(lambda: parse_gguf(reader, 0, "fuzz.gguf"), "parsing")
    pos = 0
    for start, end in reader.ranges:  # front to back, each byte once
        assert start == pos, reader.ranges
        pos = end
    assert reader.bytes_read <= min(len(data), MAX_HEADER_BYTES)
    if result is not None:
        container, entries = result
        data_start = container.segments[0].end
        assert reader.bytes_read <= max(FIRST_WINDOW, 2 * data_start)
        assert all(data_start <= e.start <= e.end <= len(data) for e in entries)
        pos = 0
        for s in container.segments:  # segments tile the file exactly
            assert s.start == pos and s.end >= s.start
            pos = s.end
        assert pos == len(data)
    return result


# ---------------------------------------------------------------------------------------------
# inputs: real files, files from the reference writer, files built field by field


def _writer_file(path: Path, variant: int) -> bytes:
    rng = np.random.default_rng(variant)
    w = gguf.GGUFWriter(path, "fuzz")
    if variant == 1:
        w.add_custom_alignment(64)
    w.add_string("general.name", "fuzz")
    w.add_uint32("t.u32", 7)
    w.add_array("t.strings", ["a", "bb", ""])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_float32("t.f32", 0.5)
    w.add_tensor("f32", rng.standard_normal((2, 3)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((4,)).astype(np.float16))
    q = GGMLQuantizationType.Q8_0 if variant != 2 else GGMLQuantizationType.Q4_0
    w.add_tensor("q", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), q), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, int]]:
    """(file bytes, header length) of every mutation seed."""
    folder = tmp_path_factory.mktemp("gguf-seeds")
    files = [p.read_bytes() for p in REAL] + [_writer_file(folder / f"w{i}.gguf", i) for i in range(3)]
    out = []
    for data in files:
        container, _ = parse_checked(data)
        out.append((data, container.segments[0].end))
    return out


def _mutate(draw, data: bytes, header: int) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        end = min(header, len(buf))
        # structure lives at the front (preamble, first keys) and the back (tensor infos)
        at = draw(
            st.integers(0, min(end, 256) - 1) | st.integers(max(0, end - 1024), end - 1) | st.integers(0, end - 1)
        )
        how = draw(st.sampled_from(["byte", "u32", "u64", "truncate", "splice", "delete"]))
        if how == "byte":
            buf[at] = draw(st.integers(0, 255))
        elif how in ("u32", "u64"):
            fmt = "<I" if how == "u32" else "<Q"
            value = draw(st.sampled_from([*INTERESTING, len(data), len(data) + 1]))
            buf[at : at + struct.calcsize(fmt)] = struct.pack(fmt, value % (1 << (8 * struct.calcsize(fmt))))
        elif how == "truncate":
            del buf[draw(st.integers(0, end) | st.integers(0, len(buf))) :]
        elif how == "splice":
            buf[at:at] = draw(st.binary(min_size=1, max_size=12))
        else:
            del buf[at : at + draw(st.integers(1, 16))]
    return bytes(buf)


def _string(draw, valid: bool = True) -> bytes:
    raw = draw(st.text(max_size=8)).encode() if valid else draw(st.binary(max_size=8))
    length = draw(st.just(len(raw)) | st.sampled_from(INTERESTING))
    return struct.pack("<Q", length) + raw


def _value(draw, vtype: int, depth: int) -> bytes:
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    if vtype in sizes:
        return draw(st.binary(min_size=sizes[vtype], max_size=sizes[vtype]))
    if vtype == 8:
        return _string(draw, draw(st.booleans()))
    if vtype == 9:
        itype = draw(st.sampled_from([*range(0, 14), 2**32 - 1]))
        n = draw(st.integers(0, 3))
        count = draw(st.just(n) | st.sampled_from(INTERESTING))
        if itype == 9 and depth < 12:
            items = b"".join(_value(draw, 9, depth + 1) for _ in range(n))
        else:
            items = b"".join(_value(draw, itype, depth + 1) for _ in range(n)) if itype in (*sizes, 8) else b""
        return struct.pack("<IQ", itype, count) + items
    return draw(st.binary(max_size=8))  # not a GGUF value type


@st.composite
def built_files(draw) -> bytes:
    """A GGUF header assembled field by field; every length and count may lie."""
    kvs = []
    for _ in range(draw(st.integers(0, 4))):
        vtype = draw(st.sampled_from([*range(0, 14), 2**31]))
        key = draw(st.sampled_from([b"general.alignment"]) | st.text(max_size=10).map(str.encode))
        kvs.append(struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + _value(draw, vtype, 0))
    if draw(st.booleans()):  # an array nesting bomb
        depth = draw(st.integers(6, 40))
        kvs.append(
            struct.pack("<Q", 4)
            + b"deep"
            + struct.pack("<I", 9)
            + struct.pack("<IQ", 9, 1) * depth
            + struct.pack("<IQ", 4, 0)
        )
    infos = []
    for i in range(draw(st.integers(0, 3))):
        name = f"t{i}".encode() if draw(st.booleans()) else draw(st.binary(max_size=6))
        n_dims = draw(st.integers(0, 5) | st.sampled_from([2**32 - 1]))
        dims = [draw(st.integers(0, 64) | st.sampled_from(INTERESTING)) for _ in range(min(n_dims, 5))]
        gtype = draw(st.sampled_from([0, 1, 8, 30, 2, 12, 39, 40, 99, 2**32 - 1]))
        offset = draw(st.sampled_from([0, 32, 64, 7]) | st.sampled_from(INTERESTING))
        infos.append(
            struct.pack("<Q", len(name))
            + name
            + struct.pack("<I", n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", gtype, offset)
        )
    n_kv = draw(st.just(len(kvs)) | st.sampled_from(INTERESTING))
    n_tensors = draw(st.just(len(infos)) | st.sampled_from(INTERESTING))
    magic = draw(st.sampled_from([b"GGUF", b"GGUF", b"FUGG", b"GGU"]))
    version = draw(st.sampled_from([3, 3, 2, 1, 0x03000000, 2**32 - 1]))
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % 32)
    return head + draw(st.binary(max_size=600))


@st.composite
def mutated(draw, seeds: list[tuple[bytes, int]]) -> bytes:
    data, header = draw(st.sampled_from(seeds))
    return _mutate(draw, data, header)


# ---------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(data=st.data())
def test_mutated_files_are_parsed_or_refused_cleanly(seeds, data) -> None:
    parse_checked(data.draw(mutated(seeds)))


@FUZZ
@given(built_files())
def test_hostile_headers_are_parsed_or_refused_cleanly(data: bytes) -> None:
    parse_checked(data)


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_fixtures_are_refused(path: Path) -> None:
    assert parse_checked(path.read_bytes()) is None


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("n_tensors", 2**64 - 1),
        ("n_kv", 2**63),
        ("string", 2**64 - 1),
        ("array", 2**62),
        ("dims", 2**63),
    ],
)
def test_huge_declared_sizes_allocate_nothing(field_name: str, value: int) -> None:
    """One count or length near 2**64 in an otherwise small file: a prompt error, little memory."""
    n_tensors, n_kv = {"n_tensors": (value, 0), "n_kv": (0, value)}.get(field_name, (0, 1))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)
    if field_name == "string":
        head += struct.pack("<Q", 1) + b"k" + struct.pack("<IQ", 8, value)
    elif field_name == "array":
        head += struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, value)
    elif field_name == "dims":
        head = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t"
        head += struct.pack("<I", 2) + struct.pack("<QQ", value, value) + struct.pack("<IQ", 0, 0)
    data = head + b"\0" * 4096
    assert parse_checked(data) is None
