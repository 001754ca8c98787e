"""The `manifest` leaderboard source: a JSON or YAML list of `{id, source, revision}`.

The file may be local, on S3 or behind http(s). A relative `source` is relative to the
manifest's folder, so a manifest can sit beside the models it lists. Example:

    - {id: acme/tiny, source: tiny/model.safetensors, revision: v1, licence: mit}
    - {id: acme/big, source: "s3://models/big/model.safetensors.index.json", revision: 2024-06}
    - {id: acme/tuned, source: tuned/model.safetensors, revision: v1, base_model: acme/tiny}

An entry's family (the model it was fine-tuned from) is its `base_model`, else the `base_model`
of a `README.md` model card (YAML front matter) beside its weights, else none.
"""

from __future__ import annotations

import os
import posixpath
import re

import yaml

from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard.registry import ModelEntry, SourceQuery
from weightsmith.ranged import fs_for, join_url, split_url

REQUIRED = ("id", "source", "revision")
OPTIONAL = ("licence", "license", "base_model")
CARD = "README.md"
CARD_BYTES = 1_000_000
MAX_BYTES = 16_000_000


def entries(location: str, query: SourceQuery) -> list[ModelEntry]:
    """The manifest's models, in file order, at most `query.limit` of them.

    `query.filter` and `query.sort` are hub queries and do not apply to a manifest.
    """
    items = _load(location)
    models = [_entry(location, i, item) for i, item in enumerate(items)]
    keys = [m.key for m in models]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise WeightsmithError(location, f"{duplicates[0]} is listed twice")
    return models[: query.limit] if query.limit else models


def _load(location: str) -> list:
    fs, path = fs_for(location)
    try:
        size = fs.size(path)
        if size is not None and size > MAX_BYTES:
            raise WeightsmithError(location, f"manifest is {size} bytes (limit {MAX_BYTES})")
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise WeightsmithError(location, "no such manifest") from None
    except (IsADirectoryError, PermissionError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsmithError(location, f"cannot read the manifest ({reason})") from None
    try:
        value = yaml.safe_load(raw)  # YAML is a superset of JSON: one parser for both
    except yaml.YAMLError as e:
        raise WeightsmithError(location, f"not JSON or YAML ({str(e).splitlines()[0]})") from None
    if isinstance(value, dict) and set(value) == {"models"}:
        value = value["models"]
    if not isinstance(value, list):
        raise WeightsmithError(location, "a manifest is a list of {id, source, revision} (or {models: [...]})")
    return value


def _entry(location: str, index: int, item) -> ModelEntry:
    where = f"{location}: entry {index + 1}"
    if not isinstance(item, dict):
        raise WeightsmithError(where, "is not a mapping of id, source and revision")
    unknown = sorted(set(item) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise WeightsmithError(where, f"unknown field {unknown[0]!r} (fields: {', '.join(REQUIRED + OPTIONAL)})")
    for name in REQUIRED:
        value = item.get(name)
        # YAML reads 2024-06-01 or 1.0 as a date or a number: str() of it is used (quote to keep).
        if value is None or (isinstance(value, str) and not value.strip()):
            raise WeightsmithError(where, f"no {name!r} (every entry needs id, source and revision)")
    licence = item.get("licence", item.get("license"))
    source = _resolve(location, str(item["source"]).strip())
    family = item.get("base_model")
    return ModelEntry(
        id=str(item["id"]).strip(),
        revision=str(item["revision"]).strip(),
        source=source,
        origin=location,
        licence=None if licence is None else str(licence),
        family=str(family).strip() if family else card_base_model(source),
    )


def card_base_model(source: str) -> str | None:
    """The `base_model` of the README.md model card in the weights' folder, or None.

    A missing or unreadable card, or one without YAML front matter, names no family.
    """
    from weightsmith.leaderboard.hf_hub import base_model_of

    weights = source.rstrip("/")
    is_file = weights.rsplit("/", 1)[-1].endswith((".safetensors", ".json", ".gguf"))
    folder = weights.rsplit("/", 1)[0] if is_file else weights  # a file's folder, or the sharded folder
    try:
        fs, path = fs_for(join_url(folder, CARD))
        text = fs.cat_file(path, start=0, end=CARD_BYTES).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    try:
        card = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return base_model_of(card) if isinstance(card, dict) else None


def _resolve(location: str, source: str) -> str:
    """A relative source path is relative to the manifest's folder."""
    if "://" in source or os.path.isabs(source) or source.startswith("~"):
        return source
    protocol, path = split_url(location)
    if protocol == "file":
        return os.path.join(os.path.dirname(path), source)
    return posixpath.join(location.rsplit("/", 1)[0], source)
