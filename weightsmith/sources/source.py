"""Open a model source: locate its containers and sidecar files, parse every header once."""

from __future__ import annotations

import json
import posixpath
import re
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from weightsmith.errors import WeightsmithError
from weightsmith.ranged import RangedReader, fs_for, join_url, open_reader, split_url
from weightsmith.sources.base import Container, GptqGroup, TensorEntry
from weightsmith.sources.registry import parser_for

INDEX_NAME = "model.safetensors.index.json"
# Files beside the weights that a model needs to load, copied verbatim into files/.
SIDECARS = (
    "config.json",
    "generation_config.json",
    "quantize_config.json",
    "quant_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
MAX_SIDECAR_BYTES = 64_000_000
POOL_BUFFERS, POOL_MIN_BYTES = 6, 1 << 20  # read buffers kept for reuse; smaller reads are not pooled
# Pooled reads get a buffer of at least this size (a block: 64 MB by default), so that any later
# read up to a block fits in it. Only the pages a read touches are memory; new pages cost a
# fault and zeroing each, more than the read, so a few big buffers beat many exact ones.
POOL_BUFFER_BYTES = 64 << 20
MAX_INDEX_BYTES = 64_000_000
# A Hugging Face cache snapshot path: .../models--<org>--<name>/snapshots/<commit>/<file>
_HF_CACHE = re.compile(r"models--(?P<id>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(/|$)")


@dataclass
class Source:
    """A parsed model source: containers, raw tensors by name, GPTQ groups, sidecar files."""

    url: str
    kind: str  # "safetensors" | "sharded" | "gguf"
    root: str  # the folder (URL) holding the containers and sidecars
    containers: list[Container]
    readers: list[RangedReader]
    tensors: dict[str, TensorEntry]  # every raw tensor, in container and offset order
    groups: list[GptqGroup] = field(default_factory=list)
    sidecars: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes
    hf_id: str | None = None
    hf_revision: str | None = None
    _pool: list[np.ndarray] = field(default_factory=list, repr=False)  # read buffers to reuse
    _pool_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _opaque: dict[tuple[int, int, int], bytes] = field(default_factory=dict, repr=False)  # see `opaque`

    def read(self, container: int, start: int, end: int) -> bytes:
        return self.readers[container].read(start, end)

    def opaque(self, container: int, start: int, end: int) -> bytes:
        """The bytes of a non-tensor segment (a header), fetched once: the content revision and
        files/ both need them, and a remote source should cross the network once per byte."""
        key = (container, start, end)
        if key not in self._opaque:
            self._opaque[key] = self.read(container, start, end)
        return self._opaque[key]

    def read_array(self, container: int, start: int, end: int) -> np.ndarray:
        """Tensor bytes as a uint8 array, in memory given back by `recycle` where some fits.

        New memory costs page faults and zeroing that take longer than the read itself here.
        """
        buffer = None
        if end - start >= POOL_MIN_BYTES:
            with self._pool_lock:
                fits = [i for i, b in enumerate(self._pool) if b.size >= end - start]
                if fits:
                    buffer = self._pool.pop(min(fits, key=lambda i: self._pool[i].size))[: end - start]
            if buffer is None:
                buffer = np.empty(max(end - start, POOL_BUFFER_BYTES), np.uint8)[: end - start]
        return self.readers[container].read_array(start, end, buffer)

    def recycle(self, block: np.ndarray) -> None:
        """Give back an array `read_array` returned, and every view of it: no one may use them now."""
        owner = block if block.base is None else block.base
        if not isinstance(owner, np.ndarray) or owner.size < POOL_MIN_BYTES:
            return  # not ours (a remote read's bytes) or too small to be worth keeping
        with self._pool_lock:
            self._pool.append(owner)
            self._pool.sort(key=lambda b: b.size)
            del self._pool[:-POOL_BUFFERS]  # keep the largest

    def fingerprints(self) -> list[tuple | None]:
        """Per container, what changes when its bytes do (None: cannot tell, a remote file)."""
        return [r.fingerprint() for r in self.readers]

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    @property
    def quant_config(self) -> dict | None:
        return _quant_config(self.sidecars)


def open_source(url: str, *, with_sidecars: bool = True) -> Source:
    """Open `url` and parse every container header (only header bytes are fetched).

    Raises:
        WeightsmithError: the source is missing, unreadable, or a header is malformed.
    """
    url = str(url)
    protocol, path = split_url(url)
    if protocol == "file":
        url = path  # absolute: the same file gives the same slug and manifest from any cwd
    fs, _ = fs_for(url)
    lower = urlsplit(path).path.lower() if protocol in ("http", "https") else path.lower()
    if lower.endswith(".json"):
        return _open_sharded(url, fs, with_sidecars)
    if lower.endswith((".safetensors", ".gguf")) or _is_file(fs, path, url):
        return _open_single(url, with_sidecars)
    # A folder: a sharded index, else one model.safetensors / *.safetensors / *.gguf in it.
    index = join_url(url, INDEX_NAME)
    if fs.exists(split_url(index)[1]):
        return _open_sharded(index, fs, with_sidecars)
    candidates = _weights_in(fs, path, protocol)
    if len(candidates) == 1:
        return _open_single(join_url(url, candidates[0]), with_sidecars)
    if not candidates:
        raise WeightsmithError(url, f"no {INDEX_NAME}, .safetensors or .gguf file found")
    raise WeightsmithError(url, f"several weight files and no {INDEX_NAME}: {', '.join(candidates[:4])}")


def _is_file(fs, path: str, url: str) -> bool:
    try:
        # info() is a HEAD on http(s): it never downloads the body to answer the question
        return fs.info(path).get("type") == "file"
    except (OSError, ValueError):
        return False


def _weights_in(fs, path: str, protocol: str) -> list[str]:
    if protocol in ("http", "https"):
        return ["model.safetensors"] if fs.exists(path.rstrip("/") + "/model.safetensors") else []
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        raise WeightsmithError(path, "no such file or folder") from None
    except PermissionError:
        raise WeightsmithError(path, "access denied") from None
    if "model.safetensors" in names:
        return ["model.safetensors"]
    return sorted(n for n in names if n.endswith((".safetensors", ".gguf")))


def _format_of(reader: RangedReader) -> str:
    path = urlsplit(reader.url).path.lower() if "://" in reader.url else reader.url.lower()
    if path.endswith(".gguf"):
        return "gguf"
    if path.endswith(".safetensors"):
        return "safetensors"
    return "gguf" if reader.size >= 4 and reader.read(0, 4) == b"GGUF" else "safetensors"


def _open_single(url: str, with_sidecars: bool) -> Source:
    reader = open_reader(url)
    fmt = _format_of(reader)
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        # The name and the folder come from the path: a query (a presigned URL's token) is
        # neither a file name nor something to store in a manifest.
        name = posixpath.basename(parts.path)
        root = urlunsplit((parts.scheme, parts.netloc, posixpath.dirname(parts.path), "", ""))
    else:
        name = posixpath.basename(split_url(url)[1])
        root = url[: -len(name)].rstrip("/") or "/"
    container, entries = parser_for(fmt)(reader, 0, name)
    return _finish(
        Source(
            url=url, kind=fmt, root=root, containers=[container], readers=[reader], tensors={e.name: e for e in entries}
        ),
        with_sidecars,
    )


def _open_sharded(index_url: str, fs, with_sidecars: bool) -> Source:
    index_reader = open_reader(index_url)
    if index_reader.size > MAX_INDEX_BYTES:
        raise WeightsmithError(index_url, f"index is {index_reader.size} bytes (limit {MAX_INDEX_BYTES})")
    raw = index_reader.read(0, index_reader.size)
    weight_map = _parse_index(raw, index_url)
    root = index_url[: index_url.rstrip("/").rfind("/")] if "/" in index_url else "."
    shards = sorted(set(weight_map.values()))
    containers, readers, tensors = [], [], {}
    for i, shard in enumerate(shards):
        reader = open_reader(join_url(root, shard))
        container, entries = parser_for("safetensors")(reader, i, shard)
        containers.append(container)
        readers.append(reader)
        for e in entries:
            if e.name in tensors:
                raise WeightsmithError(reader.url, f"tensor {e.name!r} is also in another shard")
            if weight_map.get(e.name) != shard:
                raise WeightsmithError(
                    index_url, f"tensor {e.name!r} is in {shard} but the index says {weight_map.get(e.name)!r}"
                )
            tensors[e.name] = e
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise WeightsmithError(index_url, f"tensor {missing[0]!r} is listed but not in its shard")
    source = Source(url=index_url, kind="sharded", root=root, containers=containers, readers=readers, tensors=tensors)
    source.sidecars[INDEX_NAME] = raw
    return _finish(source, with_sidecars)


def _parse_index(raw: bytes, where: str) -> dict[str, str]:
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsmithError(where, f"index is not valid UTF-8 JSON ({type(e).__name__})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsmithError(where, "index has no weight_map object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_file_name(shard):
            raise WeightsmithError(where, f"weight_map entry for {name!r} is not a plain file name: {shard!r}")
    return weight_map


def _plain_file_name(name: str) -> bool:
    """A shard name must stay inside the checkpoint's folder: no separators, no '..'."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and name not in (".", "..")
        and name.endswith(".safetensors")
    )


def _finish(source: Source, with_sidecars: bool) -> Source:
    m = _HF_CACHE.search(split_url(source.url)[1])
    if m:
        source.hf_id = m.group("id").replace("--", "/", 1)
        source.hf_revision = m.group("commit")
    if with_sidecars:
        fs, _ = fs_for(source.root)
        for name in SIDECARS:
            path = split_url(join_url(source.root, name))[1]
            try:
                if not fs.exists(path):
                    continue
                size = fs.size(path)
                if size is not None and size > MAX_SIDECAR_BYTES:
                    raise WeightsmithError(join_url(source.root, name), f"sidecar of {size} bytes is too large")
                source.sidecars[name] = fs.cat_file(path)
            except (FileNotFoundError, IsADirectoryError):
                continue
    if source.kind != "gguf":
        from weightsmith.sources.gptq import find_groups

        meta = source.containers[0].metadata if source.containers else {}
        source.groups = find_groups(source.tensors, source.quant_config, meta, source.url)
    return source


def _quant_config(sidecars: dict[str, bytes]) -> dict | None:
    """GPTQ settings from quantize_config.json, else config.json's quantization_config."""
    for name in ("quantize_config.json", "quant_config.json"):
        if name in sidecars:
            cfg = _json_or_none(sidecars[name])
            if isinstance(cfg, dict):
                return cfg
    cfg = _json_or_none(sidecars.get("config.json", b""))
    if isinstance(cfg, dict) and isinstance(cfg.get("quantization_config"), dict):
        return cfg["quantization_config"]
    return None


def _json_or_none(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
