"""`weightsmith zoo build|ls|show` as a user runs them: a real subprocess (the flow, ephemeral
Prefect) for build, one-line errors with exit 2 and nothing written, and the listings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_models import store_model
from typer.testing import CliRunner

from weightsmith.cli import app
from weightsmith.store import Store
from weightsmith.zoo import read_zoo, read_zoo_tensor


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(folder))
    monkeypatch.setenv("COLUMNS", "200")
    return folder


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightsmith.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def in_process(*args: object) -> subprocess.CompletedProcess[str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def members(tmp_path: Path, store: str) -> list[str]:
    rng = np.random.default_rng(0)
    return [
        store_model(
            {"w": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)},
            tmp_path / "src",
            f"m{i}",
            store,
        )
        for i in range(3)
    ]


def test_zoo_build_ls_show(home: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls = members(tmp_path, store)
    run = cli("zoo", "build", "z", *[x for u in urls for x in ("--model", u)], "--include", "w", "--ordered")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{store}/zoos/z"
    manifest = read_zoo(Store(store), "z")
    assert list(manifest["tensors"]) == ["w"] and manifest["ordered"] is True
    assert read_zoo_tensor(Store(store), "z", "w").shape == (3, 3, 4)

    run = in_process("zoo", "build", "y", "--model", urls[0], "--model", urls[1], "--no-prefect", "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["written"] == 2

    listed = in_process("zoo", "ls", "--store", store, "--json")
    assert [(z["id"], z["checkpoints"], z["tensors"]) for z in json.loads(listed.stdout)] == [("y", 2, 2), ("z", 3, 1)]
    table = in_process("zoo", "ls", "--store", store)
    assert table.returncode == 0 and "z" in table.stdout
    shown = in_process("zoo", "show", "z", "--store", store)
    assert shown.returncode == 0, shown.stderr
    assert "3 members, 1 tensors" in shown.stdout and "ordered" in shown.stdout
    for url in urls:
        assert url.rsplit("/", 1)[1] in shown.stdout  # each member's revision
    info = json.loads(in_process("zoo", "show", "z", "--store", store, "--json").stdout)
    assert [m["url"] for m in info["members"]] == urls and info["tensor_shapes"] == {"w": [3, 4]}


def test_zoo_build_mismatch_is_one_line_and_writes_nothing(home: Path, tmp_path: Path) -> None:
    store = str(tmp_path / "store")
    urls = members(tmp_path, store)
    odd = store_model({"w": np.zeros((3, 5), np.float32)}, tmp_path / "src", "odd", store)
    run = cli("zoo", "build", "z", "--model", urls[0], "--model", odd, "--include", "w")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.splitlines() == [f"error: {odd}: tensor 'w' has shape [3, 5], {urls[0]} has [3, 4]"]
    run = in_process("zoo", "build", "z", "--model", urls[0], "--align", "sideways")
    assert run.returncode == 2 and run.stderr.startswith("error: --align:"), run.stderr
    run = in_process("zoo", "show", "nope", "--store", store)
    assert run.returncode == 2 and "no zoo.json" in run.stderr
    assert Store(store).list("zoos") == []
