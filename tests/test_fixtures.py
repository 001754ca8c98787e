"""The third-party fixture files are part of the checkout: inside the repository, listed, unchanged."""

import hashlib
import re

from fixture_paths import FIXTURES, REPO


def test_fixtures_folder_is_inside_the_repository():
    assert FIXTURES.is_dir()
    assert FIXTURES.resolve().is_relative_to(REPO.resolve()), FIXTURES


def test_every_fixture_is_listed_with_its_sha256():
    listed = dict(
        (path.removeprefix("./"), digest)
        for digest, path in re.findall(r"^([0-9a-f]{64})  (\S+)$", (FIXTURES / "README.md").read_text(), re.M)
    )
    files = sorted(
        str(p.relative_to(FIXTURES))
        for p in FIXTURES.rglob("*")
        if p.is_file() and p.name != "README.md" and "LICENSES" not in p.parts
    )
    assert files and sorted(listed) == files
    for name in files:
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == listed[name], name


def test_no_code_names_a_path_outside_the_checkout():
    pattern = re.compile(r"""(\.\./shared|["']/work/|parents\[\d\]\.parent)""")
    offenders = []
    for folder in ("weightsmith", "flows", "tasks", "tests", "bench", "deployments"):
        for path in (REPO / folder).rglob("*.py"):
            if path.name == "test_fixtures.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders
