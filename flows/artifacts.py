"""Prefect artifacts of a model: tensor table, summary, preview links (no secrets in any)."""

from __future__ import annotations

import os

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from weightsmith.model import ModelRef


def _key(text: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in out.split("-") if p)[:100]


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def publish_model_artifacts(
    model: ModelRef, manifest: dict, seconds: float, status: str, max_previews: int = 24
) -> None:
    """Tensor table, markdown summary with sizes and time, and preview links."""
    tensors = [r for r in manifest["tensors"].values() if r.get("role") != "gptq-component"]
    table = [
        {
            "name": r["name"],
            "dtype": r["dtype"],
            "shape": "x".join(map(str, r["shape"])) or "scalar",
            **{k: _fmt(r["stats"].get(k)) for k in ("mean", "std", "min", "max", "nan", "inf")},
        }
        for r in tensors
    ]
    key = _key(f"{model.slug}-{model.revision}")
    create_table_artifact(key=f"tensors-{key}", table=table, description=f"Tensors of {model.slug} @ {model.revision}")
    size = model.store.size(model.prefix)
    previews = [r for r in tensors if "png" in r["artifacts"]][:max_previews]
    # A presigned URL carries the session token of temporary credentials: then link the keys.
    tokened = model.store.protocol == "s3" and bool(os.environ.get("AWS_SESSION_TOKEN"))
    link = (lambda key: model.store.url_of(key)) if tokened else model.store.presign
    links = "\n".join(f"- [{r['name']}]({link(r['artifacts']['png'])})" for r in previews)
    create_markdown_artifact(
        key=f"summary-{key}",
        markdown=(
            f"# {model.slug} @ {model.revision}\n\n"
            f"- status: **{status}**\n- model: `{model.url}`\n"
            f"- manifest: `{model.store.url_of(model.key('manifest.json'))}`\n"
            f"- tensors: {len(tensors)}\n- stored bytes: {size:,}\n- flow time: {seconds:.1f} s\n\n"
            f"## Previews\n{links or '(none: --images none)'}\n"
        ),
        description=f"Extraction summary of {model.slug}",
    )
