"""Flows by CLI name (imported lazily by the CLI)."""

from flows.extract import extract_model

FLOWS = {"extract": extract_model}
