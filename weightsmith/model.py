"""Where a model lives in a store, and its manifest.

`<store>/models/<slug>/<revision>/` holds `manifest.json` (written last: its presence means
the model is complete), `runs/`, `files/`, `tensors/`, `images/` and `previews/`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightsmith.errors import WeightsmithError
from weightsmith.store import Store, encode_key

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "weightsmith-manifest/1"
_MODEL_URL = re.compile(r"^(?P<store>.*?)/models/(?P<slug>[^/]+)/(?P<revision>[^/]+)/?$")


@dataclass(frozen=True)
class ModelRef:
    """A model revision in a store."""

    store: Store
    slug: str
    revision: str

    @property
    def prefix(self) -> str:
        return f"models/{self.slug}/{self.revision}"

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    @property
    def url(self) -> str:
        return self.store.url_of(self.prefix)

    def tensor_key(self, name: str) -> str:
        return self.key("tensors", f"{encode_key(name)}.zarr")

    def tiff_key(self, name: str) -> str:
        return self.key("images", f"{encode_key(name)}.tiff")

    def png_key(self, name: str) -> str:
        return self.key("previews", f"{encode_key(name)}.png")

    def is_complete(self) -> bool:
        return self.store.exists(self.key(MANIFEST))

    def manifest(self) -> dict:
        """The manifest; an incomplete model (no manifest) is a one-line error."""
        try:
            manifest = self.store.read_json(self.key(MANIFEST))
        except FileNotFoundError:
            raise WeightsmithError(self.url, "no manifest.json: the model is missing or incomplete") from None
        except ValueError as e:
            raise WeightsmithError(self.url, f"manifest.json is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise WeightsmithError(self.url, f"manifest.json is not a {MANIFEST_FORMAT} manifest")
        return manifest


def slugify(name: str) -> str:
    """A store-safe slug: '/' of a Hugging Face id becomes '--', the rest is key-encoded."""
    return encode_key(name.strip().strip("/").replace("/", "--"))


def parse_model_url(url: str) -> ModelRef:
    """`<store>/models/<slug>/<revision>` -> ModelRef."""
    m = _MODEL_URL.match(str(url).rstrip("/"))
    if not m or not m.group("store"):
        raise WeightsmithError(str(url), "not a model URL (expected <store>/models/<slug>/<revision>)")
    return ModelRef(Store(m.group("store")), m.group("slug"), m.group("revision"))
