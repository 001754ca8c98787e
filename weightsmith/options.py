"""Stage options travel whole inside the library and flat at the edges.

Each stage has one options model (pydantic, frozen: `ExtractOptions`, `PredictOptions`,
`PipelineOptions`, `ZooOptions`) where every default is declared once and every value is
validated once. The CLI builds it from flags; a flow builds it from its flat parameters (so
`prefect deployment run --param name=value` keeps working) with `from_parameters`, the same
constructor; `parameters` turns a model back into those flat values for a flow call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


def parameters(options: BaseModel, accepted: Iterable[str] | None = None) -> dict[str, Any]:
    """The options as flow parameters (JSON types: tuples as lists); only `accepted` names if given."""
    values = options.model_dump(mode="json")
    return values if accepted is None else {k: v for k, v in values.items() if k in set(accepted)}


def from_parameters(cls: type[M], values: Mapping[str, Any], **overrides: Any) -> M:
    """`cls` from flow parameters: names it does not know are left out, None means its default."""
    given = {**values, **overrides}
    return cls(**{k: v for k, v in given.items() if k in cls.model_fields and v is not None})
