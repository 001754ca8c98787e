"""Hostile names and inputs: nothing is written outside the model's prefix, nothing is executed.

- tensor names with `..`, `/`, NUL, 10k characters, lone surrogates or differing only by case
  are extracted inside `<store>/models/<slug>/<revision>/` and restored byte for byte; names
  that are not UTF-8 are refused before anything is written;
- a sharded index whose weight_map leaves the checkpoint's folder is refused;
- manifests edited by hand make verify/restore fail with a one-line error, never a traceback,
  never a read outside the model's prefix, never wrong bytes;
- `config.json` with `auto_map` / `trust_remote_code`, a `modeling_*.py` and a pickled
  `pytorch_model.bin` beside the weights: copied as bytes, never imported, never unpickled;
- catalogues edited by hand are one-line errors and are never overwritten.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import fixture_paths
import gguf
import numpy as np
import pytest

from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, ExtractResult, extract
from weightsmith.inspect import inspect_source
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.restore import restore
from weightsmith.store import Store
from weightsmith.upkeep import gc, list_models
from weightsmith.verify import verify

REPO = Path(__file__).resolve().parents[1]
FIXTURES = fixture_paths.FIXTURES
SAMPLE = FIXTURES / "safetensors" / "hf_samples_overall.safetensors"
HOSTILE_NAMES = [
    "..",
    ".",
    "",
    "...",
    "../../etc/x",
    "/abs",
    "a/b",
    "a%2Fb",
    "nul\x00name",
    "x" * 10_000,
    "\ud800",
    "lone\udfffsurrogate",
    "Weight",
    "weight",
    "WEIGHT",
    "~",
    "back\\slash",
    ".hidden",
    "é",
    "\u202etxt.exe",
]


@pytest.fixture(autouse=True)
def _state_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state folder inside tmp_path, so the walk of tmp_path sees everything written."""
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(tmp_path / "home"))


# ---------------------------------------------------------------------------------------------
# helpers


def safetensors_file(path: Path, tensors: list[tuple[str, np.ndarray]]) -> bytes:
    """A safetensors file written by hand (JSON escapes keep lone surrogates); returns its bytes."""
    header, data = {}, b""
    for name, array in tensors:
        raw = array.tobytes()
        header[name] = {
            "dtype": {"<f4": "F32", "|u1": "U8"}[array.dtype.str],
            "shape": list(array.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()  # ensure_ascii: "\ud800" stays a JSON escape
    text += b" " * (-len(text) % 8)
    blob = struct.pack("<Q", len(text)) + text + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return blob


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file (and link) below root -> (size, mtime_ns)."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


def written(before: dict, root: Path) -> list[str]:
    """Files below root that are new or changed since `before`."""
    return sorted(p for p, v in snapshot(root).items() if before.get(p) != v)


def inside(path: str, folder: str | Path) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(folder)]) == os.path.realpath(folder)


def model_of(result: ExtractResult) -> ModelRef:
    return parse_model_url(result.model_url)


# ---------------------------------------------------------------------------------------------
# as lenient as the reference reader, and no more

F32_ENTRY = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
LENIENT = {  # headers the reference (safetensors 0.8.0) opens: accepted and restored byte for byte
    "whitespace-before": "  \n{" + F32_ENTRY + "}",
    "whitespace-after": "{" + F32_ENTRY + "}\t\r\n   ",
    "extra-key": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"quant":{"bits":4}}}',
    "repeated-name": "{" + F32_ENTRY + "," + F32_ENTRY + "}",
    "no-tensors": "{}",
    "no-tensors-metadata": '{"__metadata__":{"format":"pt"}}',
}
STRICT = {  # headers the reference refuses: refused with one line and exit 2, nothing written
    "nul-padding": "{" + F32_ENTRY + "}\x00\x00",
    "repeated-field": '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
    "nan-in-extra-key": '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}',
    "missing-field": '{"a":{"dtype":"F32","shape":[2]}}',
    "float-shape": '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}',
    "metadata-not-strings": '{"__metadata__":{"a":1},' + F32_ENTRY + "}",
}


