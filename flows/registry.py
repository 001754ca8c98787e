"""Flows by CLI name (imported lazily by the CLI)."""

from flows.extract import extract_model
from flows.pipeline import weightsmith_pipeline
from flows.predict import dispatch_predict
from flows.zoo import build_zoo

FLOWS = {"extract": extract_model, "predict": dispatch_predict, "run": weightsmith_pipeline, "zoo": build_zoo}
