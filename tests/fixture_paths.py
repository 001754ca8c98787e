"""Where the real third-party files the tests read live: `tests/fixtures/`, inside the repository.

Their provenance, licences and sha256 are in `tests/fixtures/README.md`; `test_fixtures.py` checks
that this folder resolves inside the repository root, so no test reads outside the checkout.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
