"""Tests for the `img2img` generator (weightsmith.generators.img2img).

The pipeline is a real `StableDiffusionImg2ImgPipeline`, tiny and randomly initialised from
config (weightsmith.demo.tiny_pipelines) and saved in a temporary folder; the tensor is a real
Stable Diffusion UNet LoRA weight. A random VAE does not reproduce its input, so the tests
check the plumbing (shapes, seeds, chunks, exactness of the float path, errors), not quality.
Everything runs on CPU with the network shut: HF_HUB_OFFLINE is set and sockets refuse to
connect.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.vae import Decoder, Encoder
from safetensors.numpy import load_file

from weightsmith.codec import chunk_region, decode, encode, from_image, to_image
from weightsmith.demo.tiny_pipelines import build_tiny_img2img
from weightsmith.errors import WeightsmithError
from weightsmith.generators import Examples, SampleSpec, State, get
from weightsmith.generators.img2img import PIXELS, Img2Img

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = "safetensors/diffusers_sd_pokemon_lora.safetensors"
NAME = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora.down.weight"
SIZE = 32  # tile edge: the (4, 128) tensor is one row of 4 tiles
FAST = {"image_size": SIZE, "steps": 2, "strength": 0.5, "batch_size": 16}  # one step per tile


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach a network: HF_HUB_OFFLINE, and sockets that refuse to connect."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(self: socket.socket, address: object) -> None:
        raise AssertionError(f"img2img tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_img2img(tmp_path_factory.mktemp("tiny-sd"), image_size=SIZE))


@pytest.fixture(scope="module")
def tensor(fixtures_dir: Path) -> np.ndarray:
    # (4, 128): the first 128 columns of a (4, 320) LoRA weight; few tiles keep the CPU run short
    return np.ascontiguousarray(load_file(fixtures_dir / LORA)[NAME][:, :128])


@pytest.fixture(scope="module")
def gen() -> Img2Img:
    return Img2Img(device="cpu")  # one instance: its pipeline is loaded once for the module


@pytest.fixture(scope="module")
def state(gen: Img2Img, model_dir: str, tensor: np.ndarray) -> State:
    return gen.fit(Examples.stack(NAME, [tensor]), {"model_dir": model_dir, **FAST})


def test_registered() -> None:
    assert get("img2img") is Img2Img


def test_fit_keeps_the_tensor_and_its_layout(state: State, tensor: np.ndarray) -> None:
    np.testing.assert_array_equal(state.arrays["source"], tensor)
    assert state.info["layout"] == encode(tensor, SIZE).layout.to_dict()
    assert state.config["strength"] == 0.5 and state.config["dtype"] == "float32"


def test_sample_shape_and_seeds(gen: Img2Img, state: State, tensor: np.ndarray) -> None:
    spec = SampleSpec(tensor.shape)
    first = gen.sample(state, 2, spec, seed=3)
    assert first.devices == ["cpu", "cpu"] and first.seed == 3
    for a in first.arrays:
        assert a.shape == tensor.shape and a.dtype == np.float32 and np.isfinite(a).all()
    assert not np.array_equal(first.arrays[0], first.arrays[1])

    # same seed: the same arrays, also from a fresh instance that loads the pipeline again;
    # sample i does not depend on n
    again = Img2Img().sample(state, 1, spec, seed=3)
    np.testing.assert_array_equal(again.arrays[0], first.arrays[0])
    other = gen.sample(state, 1, spec, seed=4)
    assert not np.array_equal(other.arrays[0], first.arrays[0])


@pytest.fixture
def vae_io() -> Iterator[dict[str, list[torch.Tensor]]]:
    """What every VAE encoder gets and every VAE decoder returns while the fixture is active."""
    seen: dict[str, list[torch.Tensor]] = {"encoder_in": [], "decoder_out": []}

    def hook(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, Encoder):
            seen["encoder_in"].append(args[0].detach().clone())
        elif isinstance(module, Decoder):
            seen["decoder_out"].append(output.detach().clone())

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_float_path_is_exact(
    gen: Img2Img, model_dir: str, tensor: np.ndarray, vae_io: dict[str, list[torch.Tensor]]
) -> None:
    """The VAE sees the codec's pixels bit for bit, and the sample is exactly its decoded output.

    Nothing on the way is quantised, clipped, resized or renormalised: one outlier puts
    pixels far outside [-1, 1] (the default image processor would then take the batch for
    [-1, 1] pixels, or for [0, 1] pixels without it, and its output step would clamp).
    """
    spiky = tensor.copy()
    spiky[0, 0] = 50 * np.abs(tensor).max()
    state = gen.fit(Examples.stack(NAME, [spiky]), {"model_dir": model_dir, **FAST})
    result = gen.sample(state, 1, SampleSpec(spiky.shape), seed=0)
    encoded = encode(spiky, SIZE)

    seen_in = torch.cat(vae_io["encoder_in"]).numpy()  # one encode per tile: (4, 3, t, t)
    np.testing.assert_array_equal(seen_in, to_image(encoded.tiles, PIXELS))
    assert seen_in.max() > 10 and seen_in.min() < -0.5

    out = torch.cat(vae_io["decoder_out"]).numpy()  # (4, 3, t, t), as the VAE decoded it
    assert out.min() < -1 or out.max() > 1  # so a clamp anywhere would show
    np.testing.assert_array_equal(result.arrays[0], decode(encoded.layout, from_image(out, PIXELS)))


def test_chunk_runs_only_its_tiles(
    gen: Img2Img, state: State, tensor: np.ndarray, vae_io: dict[str, list[torch.Tensor]]
) -> None:
    chunk = chunk_region(tensor.shape, chunk_bytes=40 * 4, offset=50)  # row 0, columns 50-89
    result = gen.sample(state, 1, SampleSpec(tensor.shape, chunk), seed=0)
    (values,) = result.arrays
    assert values.shape == (40,) and values.dtype == np.float32 and np.isfinite(values).all()
    assert len(vae_io["encoder_in"]) == 2  # tiles 1 and 2 hold columns 32-95; 0 and 3 not run


def test_fit_uses_the_first_checkpoint(gen: Img2Img, model_dir: str, tensor: np.ndarray) -> None:
    zoo = Examples.stack(NAME, [tensor, 2 * tensor])
    state = gen.fit(zoo, {"model_dir": model_dir, **FAST})
    np.testing.assert_array_equal(state.arrays["source"], tensor)


def test_missing_pipeline_is_a_clear_error(gen: Img2Img, tensor: np.ndarray, tmp_path: Path, state: State) -> None:
    examples = Examples.stack(NAME, [tensor])
    for folder in (tmp_path / "nowhere", tmp_path):  # missing, and a folder without a pipeline
        with pytest.raises(WeightsmithError, match="model_index.json missing") as err:
            gen.fit(examples, {"model_dir": str(folder), **FAST})
        assert err.value.where == str(folder)

    # a state whose folder has gone since the fit
    moved = State(**{**state.__dict__, "config": {**state.config, "model_dir": str(tmp_path)}})
    with pytest.raises(WeightsmithError, match="never downloads"):
        Img2Img().sample(moved, 1, SampleSpec(tensor.shape), seed=0)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"strength": 0.01, "steps": 10}, "below one denoising step"),
        ({"strength": 0}, "greater than 0"),
        ({"image_size": 36}, "multiple of 8"),
        ({"dtype": "bfloat16"}, "float32"),
    ],
)
def test_bad_config(gen: Img2Img, model_dir: str, tensor: np.ndarray, options: dict, match: str) -> None:
    with pytest.raises(WeightsmithError, match=match):
        gen.fit(Examples.stack(NAME, [tensor]), {"model_dir": model_dir, **options})


def test_float16_needs_cuda(gen: Img2Img, model_dir: str, tensor: np.ndarray) -> None:
    state = gen.fit(Examples.stack(NAME, [tensor]), {"model_dir": model_dir, "dtype": "float16"})
    with pytest.raises(WeightsmithError, match="float16 needs a CUDA device"):
        gen.sample(state, 1, SampleSpec(tensor.shape), seed=0)
