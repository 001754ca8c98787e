"""The `weightsmith` command line as a user runs it: real subprocesses, real exit codes, real
stderr. User errors are one line `error: <file>: <problem>` with exit status 2 and nothing
written; the model URL is the last line of stdout; verify fails with 1 on a corrupt store.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import fixture_paths
import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from weightsmith.cli import app
from weightsmith.model import parse_model_url
from weightsmith.verify import verify

FIXTURES = fixture_paths.FIXTURES
BAD = sorted(p.name for p in (FIXTURES / "bad").glob("*"))
MINICPM = "safetensors/ollama_minicpm3_4b_model.safetensors"


def cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m weightsmith.cli ARGS` with this process's environment (monkeypatched)."""
    return subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def cli_in_process(*args: object) -> subprocess.CompletedProcess[str]:
    """The same command through typer's CliRunner, without an interpreter start-up: for the
    many small header cases (the subprocess tests prove the real process behaves the same)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """WEIGHTSMITH_HOME in this test's folder: the default store and caches go there."""
    folder = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(folder))
    monkeypatch.setenv("COLUMNS", "200")
    return folder


def assert_user_error(run: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, exactly one stderr line `error: ...` holding every fragment, no traceback."""
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in run.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def assert_nothing_written(*stores: Path) -> None:
    """Input is checked before the first write: the store folder is not even created."""
    for store in stores:
        assert not store.exists(), sorted(str(p) for p in store.rglob("*"))


def last_line(text: str) -> str:
    return text.rstrip("\n").splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# 3. bad input is rejected with one line, and nothing is written


@pytest.mark.parametrize("name", BAD)
def test_bad_fixture_is_rejected(home: Path, tmp_path: Path, name: str) -> None:
    path = FIXTURES / "bad" / name
    assert_user_error(cli("extract", path), str(path))  # into the default store
    assert_nothing_written(home / "store")


def test_bad_fixture_list_is_not_empty() -> None:
    assert len(BAD) == 4


def test_missing_file_is_rejected(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "no-such-model.safetensors"
    assert_user_error(cli("extract", path, "--store", tmp_path / "store"), str(path), "no such file")
    assert_user_error(cli("inspect", path), str(path))
    assert_nothing_written(tmp_path / "store", home / "store")


def raw_file(path: Path, header: bytes, data: bytes) -> Path:
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


MALFORMED = {
    "unknown-dtype": (
        b'{"w":{"dtype":"F4X","shape":[2],"data_offsets":[0,2]}}',
        b"\0\0",
        "unknown dtype 'F4X'",
    ),
    "overlapping": (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
        bytes(12),
        "overlaps",
    ),
    "duplicate-field": (  # a repeated *name* is accepted (the reference keeps the last); a field is not
        b'{"w":{"dtype":"U8","dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
        "duplicate field 'dtype'",
    ),
    "non-string-metadata": (
        b'{"__metadata__":{"bits":4},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0",
        "__metadata__ must map strings to strings",
    ),
    "trailing-bytes": (
        b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"\0\0",
        "not covered",
    ),
    "not-at-0": (b'{"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0\0", "gap"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_one_line(home: Path, tmp_path: Path, case: str) -> None:
    header, data, fragment = MALFORMED[case]
    path = raw_file(tmp_path / f"{case}.safetensors", header, data)
    store = tmp_path / "store"
    assert_user_error(cli_in_process("extract", path, "--store", store), str(path), fragment)
    assert_nothing_written(store, home / "store")


def test_bad_option_is_one_line(home: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert_user_error(cli("extract", fixtures_dir / MINICPM, "--store", store, "--images", "bogus"), "--images")
    assert_nothing_written(store)


def test_not_a_model_url_is_one_line(home: Path, tmp_path: Path) -> None:
    assert_user_error(cli("verify", tmp_path / "nowhere"), "not a model URL")
    missing = tmp_path / "store" / "models" / "x" / "y"
    assert_user_error(cli("verify", missing), str(missing), "no manifest.json")
    assert_user_error(cli("restore", missing, "--out", tmp_path / "o.safetensors"), str(missing))


# ---------------------------------------------------------------------------------------------
# 12. the happy paths


def test_inspect_json_lists_gptq_groups_as_one_weight(home: Path, fixtures_dir: Path) -> None:
    run = cli("inspect", "--json", fixtures_dir / "gptq" / "llama_3_2_1b_int4.safetensors")
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)
    assert rows == [
        {
            "name": "model.layers.0.mlp.gate_proj.weight",
            "dtype": "GPTQ-4bit (F32)",
            "shape": [256, 256],
            "bytes": rows[0]["bytes"],
        }
    ]
    assert rows[0]["bytes"] == 35072  # qweight + qzeros + scales + g_idx
    assert not home.exists()  # inspect writes nothing


def test_inspect_table(home: Path, fixtures_dir: Path) -> None:
    run = cli("inspect", fixtures_dir / MINICPM)
    assert run.returncode == 0, run.stderr
    assert "lm_head.weight" in run.stdout
    assert "15 tensors, 402,000 bytes" in run.stdout


@pytest.fixture
def random_model(tmp_path: Path) -> Path:
    """A small model with random values (zarr skips all-zero chunks, so fixtures of zeros would
    leave no chunk file to corrupt)."""
    rng = np.random.default_rng(7)
    path = tmp_path / "rand-model" / "model.safetensors"
    path.parent.mkdir()
    save_file(
        {
            "layer.0.weight": rng.standard_normal((64, 48)).astype(np.float32),
            "layer.0.bias": rng.standard_normal(48).astype(np.float32),
            "layer.1.weight": rng.standard_normal((48, 16)).astype(np.float16),
        },
        str(path),
    )
    return path


def test_extract_verify_corrupt_restore(home: Path, random_model: Path, tmp_path: Path) -> None:
    run = cli("extract", random_model, "--no-prefect")  # default store: $WEIGHTSMITH_HOME/store
    assert run.returncode == 0, run.stderr
    url = last_line(run.stdout)
    assert url.startswith(f"{home / 'store'}/models/rand-model/")  # slug: the parent folder
    assert "created: 3 tensors (3 written" in run.stderr

    again = cli("extract", random_model, "--no-prefect", "--json")
    assert again.returncode == 0, again.stderr
    facts = json.loads(again.stdout)
    assert (facts["model_url"], facts["status"], facts["written"]) == (url, "unchanged", 0)

    ok = cli("verify", url)
    assert ok.returncode == 0, ok.stderr
    assert last_line(ok.stdout).startswith("ok: ")

    out = tmp_path / "restored.safetensors"
    restored = cli("restore", url, "--out", out)
    assert restored.returncode == 0, restored.stderr
    assert last_line(restored.stdout) == str(out)
    assert out.read_bytes() == random_model.read_bytes()

    # Corrupt one chunk of one array: verify fails with 1 and names the tensor.
    model = parse_model_url(url)
    record = model.manifest()["tensors"]["layer.0.weight"]
    chunks = [
        p
        for p in Path(model.store.path(record["artifacts"]["zarr"])).rglob("*")
        if p.is_file() and p.name != "zarr.json"
    ]
    assert len(chunks) == 1
    data = bytearray(chunks[0].read_bytes())
    for i in range(len(data) // 2, len(data)):
        data[i] ^= 0x5A
    chunks[0].write_bytes(bytes(data))
    bad = cli("verify", url)
    assert bad.returncode == 1, (bad.stdout, bad.stderr)
    assert "'layer.0.weight'" in bad.stderr
    assert "layer.0.bias" not in bad.stderr
    assert "Traceback" not in bad.stderr
    assert last_line(bad.stdout).startswith("FAILED: ")
    report = json.loads(cli("verify", url, "--json").stdout)
    assert report["ok"] is False
    assert len(report["problems"]) == 1


def test_restore_sharded_into_a_folder(home: Path, fixtures_dir: Path, tmp_path: Path) -> None:
    source = fixtures_dir / "safetensors" / "sharded_minicpm3"
    run = cli(
        "extract",
        source,
        "--no-prefect",
        "--store",
        tmp_path / "store",
        "--images",
        "none",
        "--name",
        "mc3",
    )
    assert run.returncode == 0, run.stderr
    url = last_line(run.stdout)
    assert "/models/mc3/" in url
    out = tmp_path / "out"
    restored = cli("restore", url, "--out", out)
    assert restored.returncode == 0, restored.stderr
    assert sorted(Path(p).name for p in restored.stdout.split()) == sorted(p.name for p in source.iterdir())
    for p in source.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()


@pytest.mark.slow
def test_demo_tiny_runs_every_stage_end_to_end(home: Path, tmp_path: Path) -> None:
    """The main job at tiny size: base model, fine-tune family, extract, predict, assemble, vet, report."""
    run = cli("demo", "--size", "tiny", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    url = last_line(run.stdout)
    assert url.startswith(str(home / "store" / "models" / "demo-base-tiny"))
    assert verify(url).ok
    model = parse_model_url(url)
    assert "transformer.wte.weight" in model.manifest()["tensors"]
    reports = model.store.list(model.key("reports"))
    report = [k for k in reports if k.endswith("-g0/report.json")]
    assert report and not [k for k in reports if k.endswith("-g1/report.json")], reports  # one group
    data = model.store.read_json(report[0])
    entries = data["entries"]
    labels = {e["label"] for e in entries}
    assert {
        "original",
        "zoo-diffusion",
        "tile-diffusion",
        "gaussian",
        "permute",
        "average(k=2)",
        "coord-gaussian",
        "pca-gaussian(scale=1)",
        "zoo-member",
        "task-arithmetic",
        "ties(density=0.5)",
        "gold",
    } <= labels
    assert "latest" not in labels  # fine-tunes of one base are a set, not a sequence
    assert any(label.startswith("noise(") for label in labels)
    # the gold fine-tunes: both scored, as references (never a baseline), not copies of the zoo
    gold = [e for e in entries if e["label"] == "gold"]
    assert len(gold) == 2 and {e["kind"] for e in gold} == {"reference"}
    summary = data["summary"]
    assert summary["reference"]["gold"]["samples"] == 2 and summary["reference"]["gold"]["novelty"] > 0
    assert "gold" not in summary["baseline_samples"]
    assert data["verdicts"] and all(v["sentence"] for v in data["verdicts"])
    assert summary["best_candidate"] in {"zoo-diffusion", "tile-diffusion"}
    # the predicted group: one MLP block and its LayerNorm
    pred = [k for k in model.store.list(model.key("predictions")) if k.endswith("-zoo-diffusion/prediction.json")]
    tensors = list(model.store.read_json(pred[0])["tensors"])
    assert len(tensors) == 6 and all(".ln_2." in n or ".mlp." in n for n in tensors), tensors
    md = model.store.read_bytes(report[0].replace("report.json", "report.md")).decode()
    assert "plots/frontier.png" in md
    assert "group 0: best " in run.stderr, run.stderr[-2000:]  # the summary line
    assert "gold" in run.stderr and "3/4 group: block" in run.stderr
    assert "verdicts:" in run.stderr
    assert not (tmp_path / ".weightsmith").exists()


def test_demo_unknown_size_is_one_line(home: Path) -> None:
    assert_user_error(cli("demo", "--size", "huge"), "--size", "unknown size 'huge'")


# ---------------------------------------------------------------------------------------------
# tensor names are data, not console markup

MARKUP_NAMES = {"w[/x]": np.ones((2, 3), np.float32), "a[bold]b": np.zeros(3, np.float32)}


def test_inspect_table_shows_names_verbatim(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "markup.safetensors"
    save_file(MARKUP_NAMES, str(path))
    run = cli("inspect", path)
    assert run.returncode == 0, run.stderr
    for name in MARKUP_NAMES:
        assert name in run.stdout


def test_verify_names_a_markup_like_tensor(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "markup" / "model.safetensors"
    path.parent.mkdir()
    save_file(MARKUP_NAMES, str(path))
    run = cli("extract", path, "--no-prefect", "--store", tmp_path / "store", "--images", "none")
    assert run.returncode == 0, run.stderr
    url = last_line(run.stdout)
    model = parse_model_url(url)
    zarr_key = model.manifest()["tensors"]["w[/x]"]["artifacts"]["zarr"]
    for chunk in Path(model.store.path(zarr_key)).rglob("*"):
        if chunk.is_file() and chunk.name != "zarr.json":
            chunk.write_bytes(b"garbage")
    bad = cli("verify", url)
    assert "Traceback" not in bad.stderr
    assert bad.returncode == 1
    assert "'w[/x]'" in bad.stderr
