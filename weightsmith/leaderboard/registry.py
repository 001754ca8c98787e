"""Leaderboard sources by name (one module each, one line here) and what they return.

A source turns a location and a query into `ModelEntry` items: a model id, the revision to
process, and the URL of its weights. `hf-hub` lists the Hugging Face Hub; any other location
(a path, s3:// or http(s):// URL) is a manifest file.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

SOURCES: dict[str, str] = {
    "hf-hub": "weightsmith.leaderboard.hf_hub:entries",
    "manifest": "weightsmith.leaderboard.manifest:entries",
}


class SourceQuery(BaseModel):
    """Which models a source lists; validated once at the edge (CLI flags, flow parameters)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    filter: str | None = None  # hf-hub: tag or library to filter on, e.g. "gptq"
    sort: str = "downloads"  # hf-hub: downloads, trending, last_modified, likes or created_at
    limit: int | None = Field(20, ge=1)  # at most this many models per batch (None: all)
    endpoint: str | None = None  # hf-hub: hub URL; default $HF_ENDPOINT, else huggingface.co


@dataclass(frozen=True)
class ModelEntry:
    """One model revision a source offers, resolved to the weights to extract."""

    id: str  # "org/name" on the hub; any name in a manifest (the model's slug comes from it)
    revision: str  # hub commit, or the manifest's revision
    source: str  # URL or path of the weights: a file, a sharded index or a folder
    origin: str  # "hf-hub" or the manifest's location
    licence: str | None = None
    gated: str | None = None  # "auto" / "manual" for gated hub repositories, else None
    problem: str | None = None  # why the entry cannot be processed (catalogued as skipped)
    family: str | None = None  # the base model it was fine-tuned from (model card `base_model`), else None

    @property
    def key(self) -> str:
        """The catalogue key: `<id>@<revision>`."""
        return f"{self.id}@{self.revision}"


Lister = Callable[[str, SourceQuery], list[ModelEntry]]


def kind_of(source: str) -> str:
    """The source kind: `hf-hub` for the hub, `manifest` for a path or URL of a manifest."""
    return "hf-hub" if source == "hf-hub" else "manifest"


def get(kind: str) -> Lister:
    """The `entries(location, query)` function of source `kind`."""
    module, name = SOURCES[kind].split(":")
    return getattr(importlib.import_module(module), name)
