"""Fuzzing the safetensors header parser with hypothesis.

Inputs: random JSON headers, well-formed files with one hostile tweak (huge shapes, overflowing
or negative offsets, wrong header lengths), and byte-level mutations and truncations of the
real third-party fixtures. For every input, `parse_safetensors` on an in-memory ranged reader
either returns or raises `WeightsmithError` with a one-line message; any other exception fails.
It reads only the 8-byte length and the declared header, never past the end of the file; it
stays under a traced-memory cap whatever sizes the header declares; and a header it accepts
is one the reference library (safetensors' Rust parser, the version pinned in pyproject) accepts,
and a header the reference accepts is one it accepts: no stricter and no more lenient.

The budget is small and fixed for CI; `WEIGHTSMITH_FUZZ_EXAMPLES=N` raises it (docs/FUZZING.md).
"""

from __future__ import annotations

import json
import struct

import pytest
from fuzz_helpers import FIXTURES, accepted_or_refused, fuzz_settings, probe
from hypothesis import given
from hypothesis import strategies as st
from safetensors._safetensors_rust import SafetensorError
from safetensors._safetensors_rust import deserialize as reference_deserialize

from weightsmith.dtypes import SAFETENSORS_DTYPES, itemsize
from weightsmith.errors import WeightsmithError
from weightsmith.sources.safetensors import parse_safetensors

FUZZ = fuzz_settings(300)
SMALL_FIXTURES = sorted(
    p
    for p in [
        *FIXTURES.glob("safetensors/**/*.safetensors"),
        *FIXTURES.glob("gptq/*.safetensors"),
        *FIXTURES.glob("bad/*.safetensors"),
    ]
    if p.stat().st_size <= 512 * 1024
)


# ---------------------------------------------------------------------------------------------
# one input: the error contract, the memory cap and the ranges read


def parse_checked(data: bytes):
    """Parse under a memory cap; check the error contract and the ranges read."""
    reader = probe(data, "fuzz.safetensors")
    result = accepted_or_refused(lambda: parse_safetensors(reader, 0, "fuzz.safetensors"), "parsing")
    declared = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    for start, end in reader.ranges:  # the length, then the declared header: nothing else
        assert (start, end) in ((0, 8), (8, 8 + declared)), (start, end, declared)
    if result is not None:
        container, entries = result
        data_start = 8 + declared
        pos = data_start
        for e in entries:  # tensors tile the data section exactly, in order
            assert e.start == pos and e.end >= e.start
            pos = e.end
        assert pos == len(data) == container.size
        assert container.segments[0].start == 0 and container.segments[-1].end == len(data)
    return result


def file_bytes(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header_text) if length is None else length) + header_text + data


# ---------------------------------------------------------------------------------------------
# strategies

HUGE = [2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30]
dims = st.integers(0, 6) | st.sampled_from(HUGE) | st.integers(-3, -1)
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)


def _containers(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)


json_any = st.recursive(json_leaf, _containers, max_leaves=12)
names = st.text(max_size=10) | st.sampled_from(["..", "../../x", "/abs", "a\x00b", "\ud800", "__metadata__", ""])
dtype_names = st.sampled_from([*SAFETENSORS_DTYPES, "F8_E8M0", "F4", "C64", "f32", ""])
tensor_info = st.fixed_dictionaries(
    {
        "dtype": dtype_names | json_any,
        "shape": st.lists(dims, max_size=5) | json_any,
        "data_offsets": st.lists(st.integers(0, 300) | st.sampled_from(HUGE) | st.integers(-5, -1), max_size=3)
        | json_any,
    },
    optional={"extra": json_any},
)
length_field = st.sampled_from(["exact", "short", "long", "huge", "limit"])


@st.composite
def random_header_files(draw) -> bytes:
    header = draw(st.dictionaries(names, tensor_info | json_any, max_size=5))
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_any | st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    text = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    data = draw(st.binary(max_size=300))
    return with_length(draw, text, data)


def with_length(draw, text: bytes, data: bytes) -> bytes:
    how = draw(length_field)
    n = len(text)
    length = {
        "exact": n,
        "short": max(0, n - draw(st.integers(1, 8))),
        "long": n + draw(st.integers(1, 64)),
        "huge": draw(st.sampled_from([2**64 - 1, 2**63, 2**32, len(data) + n + 1])),
        "limit": 100_000_000,
    }[how]
    return file_bytes(text, data, length)