def header_file(path: Path, header: str) -> bytes:
    text = header.encode()
    data = b"" if '"a"' not in header else np.arange(2, dtype=np.float32).tobytes()
    blob = struct.pack("<Q", len(text)) + text + data
    path.write_bytes(blob)
    return blob


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weightsmith.cli", *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case", sorted(LENIENT))
def test_what_the_reference_opens_is_extracted_and_restored_byte_for_byte(tmp_path: Path, case: str) -> None:
    from safetensors.numpy import load_file

    path = tmp_path / f"{case}.safetensors"
    blob = header_file(path, LENIENT[case])
    expected = load_file(str(path))  # the reference opens it
    assert [r["name"] for r in inspect_source(str(path))] == sorted(expected)
    store = tmp_path / "store"
    run = cli("extract", path, "--store", store, "--no-prefect")
    assert run.returncode == 0, run.stderr
    model_url = run.stdout.strip().splitlines()[-1]
    assert cli("verify", model_url).returncode == 0
    assert cli("restore", model_url, "--out", tmp_path / "copy.safetensors").returncode == 0
    assert (tmp_path / "copy.safetensors").read_bytes() == blob
    manifest = parse_model_url(model_url).manifest()
    assert sorted(manifest["tensors"]) == sorted(expected)


@pytest.mark.parametrize("case", sorted(STRICT))
def test_what_the_reference_refuses_is_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = tmp_path / f"{case}.safetensors"
    header_file(path, STRICT[case])
    with pytest.raises(SafetensorError):
        load_file(str(path))
    store = tmp_path / "store"
    for command in (("inspect", path), ("extract", path, "--store", store, "--no-prefect")):
        run = cli(*command)
        assert run.returncode == 2, run.stderr
        assert run.stderr.count("\n") == 1 and run.stderr.startswith(f"error: {path}"), run.stderr
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*"))


# ---------------------------------------------------------------------------------------------
# hostile tensor names


def test_hostile_tensor_names_stay_inside_the_model_and_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = [(n, rng.standard_normal((3, 5)).astype("<f4")) for n in HOSTILE_NAMES]
    source = tmp_path / "src" / "model.safetensors"
    original = safetensors_file(source, tensors)
    before = snapshot(tmp_path)

    result = extract(str(source), ExtractOptions(store=str(tmp_path / "store"), name="../../evil/../x"))
    model = model_of(result)
    prefix = model.store.path(model.prefix)
    assert inside(prefix, tmp_path / "store" / "models") and ".." not in model.slug.split("/")
    outside = [p for p in written(before, tmp_path) if not inside(p, prefix)]
    assert outside == []
    assert {r["name"] for r in model.manifest()["tensors"].values()} == set(HOSTILE_NAMES)

    report = verify(result.model_url)
    assert report.ok, report.problems
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "model.safetensors"
    assert restore(result.model_url, str(out)) == [str(out)]
    assert out.read_bytes() == original
    assert written(before, tmp_path) == [str(out)]


def test_hostile_gguf_tensor_names_stay_inside_the_model(tmp_path: Path) -> None:
    source = tmp_path / "src" / "model.gguf"
    source.parent.mkdir()
    w = gguf.GGUFWriter(source, "hostile")
    for i, name in enumerate(["../../etc/x", "/abs", "a/b", "..", "x" * 300]):
        w.add_tensor(name, np.full((2, 3), i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = snapshot(tmp_path)
    result = extract(str(source), ExtractOptions(store=str(tmp_path / "store"), images="preview"))
    prefix = model_of(result).store.path(model_of(result).prefix)
    assert [p for p in written(before, tmp_path) if not inside(p, prefix)] == []
    assert verify(result.model_url).ok
    restore(result.model_url, str(tmp_path / "out.gguf"))
    assert (tmp_path / "out.gguf").read_bytes() == source.read_bytes()


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_names_that_are_not_utf8_are_refused_before_any_write(tmp_path: Path, fmt: str) -> None:
    bad = b"w\xff\xfe"
    if fmt == "safetensors":
        text = b'{"' + bad + b'":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
        blob = struct.pack("<Q", len(text)) + text + b"\0"
    else:
        blob = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(bad)) + bad
        blob += struct.pack("<IQIQ", 1, 4, 0, 0)
        blob += b"\0" * (-len(blob) % 32) + b"\0" * 16
    source = tmp_path / f"model.{fmt}"
    source.write_bytes(blob)
    before = snapshot(tmp_path)
    with pytest.raises(WeightsmithError, match="UTF-8"):
        extract(str(source), ExtractOptions(store=str(tmp_path / "store")))
    assert written(before, tmp_path) == []


@pytest.mark.parametrize(
    "fmt, dtype, shape, nbytes",
    [
        ("safetensors", "F32", [0, 2**63], 0),
        ("safetensors", "F32", [0, 2**62], 0),
        ("safetensors", "U8", [1] * 33, 1),
        ("gguf", "F32", [2**62, 0], 0),
    ],
    ids=["dim-2**63", "dim-2**62-f32", "33-dims", "gguf-dim-2**62-f32"],
)
def test_shapes_the_store_cannot_hold_are_one_line_errors(
    tmp_path: Path, fmt: str, dtype: str, shape: list[int], nbytes: int
) -> None:
    if fmt == "safetensors":
        text = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
        blob = struct.pack("<Q", len(text)) + text + b"\0" * nbytes
    else:  # one F32 tensor info, dims ne0 first
        blob = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", len(shape))
        blob += b"".join(struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", 0, 0)
        blob += b"\0" * (-len(blob) % 32)
    source = tmp_path / f"model.{fmt}"
    source.write_bytes(blob)
    with pytest.raises(WeightsmithError):
        extract(str(source), ExtractOptions(store=str(tmp_path / "store")))


# ---------------------------------------------------------------------------------------------
# sharded index leaving its folder


@pytest.mark.parametrize("target", ["../secret.safetensors", "ABSOLUTE", "sub/../../secret.safetensors"])
@pytest.mark.parametrize("open_as", ["index", "folder"])
def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path, target: str, open_as: str) -> None:
    secret = tmp_path / "secret.safetensors"
    safetensors_file(secret, [("w", np.zeros(2, "<f4"))])
    folder = tmp_path / "model"
    safetensors_file(folder / "model-00001-of-00001.safetensors", [("v", np.ones(2, "<f4"))])
    shard = str(secret) if target == "ABSOLUTE" else target
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"v": "model-00001-of-00001.safetensors", "w": shard}})
    )
    before = snapshot(tmp_path)
    url = str(folder / "model.safetensors.index.json") if open_as == "index" else str(folder)
    with pytest.raises(WeightsmithError, match="not a plain file name"):
        extract(url, ExtractOptions(store=str(tmp_path / "store")))
    assert written(before, tmp_path) == []


