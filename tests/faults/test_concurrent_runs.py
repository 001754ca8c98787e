"""Two runs of the same model at once, on a local store and on S3: afterwards the manifest is
the one an uninterrupted run writes and `verify` passes; each run either succeeded or failed
with one line. And the conditional writes under it: of many concurrent publishers of different
manifests exactly one creates manifest.json, and of many concurrent replacements of the same
manifest exactly one wins.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fault_helpers import write_model

from weightsmith.errors import WeightsmithError
from weightsmith.extract import ExtractOptions, extract, publish
from weightsmith.model import MANIFEST, ModelRef, parse_model_url
from weightsmith.store import Store
from weightsmith.store.store import dumps
from weightsmith.verify import verify

TENSORS = 16
WRITERS = 8


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "home"
    monkeypatch.setenv("WEIGHTSMITH_HOME", str(folder))
    return folder


@pytest.fixture(params=["local", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store: a local folder, or a prefix in a fresh bucket of the session server."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.applymarker(pytest.mark.s3)
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store"


def start_extract(source: str, store: str, *more: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "weightsmith.cli", "extract", source, "--store", store,
         "--no-prefect", "--json", *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def outcome(process: subprocess.Popen) -> dict:
    """{"status": ...} of a run that succeeded, {"error": line} of one that failed cleanly
    (exit 2, one line), {"crash": last stderr line} of anything else."""
    out, err = process.communicate(timeout=300)
    lines = err.strip().splitlines()
    if process.returncode == 0:
        return json.loads(out)
    if process.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        return {"error": lines[0]}
    return {"crash": f"exit {process.returncode}: {lines[-1] if lines else ''}"}


def run_facts(model: ModelRef) -> list[dict]:
    return [model.store.read_json(k) for k in model.store.list(model.key("runs"))]


def same_model(manifest: bytes) -> bytes:
    """The manifest with a forced run's generation folded back: a forced run that started after
    the other had published rebuilt the model under generations/<run>/ and switched to it."""
    m = json.loads(manifest)
    generation = m.pop("generation", None)
    if generation is None:
        return manifest
    return dumps(m).replace(f"/generations/{generation}/".encode(), b"/")


def race_problems(source: str, store: str, second: str, reference: ModelRef) -> list[str]:
    """Start two extractions of `source` into `store` together (the second with --force when
    `second` is "force"); what went wrong, or []."""
    extra = ("--force",) if second == "force" else ()
    results = [outcome(p) for p in (start_extract(source, store), start_extract(source, store, *extra))]
    problems = [f"run {i} crashed: {r['crash']}" for i, r in enumerate(results) if "crash" in r]
    succeeded = [r for r in results if "status" in r]
    if not succeeded:
        return [*problems, f"no run succeeded: {results}"]
    model = parse_model_url(f"{store}/{reference.prefix}")
    assert {r["model_url"] for r in succeeded} == {model.url}
    statuses = sorted(r["status"] for r in succeeded)
    # One run created the manifest; the other found the same bytes there or (with --force)
    # replaced them with the same bytes, or failed with one line.
    if statuses.count("created") != 1 or not set(statuses) <= {"created", "unchanged", "replaced"}:
        problems.append(f"statuses {statuses}")
    if same_model(model.store.read_bytes(model.key(MANIFEST))) != reference.store.read_bytes(reference.key(MANIFEST)):
        problems.append("the manifest differs from an uninterrupted run's")
    report = verify(model.url)
    problems += [f"published but corrupt: {p}" for p in report.problems]
    facts = run_facts(model)
    if sorted(f["outcome"] for f in facts) != sorted(r.get("status", "failed") for r in results):
        problems.append(f"run facts {[f['outcome'] for f in facts]} for {results}")
    return problems


@pytest.mark.parametrize(
    "where, second, attempts",
    [
        # Before the model lease, two plain runs started together on 48 tensors met on a tensor
        # (one re-created the array the other was writing) in 8 of 8 attempts here.
        pytest.param("local", "plain", 6),
        pytest.param("local", "force", 3),
        pytest.param("s3", "plain", 1, marks=pytest.mark.s3),
        pytest.param("s3", "force", 1, marks=[pytest.mark.s3, pytest.mark.slow]),
    ],
)
def test_two_runs_of_the_same_model_at_once(
    home: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    where: str,
    second: str,
    attempts: int,
) -> None:
    """The race is timing-dependent: it is run up to `attempts` times, stopping at the first
    attempt that shows a problem (a crash, a corrupt or different manifest)."""
    # Many tensors locally: many chances for the two runs to meet on one tensor.
    tensors = 48 if where == "local" else TENSORS
    source = str(write_model(tmp_path / "src" / "twin" / "model.safetensors", tensors, 256, 256, seed=21))
    reference = extract(source, ExtractOptions(store=str(tmp_path / "reference")))
    ref_model = parse_model_url(reference.model_url)
    if where == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        stores = [f"s3://{bucket}/store-{i}" for i in range(attempts)]
    else:
        stores = [str(tmp_path / f"store-{i}") for i in range(attempts)]
    for i, store in enumerate(stores):
        problems = race_problems(source, store, second, ref_model)
        assert problems == [], f"attempt {i + 1}: {problems}"


class Died(Exception):
    """Stands for a run that dies (killed, out of memory, the rmtree race) at a chosen point."""


@pytest.mark.parametrize("second", ["plain", "force"])
def test_a_second_run_cannot_recreate_a_tensor_a_running_one_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str
) -> None:
    """The race made deterministic with two library calls in threads: run A has written the
    values of tensor X but not yet its record when run B starts. Without the model's lease B
    re-created X (deleting A's chunk) and, made to die there, left A to publish a manifest that
    `verify` rejects. Now B must fail with one line naming A before it touches any tensor."""
    from weightsmith.store import arrays
    from weightsmith.store.keys import encode_key

    source = str(write_model(tmp_path / "src" / "twin" / "model.safetensors", 4, 64, 64, seed=21))
    store = str(tmp_path / "store")
    victim = "layer.1.weight"
    a_wrote_victim, b_ended = threading.Event(), threading.Event()
    real_create = arrays.create

    def create(store_, key, *args, **kwargs):
        array = real_create(store_, key, *args, **kwargs)
        if threading.current_thread().name == "run-b" and key.endswith(f"/{encode_key(victim)}.zarr"):
            raise Died("run B died right after re-creating the array")
        return array

    monkeypatch.setattr(arrays, "create", create)

    def progress_a(nbytes: int, name: str) -> None:
        if name == victim and not a_wrote_victim.is_set():
            a_wrote_victim.set()  # X's values are on disk, its record is not
            assert b_ended.wait(60)

    out: dict[str, object] = {}

    def run(label: str, options: ExtractOptions, progress=None) -> None:
        try:
            out[label] = extract(source, options, progress=progress)
        except Exception as e:  # noqa: BLE001 - sorted below
            out[label] = e

    run_a = threading.Thread(target=run, name="run-a", args=("a", ExtractOptions(store=store), progress_a))
    run_a.start()
    assert a_wrote_victim.wait(60)
    run_b = threading.Thread(target=run, name="run-b", args=("b", ExtractOptions(store=store, force=second == "force")))
    run_b.start()
    run_b.join(60)
    b_ended.set()
    run_a.join(60)
    assert not run_a.is_alive() and not run_b.is_alive()

    # B never reached create() (it would have died there): it was turned away, naming A.
    assert isinstance(out["b"], WeightsmithError), out["b"]
    assert "another run is writing this model" in str(out["b"]) and "run " in str(out["b"])
    assert not isinstance(out["a"], Exception), out["a"]
    assert out["a"].status == "created"
    report = verify(out["a"].model_url)
    assert report.ok, report.problems


# --- the conditional writes -------------------------------------------------------------------


def manifests(count: int) -> list[dict]:
    """Different manifests of one model (as two runs with different options would write)."""
    return [
        {"format": "weightsmith-manifest/1", "model": {"slug": "m", "revision": "r"}, "writer": i} for i in range(count)
    ]


def race(count: int, work) -> list[object]:
    """Run work(i) in `count` threads released together; returns results or exceptions."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def target(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - the test sorts them
            results[i] = e

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def models_of(store_url: str, count: int) -> list[ModelRef]:
    """One ModelRef (and Store, with its S3 client made up front) per writer."""
    refs = []
    for _ in range(count):
        store = Store(store_url)
        if store.protocol == "s3":
            store._client()  # boto3 sessions are not thread-safe: make the clients one by one
        refs.append(ModelRef(store, "m", "r"))
    return refs


def test_concurrent_publishers_exactly_one_creates(store_url: str, home: Path) -> None:
    candidates = manifests(WRITERS)
    refs = models_of(store_url, WRITERS)
    results = race(WRITERS, lambda i: publish(refs[i], candidates[i], force=False))

    created = [i for i, r in enumerate(results) if r == "created"]
    assert len(created) == 1, results
    for i, r in enumerate(results):
        if i not in created:
            assert isinstance(r, WeightsmithError), r
            assert "a different complete manifest is already there" in str(r)
    stored = refs[0].store.read_bytes(refs[0].key(MANIFEST))
    assert stored == dumps(candidates[created[0]])


def test_concurrent_forced_publishers_leave_one_whole_manifest(store_url: str, home: Path) -> None:
    candidates = manifests(WRITERS + 1)
    refs = models_of(store_url, WRITERS)
    assert publish(refs[0], candidates[-1], force=False) == "created"  # an earlier model
    results = race(WRITERS, lambda i: publish(refs[i], candidates[i], force=True))

    replaced = [i for i, r in enumerate(results) if r == "replaced"]
    assert replaced, results
    for i, r in enumerate(results):
        if i not in replaced:
            # Lost the race: the manifest changed between reading and replacing it.
            assert isinstance(r, WeightsmithError), r
            assert "another run replaced manifest.json at the same time" in str(r)
    stored = refs[0].store.read_bytes(refs[0].key(MANIFEST))
    assert stored in {dumps(candidates[i]) for i in replaced}  # whole, one writer's bytes


def test_concurrent_replacements_of_one_manifest_exactly_one_wins(store_url: str, home: Path) -> None:
    old = b'{"old": true}\n'
    refs = models_of(store_url, WRITERS)
    key = refs[0].key(MANIFEST)
    assert refs[0].store.create_if_absent(key, old)
    news = [f'{{"new": {i}}}\n'.encode() for i in range(WRITERS)]
    results = race(WRITERS, lambda i: refs[i].store.replace_if_match(key, news[i], old))

    assert not [r for r in results if isinstance(r, Exception)], results
    winners = [i for i, r in enumerate(results) if r is True]
    assert len(winners) == 1, results
    assert refs[0].store.read_bytes(key) == news[winners[0]]
