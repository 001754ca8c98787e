"""Our merges of a tiny Llama zoo against mergekit's on the same members (mergekit 0.1.5, the
optional extra `merge`): `task-arithmetic` and `ties` over every tensor of the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from weightsmith.extract import ExtractOptions, extract
from weightsmith.generators import Examples, SampleSpec, get
from weightsmith.store import Store
from weightsmith.zoo import read_zoo, read_zoo_base, read_zoo_tensor
from weightsmith.zoo.build import ZooOptions, build_zoo

pytest.importorskip("mergekit", reason="mergekit is not installed (optional extra: pip install '.[merge]')")

pytestmark = pytest.mark.usefixtures("one_thread", "state_in_tmp")
K = 3


def llama_family(folder: Path) -> list[Path]:
    """A tiny random Llama (the base) and K fine-tunes of it (the base plus small noise)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(K + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + (0.02 * torch.randn_like(p) if i else 0))
        path = folder / ("base" if i == 0 else f"tuned{i}")
        model.save_pretrained(path)
        paths.append(path)
    return paths


def mergekit_merge(method: str, paths: list[Path], out: Path, parameters: dict, shared: dict) -> dict[str, np.ndarray]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(paths[0]),
            "models": [{"model": str(p), "parameters": parameters} for p in paths[1:]],
            "parameters": shared,
            "dtype": "float32",
        }
    )
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize(
    "generator, config, method, parameters, shared",
    [
        ("task-arithmetic", {"scale": 0.5}, "task_arithmetic", {"weight": 0.5}, {}),
        ("ties", {"density": 0.2}, "ties", {"weight": 1.0, "density": 0.2}, {}),
        ("ties", {"density": 0.5}, "ties", {"weight": 1.0, "density": 0.5}, {}),
    ],
    ids=["task-arithmetic", "ties-0.2", "ties-0.5"],
)
def test_our_merges_match_mergekit(
    tmp_path: Path, generator: str, config: dict, method: str, parameters: dict, shared: dict
) -> None:
    paths = llama_family(tmp_path / "models")
    store = str(tmp_path / "store")
    urls = [
        extract(str(p / "model.safetensors"), ExtractOptions(store=store, name=p.name, images="none")).model_url
        for p in paths
    ]
    build_zoo(ZooOptions(zoo_id="family", models=tuple(urls[1:]), base=urls[0]))
    theirs = mergekit_merge(method, paths, tmp_path / "merged", parameters, shared)
    names = list(read_zoo(Store(store), "family")["tensors"])
    assert set(theirs) == set(names)
    gen = get(generator)()
    for name in names:
        examples = Examples(
            name, read_zoo_tensor(Store(store), "family", name), base=read_zoo_base(Store(store), "family", name)
        )
        ours = gen.sample(gen.fit(examples, config), 1, SampleSpec(examples.shape), seed=0).arrays[0]
        np.testing.assert_allclose(ours, theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.abs(ours - examples.base).max() > 1e-3, name  # the merge moved away from the base
