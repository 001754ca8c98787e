"""Flows by CLI name (imported lazily by the CLI)."""

from weightsmith_flows.extract import extract_model
from weightsmith_flows.pipeline import weightsmith_pipeline
from weightsmith_flows.predict import dispatch_predict
from weightsmith_flows.zoo import build_zoo

FLOWS = {"extract": extract_model, "predict": dispatch_predict, "run": weightsmith_pipeline, "zoo": build_zoo}