@st.composite
def tweaked_files(draw) -> bytes:
    """A well-formed file (contiguous offsets, exact data) with at most one hostile tweak."""
    header: dict = {}
    data = b""
    for name in draw(st.lists(st.text(max_size=6), max_size=4, unique=True)):
        dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        n = itemsize(dtype)
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + n]}
        data += draw(st.binary(min_size=n, max_size=n))
    tweak = draw(st.sampled_from(["none", "shape", "offsets", "data", "metadata", "extra", "repeat"]))
    if header and tweak in ("shape", "offsets"):
        info = header[draw(st.sampled_from(sorted(header)))]
        if tweak == "shape":
            info["shape"] = draw(st.lists(dims, min_size=1, max_size=4)) + draw(st.sampled_from([[], [0]]))
        else:
            info["data_offsets"] = [draw(st.integers(-2, 2**64 + 2) | st.sampled_from(HUGE)) for _ in range(2)]
    elif tweak == "data":
        cut = draw(st.integers(-min(len(data), 16), 16))
        data = data[:cut] if cut < 0 else data + b"\0" * cut
    elif tweak == "metadata":
        header["__metadata__"] = draw(json_any)
    elif header and tweak == "extra":  # an unknown key in an entry: the reference ignores it
        header[draw(st.sampled_from(sorted(header)))][draw(st.sampled_from(["x", "quant", "dtype "]))] = draw(json_any)
    text = json.dumps(header).encode()
    if header and tweak == "repeat":  # a name twice: the reference keeps the last entry
        name = draw(st.sampled_from(sorted(header)))
        text = text[:-1] + b", " + json.dumps({name: header[name]}).encode()[1:]
    # whitespace around the JSON, as writers pad headers to 8 bytes
    pad = draw(st.sampled_from([b"", b" ", b"\n", b"\t\r\n", b"\x00"]))
    text = pad * draw(st.integers(0, 1)) + text + pad * draw(st.integers(0, 7))
    return with_length(draw, text, data) if tweak == "none" and draw(st.booleans()) else file_bytes(text, data)


@st.composite
def mutated_fixtures(draw) -> bytes:
    """A real file with bytes flipped (mostly in its header), spliced, truncated or re-sized."""
    data = bytearray(draw(st.sampled_from(SMALL_FIXTURES)).read_bytes())
    header_end = min(len(data), 8 + struct.unpack("<Q", bytes(data[:8]))[0]) if len(data) >= 8 else len(data)
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "flip", "splice", "truncate", "length", "delete"]))
        if not data:
            break
        at = draw(st.integers(0, max(0, min(header_end, len(data)) - 1)))
        if how == "flip":
            data[at] = draw(st.integers(0, 255))
        elif how == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b'"', b"{", b"}", b"\\u0000"]))
        elif how == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif how == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.sampled_from([header_end - 8 + 1, 0])))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# properties


@FUZZ
@given(random_header_files())
def test_random_headers_are_parsed_or_refused_cleanly(data: bytes) -> None:
    agrees_with_reference(data, parse_checked(data))


def agrees_with_reference(data: bytes, result) -> None:
    """We accept exactly what the reference library accepts."""
    try:
        reference_deserialize(data)
        reference_ok, why = True, ""
    except SafetensorError as e:
        reference_ok, why = False, str(e)
    assert (result is not None) == reference_ok, f"reference {'accepts' if reference_ok else 'refuses: ' + why}"


@FUZZ
@given(tweaked_files())
def test_hostile_tweaks_are_parsed_or_refused_cleanly(data: bytes) -> None:
    agrees_with_reference(data, parse_checked(data))


@FUZZ
@given(mutated_fixtures())
def test_mutated_fixtures_are_parsed_or_refused_cleanly(data: bytes) -> None:
    agrees_with_reference(data, parse_checked(data))


@pytest.mark.parametrize(
    "dtype, shape",
    [("F64", [2**31, 2**53 + 1, 0]), ("F32", [0, 2**64]), ("U8", [2**64, 0])],
    ids=["product-overflows", "dim-2**64", "dim-2**64-first"],
)
def test_shape_whose_size_overflows_is_refused(dtype: str, shape: list[int]) -> None:
    """Found by this fuzzer: the reference refuses these headers, so must we."""
    data = file_bytes(json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}}).encode(), b"")
    with pytest.raises(SafetensorError) as reference:
        reference_deserialize(data)
    assert "deserializing" in str(reference.value)
    with pytest.raises(WeightsmithError):
        parse_safetensors(probe(data, "fuzz.safetensors"), 0, "f.safetensors")


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 100_000_001, 100_000_000, 99_999_999], ids=lambda n: f"len={n}")
def test_huge_declared_header_length_reads_nothing_more(length: int) -> None:
    data = file_bytes(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"\0", length)
    reader = probe(data, "fuzz.safetensors")
    with pytest.raises(WeightsmithError, match="header length"):
        parse_safetensors(reader, 0, "f.safetensors")
    assert reader.ranges == [(0, 8)]


def test_fixtures_themselves_parse() -> None:
    """The mutation seeds are real files the parser reads (the bad one excepted)."""
    assert len(SMALL_FIXTURES) >= 10
    for path in SMALL_FIXTURES:
        result = parse_checked(path.read_bytes())
        assert (result is None) == (path.parent.name == "bad"), path
