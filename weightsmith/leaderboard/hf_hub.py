"""The `hf-hub` leaderboard source: models listed by the Hugging Face Hub API.

`huggingface_hub.HfApi` lists the models (filter, sort, limit), then each is resolved with
`model_info(files_metadata=True)` to its commit, licence, gating and weights: the sharded
index, else `model.safetensors`, else the one `.safetensors` file at the top of the repository.
The weights are read where the hub serves them, `{endpoint}/{id}/resolve/{commit}/{file}`, with
ranged GETs: nothing is downloaded whole.

The endpoint comes from the query, else `$HF_ENDPOINT`; `$HF_TOKEN` is sent to the API (the
client does that). With `$HF_HUB_OFFLINE` set the hub cannot be listed, which is an error.
"""

from __future__ import annotations

import os
from urllib.parse import quote

from weightsmith.errors import WeightsmithError
from weightsmith.leaderboard.registry import ModelEntry, SourceQuery

DEFAULT_ENDPOINT = "https://huggingface.co"
INDEX_NAME = "model.safetensors.index.json"
# Our names (and the hub's own spellings) -> huggingface_hub's sort names.
SORTS = {
    "downloads": "downloads",
    "trending": "trending_score",
    "trending_score": "trending_score",
    "trendingScore": "trending_score",
    "last_modified": "last_modified",
    "lastModified": "last_modified",
    "likes": "likes",
    "created_at": "created_at",
    "createdAt": "created_at",
}


def endpoint_of(query: SourceQuery) -> str:
    return (query.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def entries(location: str, query: SourceQuery) -> list[ModelEntry]:
    """The first `query.limit` models of the hub's listing, each resolved to its weights.

    Raises:
        WeightsmithError: offline mode, an unknown sort, or the hub cannot be listed.
    """
    assert location == "hf-hub", location
    endpoint = endpoint_of(query)
    if _offline():
        raise WeightsmithError(
            "hf-hub",
            "HF_HUB_OFFLINE is set, so the hub cannot be listed: unset it, or list the models in a manifest file",
        )
    if query.sort not in SORTS:
        raise WeightsmithError(
            f"sort {query.sort!r}",
            f"unknown (choose from {', '.join(sorted(set(SORTS.values())))})",
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=os.environ.get("HF_TOKEN") or None)
    try:
        listed = list(api.list_models(filter=query.filter, sort=SORTS[query.sort], limit=query.limit))
    except (OSError, *HfHubHTTPError.__bases__) as e:  # the HTTP library's errors: refused, 5xx
        raise WeightsmithError(f"{endpoint}/api/models", f"cannot list models ({_reason(e)})") from None
    return [resolve(api, endpoint, m.id, getattr(m, "sha", None)) for m in listed]


def resolve(api, endpoint: str, model_id: str, listed_sha: str | None = None) -> ModelEntry:
    """The weights, commit, licence and gating of one model; problems become `entry.problem`.

    A model the hub will not describe (gone, private, gated without access) or one without
    safetensors weights is returned with a problem instead of failing the whole listing.
    """
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = api.model_info(model_id, files_metadata=True)
    except HfHubHTTPError as e:  # the hub answered: 401, 403, 404...
        return ModelEntry(
            id=model_id,
            revision=listed_sha or "unresolved",
            source="",
            origin="hf-hub",
            problem=f"model info unavailable ({_reason(e)})",
        )
    except (OSError, *HfHubHTTPError.__bases__) as e:  # it did not answer
        raise WeightsmithError(f"{endpoint}/api/models/{model_id}", f"cannot read model info ({_reason(e)})") from None
    if not info.sha:
        return ModelEntry(
            id=model_id,
            revision=listed_sha or "unresolved",
            source="",
            origin="hf-hub",
            problem="the hub reports no commit for this model",
        )
    gated = info.gated if info.gated else None
    weights, problem = _weights([s.rfilename for s in info.siblings or []])
    if problem is None and (gated or info.private):
        # The API call carries HF_TOKEN, but weightsmith's ranged HTTP reader does not.
        what = f"gated ({gated})" if gated else "private"
        problem = f"{what} repository: its files need a token"
    return ModelEntry(
        id=model_id,
        revision=info.sha,
        source=f"{endpoint}/{model_id}/resolve/{info.sha}/{quote(weights)}" if weights else "",
        origin="hf-hub",
        licence=_licence(info),
        gated=None if gated is None else str(gated),
        problem=problem,
        family=base_model_of(getattr(info, "card_data", None)),
    )


def base_model_of(card) -> str | None:
    """The `base_model` of model card data (a mapping or huggingface_hub's ModelCardData): the
    first one when it lists several, None when it names none."""
    value = card.get("base_model") if isinstance(card, dict) else getattr(card, "base_model", None)
    if isinstance(value, list):
        value = value[0] if value else None
    return str(value).strip() or None if value else None


def _weights(files: list[str]) -> tuple[str | None, str | None]:
    """(file to extract, None) or (None, why there is none); top-level files only."""
    top = [f for f in files if "/" not in f]
    if INDEX_NAME in top:
        return INDEX_NAME, None
    if "model.safetensors" in top:
        return "model.safetensors", None
    found = sorted(f for f in top if f.endswith(".safetensors"))
    if len(found) == 1:
        return found[0], None
    if found:
        return None, f"several .safetensors files and no {INDEX_NAME}: {', '.join(found[:3])}"
    return None, "no safetensors weights at the top of the repository"


def _licence(info) -> str | None:
    card = getattr(info, "card_data", None)
    licence = getattr(card, "license", None) if card is not None else None
    if licence:
        return str(licence)
    # The hub also lists the licence as a tag, for repositories whose card has none.
    tags = [t for t in info.tags or [] if t.startswith("license:")]
    return tags[0].removeprefix("license:") if tags else None


def _offline() -> bool:
    # The variable as it is now (huggingface_hub reads it once, when it is first imported).
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]
