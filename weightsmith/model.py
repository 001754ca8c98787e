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

    # Artifacts live under the model's prefix, or under generations/<id>/ when a forced run
    # rebuilds a published model next to it (the manifest then switches to them in one write).
    def _artifact(self, folder: str, name: str, suffix: str, generation: str | None) -> str:
        where = ("generations", generation, folder) if generation else (folder,)
        return self.key(*where, f"{encode_key(name)}{suffix}")

    def tensor_key(self, name: str, generation: str | None = None) -> str:
        return self._artifact("tensors", name, ".zarr", generation)

    def tiff_key(self, name: str, generation: str | None = None) -> str:
        return self._artifact("images", name, ".tiff", generation)

    def png_key(self, name: str, generation: str | None = None) -> str:
        return self._artifact("previews", name, ".png", generation)

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
        problem = _manifest_problem(manifest, self.prefix + "/")
        if problem:
            raise WeightsmithError(self.url, f"manifest.json: {problem} (edited by hand? re-extract with --force)")
        return manifest


def _manifest_problem(m: dict, prefix: str) -> str | None:
    """What is wrong with a manifest's structure, or None. Every key must lie in the model."""

    def inside(key) -> bool:
        parts = key.split("/") if isinstance(key, str) else []
        return bool(parts) and key.startswith(prefix) and not any(p in ("", ".", "..") for p in parts)

    if not isinstance(m.get("files"), dict) or not isinstance(m.get("tensors"), dict):
        return "files and tensors must be objects"
    for name, f in m["files"].items():
        if not isinstance(f, dict) or not inside(f.get("key")) or not isinstance(f.get("sha256"), str):
            return f"file {name!r} needs a key inside the model and a sha256"
    for name, r in m["tensors"].items():
        shape = r.get("shape") if isinstance(r, dict) else None
        if not (
            isinstance(r, dict)
            and r.get("name") == name
            and isinstance(r.get("dtype"), str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(r.get("sha256"), str)
            and isinstance(r.get("artifacts"), dict)
        ):
            return f"tensor {name!r} needs name, dtype, shape, sha256 and artifacts"
        arts = r["artifacts"]
        if not inside(arts.get("zarr")) or any(k in arts and not inside(arts[k]) for k in ("tiff", "png")):
            return f"tensor {name!r}: artifact keys must lie inside the model"
    source = m.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("containers"), list):
        return "source.containers must be a list"
    for c in source["containers"]:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("segments"), list):
            return "every container needs a name and segments"
        for seg in c["segments"]:
            ok = isinstance(seg, list) and len(seg) in (3, 4) and all(isinstance(x, int) for x in seg[:2])
            if not ok or not (
                (len(seg) == 3 and isinstance(seg[2], str)) or (len(seg) == 4 and seg[2] is None and inside(seg[3]))
            ):
                return f"container {c['name']!r} has a malformed segment"
    if not isinstance(m.get("selection", {}), dict):
        return "selection must be an object"
    return None


def slugify(name: str) -> str:
    """A store-safe slug: '/' of a Hugging Face id becomes '--', the rest is key-encoded."""
    return encode_key(name.strip().strip("/").replace("/", "--"))


def parse_model_url(url: str) -> ModelRef:
    """`<store>/models/<slug>/<revision>` -> ModelRef."""
    m = _MODEL_URL.match(str(url).rstrip("/"))
    if not m or not m.group("store"):
        raise WeightsmithError(str(url), "not a model URL (expected <store>/models/<slug>/<revision>)")
    return ModelRef(Store(m.group("store")), m.group("slug"), m.group("revision"))
