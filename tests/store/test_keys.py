"""Tensor names -> store keys: reversible, unique, and always one safe path component."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from weightsmith.model import ModelRef, slugify
from weightsmith.store import Store, decode_key, encode_key
from weightsmith.store.keys import MAX_KEY

# Any text, lone surrogates included: safetensors headers are JSON, and JSON escapes such as
# "\ud800" decode to lone surrogates that `encode_key` promises to keep exactly.
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
NAMES = st.lists(st.one_of(st.characters(), SURROGATES, st.sampled_from("./%~_-"))).map("".join)
ESCAPE = re.compile(r"%[0-9A-F]{2}")


def assert_safe(key: str) -> None:
    assert key, "a key is never empty"
    assert "/" not in key
    assert "\\" not in key
    assert "\x00" not in key
    assert ".." not in key
    assert not key.startswith(".")
    assert key.isascii()
    assert len(key) <= MAX_KEY


@given(NAMES)
@example("")
@example(".")
@example("..")
@example("...")
@example(".hidden")
@example("a/../b")
@example("%")
@example("%25")
@example("~")
@example("\ud800")
@example("\udfff\ud800")
@example("\ud83d\ude00")  # a surrogate *pair* as two code points, not the emoji itself
def test_encode_decode_round_trip(name: str) -> None:
    key = encode_key(name)
    assert_safe(key)
    if "~" in key:  # shortened: only the manifest maps it back
        with pytest.raises(ValueError):
            decode_key(key)
    else:
        assert decode_key(key) == name


@given(st.text(st.characters(codec="ascii"), min_size=1, max_size=40))
def test_plain_names_stay_readable(name: str) -> None:
    key = encode_key(name)
    # Only '%XX' escapes and the safe characters appear; the rest of the name is kept as is.
    assert re.fullmatch(r"(%[0-9A-F]{2}|[A-Za-z0-9_.-])+", key)
    assert ESCAPE.sub("", key) == "".join(
        c for i, c in enumerate(name) if c.isalnum() or c in "_-" or (c == "." and i > 0 and name[i - 1] != ".")
    )


def test_readable_examples() -> None:
    assert encode_key("model.layers.0.mlp.gate_proj.weight") == "model.layers.0.mlp.gate_proj.weight"
    assert encode_key("a/b") == "a%2Fb"
    assert encode_key(".x") == "%2Ex"
    assert encode_key("a..b") == "a.%2Eb"
    assert encode_key("..") == "%2E%2E"
    assert encode_key("é") == "%C3%A9"
    assert encode_key("") == "%"
    assert decode_key("%") == ""


@settings(max_examples=300)
@given(NAMES, NAMES)
def test_distinct_names_get_distinct_keys(a: str, b: str) -> None:
    if a != b:
        assert encode_key(a) != encode_key(b)


def test_surrogate_pair_and_emoji_differ() -> None:
    # "\ud83d\ude00" (lone surrogates from JSON escapes) and U+1F600 are different names.
    pair, emoji = "\ud83d\ude00", "\U0001f600"
    assert encode_key(pair) != encode_key(emoji)
    assert decode_key(encode_key(pair)) == pair
    assert decode_key(encode_key(emoji)) == emoji


@given(st.text(min_size=1, max_size=5), st.text(min_size=1, max_size=5))
def test_long_names_are_shortened_but_unique(tail_a: str, tail_b: str) -> None:
    prefix = "model.layers.0." + "very_long_module_name." * 20
    a, b = prefix + tail_a, prefix + tail_b
    key_a, key_b = encode_key(a), encode_key(b)
    assert_safe(key_a)
    assert_safe(key_b)
    assert "~" in key_a and re.search(r"~[0-9a-f]{16}$", key_a)
    assert key_a.startswith("model.layers.0.very_long_module_name.")
    if a != b:
        assert key_a != key_b
    with pytest.raises(ValueError, match="shortened"):
        decode_key(key_a)


@given(st.integers(0, 400), st.sampled_from(["é", "/", "x", ".", "\ud800"]))
def test_shortening_never_splits_an_escape(n: int, ch: str) -> None:
    """Whatever escape lands on the cut, the kept prefix holds only whole '%XX' escapes."""
    key = encode_key("a" * n + ch * 200)
    assert_safe(key)
    if "~" in key:
        kept = key.rsplit("~", 1)[0]
        assert "%" not in ESCAPE.sub("", kept)
        assert len(key) >= MAX_KEY - 2


def test_short_names_are_never_shortened() -> None:
    name = "x" * MAX_KEY
    assert encode_key(name) == name
    assert "~" in encode_key("x" * (MAX_KEY + 1))
    # Escapes count by their encoded length: 54 '/' encode to 162 characters.
    assert "~" in encode_key("/" * 54)
    assert encode_key("/" * 53) == "%2F" * 53


def test_model_keys_are_one_path_component_below_their_folder(tmp_path) -> None:
    model = ModelRef(Store(str(tmp_path)), "slug", "rev")
    for name in ["../../escape", "/abs", "a/b/c", ".", "", "x" * 500]:
        key = model.tensor_key(name)
        folder, _, leaf = key.rpartition("/")
        assert folder == "models/slug/rev/tensors"
        assert leaf.endswith(".zarr") and leaf[: -len(".zarr")] == encode_key(name)
        # Store.path refuses '..' components and absolute keys; these keys pass.
        assert model.store.path(key).startswith(str(tmp_path) + "/models/slug/rev/tensors/")


def test_slugify_hf_ids() -> None:
    assert slugify("org/name") == "org--name"
    assert slugify(" /org/name/ ") == "org--name"
    assert slugify("my model") == "my%20model"
    assert "/" not in slugify("a/b/c")