# ---------------------------------------------------------------------------------------------
# manifests edited by hand


def _first(d: dict) -> str:
    return next(iter(d))


def _set_artifact(kind: str, value: object) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        m["tensors"][_first(m["tensors"])]["artifacts"][kind] = value

    return edit


def _set_segment_keys(value: str) -> Callable[[dict], None]:
    def edit(m: dict) -> None:
        for c in m["source"]["containers"]:
            for s in c["segments"]:
                if s[2] is None:
                    s[3] = value

    return edit


MANIFEST_EDITS = [
    pytest.param(_set_artifact("zarr", "../../../outside"), id="zarr-dotdot"),
    pytest.param(_set_artifact("zarr", "/etc"), id="zarr-absolute"),
    pytest.param(_set_artifact("zarr", 5), id="zarr-int"),
    pytest.param(_set_artifact("tiff", "../../../outside"), id="tiff-dotdot"),
    pytest.param(
        lambda m: m["files"][_first(m["files"])].update(key="../../../../etc/passwd"),
        id="file-key-dotdot",
    ),
    pytest.param(
        _set_segment_keys("../../../../etc/passwd"),
        id="segment-key-dotdot",
    ),
    pytest.param(lambda m: m.pop("tensors"), id="no-tensors"),
    pytest.param(lambda m: m.pop("files"), id="no-files"),
    pytest.param(lambda m: m.pop("source"), id="no-source"),
    pytest.param(
        lambda m: m["tensors"][_first(m["tensors"])].pop("sha256"),
        id="no-sha256",
    ),
    pytest.param(
        lambda m: m["tensors"][_first(m["tensors"])].pop("artifacts"),
        id="no-artifacts",
    ),
    pytest.param(lambda m: m.update(tensors=[]), id="tensors-list"),
    pytest.param(lambda m: m.update(files=[]), id="files-list"),
    pytest.param(
        lambda m: m["tensors"].update({_first(m["tensors"]): "x"}),
        id="record-string",
    ),
    pytest.param(
        lambda m: m["source"]["containers"][0].update(segments="x"),
        id="segments-string",
    ),
    pytest.param(lambda m: m["source"].update(containers=None), id="containers-null"),
    pytest.param(lambda m: m.update(selection="x"), id="selection-string"),
    pytest.param(lambda m: m["tensors"][_first(m["tensors"])].update(shape="abc"), id="shape-string"),
    pytest.param(
        lambda m: m["source"]["containers"][0]["segments"][1].__setitem__(0, "x"),
        id="segment-start-string",
    ),
    pytest.param(
        lambda m: m["source"]["containers"][0].update(name="../evil.safetensors"),
        id="container-name-dotdot",
    ),
    pytest.param(lambda m: m.pop("format"), id="no-format"),
]


