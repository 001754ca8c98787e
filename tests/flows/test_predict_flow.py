"""The predict-layer flow: one Prefect task per fit (small same-role tensors packed), then sampling."""

from __future__ import annotations

import pytest

from weightsmith.demo import SIZES, build_gpt2
from weightsmith.extract import ExtractOptions, extract
from weightsmith.model import parse_model_url
from weightsmith_flows.predict import predict_layer

pytestmark = [pytest.mark.usefixtures("prefect_harness"), pytest.mark.slow]

TILE = {
    "tile": 16,
    "ae_channels": 8,
    "ae_train_steps": 5,
    "unet_train_steps": 5,
    "batch_size": 8,
    "block_out_channels": [8, 16],
    "sample_steps": 2,
}


def test_one_fit_task_per_pack_then_the_prediction(tmp_path):
    folder = build_gpt2(tmp_path / "gpt", *SIZES["tiny"])
    url = extract(str(folder), ExtractOptions(store=str(tmp_path / "store"), images="none")).model_url
    out = predict_layer(
        url,
        ["transformer.h.*.ln_1.*", "transformer.wpe.weight"],
        "tile-diffusion",
        config=TILE,
        device="cpu",
        images="none",
        pack_bytes=4096,  # the 256-byte LayerNorm vectors pack by role; wpe (16 KiB) stays alone
    )
    assert out["fits"]["count"] == 3 and out["fits"]["reused"] == 0  # ln_1.weight, ln_1.bias, wpe
    model = parse_model_url(url)
    facts = model.store.read_json(model.key("predictions", out["run_id"], "prediction.json"))
    entries = facts["tensors"]
    assert len(entries) == 5 and all(e["reused_state"] for e in entries.values())  # the tasks fitted them
    assert entries["transformer.h.0.ln_1.bias"]["fitted_with"] == [
        "transformer.h.0.ln_1.bias",
        "transformer.h.1.ln_1.bias",
    ]
    assert entries["transformer.wpe.weight"]["fitted_with"] == ["transformer.wpe.weight"]
