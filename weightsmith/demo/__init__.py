"""The demo (`weightsmith demo`, `make demo`): a small GPT-2 trained offline (`train`), its zoo,
the pipeline run on it (`run`), random GPT-2-shaped models (`models`) and tiny diffusers
pipelines for tests (`tiny_pipelines`). Nothing here imports Prefect: the caller hands
`run_demo` the pipeline runner to use."""

from weightsmith.demo.models import SIZES, build_gpt2

__all__ = ["SIZES", "build_gpt2"]