@pytest.fixture
def extracted(tmp_path: Path) -> ExtractResult:
    return extract(str(SAMPLE), ExtractOptions(store=str(tmp_path / "store"), name="m"))


def _record_keys(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every store key that Store.path turned into a path (all reads go through it)."""
    keys: list[str] = []
    original = Store.path

    def recording(self: Store, key: str) -> str:
        path = original(self, key)
        keys.append(key)
        return path

    monkeypatch.setattr(Store, "path", recording)
    return keys


def _check_hand_edited(model: ModelRef, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """verify: a report or a one-line error; restore: a one-line error or the original bytes;
    neither reads a key outside the model's prefix nor writes outside `out/`."""
    keys = _record_keys(monkeypatch)
    before = snapshot(tmp_path)
    try:
        verify(model.url)
    except WeightsmithError as e:
        assert "\n" not in str(e)
    out = tmp_path / "out" / "model.safetensors"
    try:
        restore(model.url, str(out))
    except WeightsmithError as e:
        assert "\n" not in str(e)
    else:
        assert out.read_bytes() == SAMPLE.read_bytes()
    assert [k for k in keys if k != model.prefix and not k.startswith(model.prefix + "/")] == []
    assert [p for p in written(before, tmp_path) if not inside(p, tmp_path / "out")] == []


@pytest.mark.parametrize("edit", MANIFEST_EDITS)
def test_hand_edited_manifest_fails_cleanly(
    extracted: ExtractResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: Callable[[dict], None],
) -> None:
    model = model_of(extracted)
    manifest = copy.deepcopy(model.manifest())
    edit(manifest)
    Path(model.store.path(model.key(MANIFEST))).write_text(json.dumps(manifest))
    _check_hand_edited(model, tmp_path, monkeypatch)


@pytest.mark.parametrize("content", [b"", b"{", b"\xff\xfe", b"[]", b'"x"', b"null", b"1e999999"])
def test_manifest_that_is_not_a_manifest_is_a_one_line_error(
    extracted: ExtractResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    model = model_of(extracted)
    Path(model.store.path(model.key(MANIFEST))).write_bytes(content)
    with pytest.raises(WeightsmithError):
        verify(model.url)
    with pytest.raises(WeightsmithError):
        restore(model.url, str(tmp_path / "out.safetensors"))
    assert [m.status for m in list_models(model.store)] == ["damaged"]


def test_manifest_pointing_into_another_model_is_refused(
    extracted: ExtractResult, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    twin = model_of(extract(str(SAMPLE), ExtractOptions(store=str(tmp_path / "store"), name="twin")))
    model = model_of(extracted)
    manifest = model.manifest()
    name = _first(manifest["tensors"])
    own = manifest["tensors"][name]["artifacts"]["zarr"]
    shutil.rmtree(model.store.path(own))  # the model's own array is gone ...
    manifest["tensors"][name]["artifacts"]["zarr"] = twin.manifest()["tensors"][name]["artifacts"]["zarr"]
    Path(model.store.path(model.key(MANIFEST))).write_text(json.dumps(manifest))  # ... pointed at the twin's
    _check_hand_edited(model, tmp_path, monkeypatch)
    try:
        assert not verify(model.url).ok
    except WeightsmithError:
        pass  # refused outright: better still


def test_dotdot_key_is_refused_even_without_asserts(extracted: ExtractResult, tmp_path: Path) -> None:
    model = model_of(extracted)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not for the store")
    manifest = model.manifest()
    arts = manifest["tensors"][_first(manifest["tensors"])]["artifacts"]
    arts["tiff"] = "../secret.bin"  # the store is tmp_path/store: this names tmp_path/secret.bin
    arts["tiff_sha256"] = hashlib.sha256(secret.read_bytes()).hexdigest()
    Path(model.store.path(model.key(MANIFEST))).write_text(json.dumps(manifest))
    code = (
        "import json, sys\n"
        "from weightsmith.errors import WeightsmithError\n"
        "from weightsmith.verify import verify\n"
        "try:\n"
        "    print(json.dumps(verify(sys.argv[1]).ok))\n"
        "except WeightsmithError:\n"
        "    print('refused')\n"
    )
    run = subprocess.run([sys.executable, "-O", "-c", code, model.url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() != "true", "verify read tmp_path/secret.bin and found it matching"


# ---------------------------------------------------------------------------------------------
# malicious config.json, remote code and pickles beside the weights


def test_remote_code_and_pickles_are_copied_or_ignored_never_run(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    folder = tmp_path / "src"
    safetensors_file(folder / "model.safetensors", [("w", np.arange(6, dtype="<f4").reshape(2, 3))])
    config = {
        "model_type": "evil",
        "architectures": ["EvilModel"],
        "auto_map": {
            "AutoConfig": "modeling_evil.EvilConfig",
            "AutoModel": "modeling_evil.EvilModel",
        },
        "trust_remote_code": True,
    }
    config_bytes = json.dumps(config, indent=2).encode()
    (folder / "config.json").write_bytes(config_bytes)
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["modeling_evil.T", None]}})
    )
    (folder / "modeling_evil.py").write_text(f"open({str(canary / 'imported')!r}, 'w').write('ran')\n")

    class Evil:
        def __reduce__(self):
            return (open, (str(canary / "unpickled"), "w"))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    canary.mkdir()

    inspect_source(str(folder))
    result = extract(str(folder), ExtractOptions(store=str(tmp_path / "store")))
    model = model_of(result)
    assert verify(result.model_url).ok
    restore(result.model_url, str(tmp_path / "out"))
    restore(result.model_url, str(tmp_path / "deq.safetensors"), dequantize=True)
    list_models(model.store)
    gc(model.store, dry_run=False, older_than_s=0)

    assert list(canary.iterdir()) == []
    assert "modeling_evil" not in sys.modules
    files = model.manifest()["files"]
    assert model.store.read_bytes(files["config.json"]["key"]) == config_bytes  # verbatim
    assert not any(name.endswith((".py", ".bin")) for name in files)
    assert not any(p.name.endswith((".py", ".bin")) for p in Path(model.store.path(model.prefix)).rglob("*"))


DANGEROUS = {
    r"\btorch\.load\(": "torch.load unpickles",
    r"trust_remote_code\s*=\s*True": "runs code from the model's folder",
    r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(|\bcloudpickle\.": "unpickles",
    r"allow_pickle\s*=\s*True": "numpy unpickling",
    r"weights_only\s*=\s*False": "unrestricted torch unpickling",
    r"(?<![\w.])(eval|exec)\(": "executes strings",
}


def test_no_code_path_unpickles_or_trusts_remote_code() -> None:
    hits = []
    for package in ("weightsmith", "flows", "tasks"):
        for path in sorted((REPO / package).rglob("*.py")):
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                hits += [
                    f"{path.relative_to(REPO)}:{lineno}: {why}: {line.strip()}"
                    for pattern, why in DANGEROUS.items()
                    if re.search(pattern, code)
                ]
    assert hits == []


# ---------------------------------------------------------------------------------------------
# catalogues edited by hand (weightsmith/catalog.py, part 5)


_CATALOG = b'{"format": "weightsmith-catalog/1", "models": '


@pytest.fixture
def catalog_store(tmp_path: Path):
    from weightsmith import catalog

    return catalog, Store(str(tmp_path / "store"))


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"\xff",
        b"[]",
        b'{"format": "other", "models": {}}',
        _CATALOG + b"[]}",
        _CATALOG + b'{"a@1": {"status": "odd", "attempts": 1}}}',
        _CATALOG + b'{"a@1": {"status": "done", "attempts": 1.5}}}',
        _CATALOG + b'{"a@1": {"status": "done", "attempts": "1"}}}',
    ],
)
def test_hand_edited_catalogue_is_a_one_line_error_and_is_kept(catalog_store, content: bytes) -> None:
    catalog, store = catalog_store
    store.write_bytes(catalog.KEY, content)
    with pytest.raises(WeightsmithError) as e:
        catalog.load(store)
    assert "\n" not in str(e.value)
    with pytest.raises(WeightsmithError):
        catalog.update(store, lambda c: c["models"].clear())
    assert store.read_bytes(catalog.KEY) == content
    list_models(store)
    gc(store, dry_run=False, older_than_s=0)
    assert store.read_bytes(catalog.KEY) == content  # gc never touches the catalogue


@pytest.mark.parametrize("after", ["soon", "2024-01-01T00:00:00", 5])
def test_hand_edited_retry_time_is_a_one_line_error(catalog_store, after: object) -> None:
    catalog, store = catalog_store
    entry = {"status": "failed", "attempts": 1, "next_attempt_after": after}
    store.write_bytes(catalog.KEY, json.dumps({"format": catalog.FORMAT, "models": {"a@1": entry}}).encode())
    try:
        loaded, _ = catalog.load(store)
    except WeightsmithError:
        return  # refused when read: fine
    try:
        catalog.due(loaded["models"]["a@1"], datetime.now(UTC))
    except WeightsmithError:
        return
    pytest.fail("a hand-edited retry time was neither refused nor understood")
