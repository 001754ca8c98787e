"""Randomly initialised Stable Diffusion img2img pipelines, built from config on local disk.

The `img2img` generator loads a diffusers pipeline from a folder and never downloads. These
builders make such folders without a network: every model is constructed from its config
class with random weights, and the CLIP tokenizer is a byte-level BPE vocabulary written
here (the 256 byte symbols, as words' inner and last symbols, plus the two specials).

- `build_tiny_img2img`: a pipeline of a few hundred thousand parameters, for tests.
- `build_sd15_like`: Stable Diffusion 1.5's architecture and sizes (about 1.07 billion
  parameters, about 4.3 GB as float32), so benchmarks do the real model's compute.

Both save with `save_pretrained`, so `StableDiffusionImg2ImgPipeline.from_pretrained(folder,
local_files_only=True)` loads them back.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"  # also CLIP's padding and unknown token, as in Stable Diffusion 1.x
MAX_TOKENS = 77  # CLIP's context length

# Stable Diffusion 1.5's noise schedule (its scheduler_config.json), with DDIM's sampler
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def build_tiny_img2img(folder: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion img2img pipeline saved in `folder`, for tests.

    Args:
        folder: where to save (created; existing files are overwritten).
        image_size: the image edge the configs advertise (a multiple of 8); the pipeline
            also runs at other multiples of 8.
        seed: seed of the random weights.

    Returns:
        `folder`.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,  # the VAE below halves the image once
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=image_size,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )
    text = {
        "vocab_size": 1000,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    return _save(folder, unet, vae, text)


def build_sd15_like(folder: Path, seed: int = 0) -> Path:
    """A random pipeline with Stable Diffusion 1.5's architecture and sizes, for benchmarks.

    The UNet, VAE and text encoder have the real model's configs (860M, 84M and 123M
    parameters), so a step costs what it costs with the real weights. Takes about a minute
    and 4.3 GB of disk (float32); never used by the tests.

    Args:
        folder: where to save (created; existing files are overwritten).
        seed: seed of the random weights.

    Returns:
        `folder`.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    }
    return _save(folder, unet, vae, text)


def _save(folder: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text: dict) -> Path:
    """Add a CLIP text model (`text`: CLIPTextConfig arguments), a byte-level tokenizer and a
    DDIM scheduler, and save the pipeline in `folder`."""
    folder = Path(folder)
    tokenizer = _byte_tokenizer(folder / "tokenizer")
    assert text["vocab_size"] >= len(tokenizer), (text["vocab_size"], len(tokenizer))
    text_config = CLIPTextConfig(
        **text,
        max_position_embeddings=MAX_TOKENS,
        # the tokenizer's special ids, not CLIP's: the text model pools at the EOS token
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def _byte_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is the bytes alone (no merges), written to `folder`.

    CLIP's BPE marks a word's last symbol with "</w>", so each byte symbol appears twice:
    ids 0-255 inside a word, 256-511 at its end; then BOS (512) and EOS (513).
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte 0-255, in byte order (as CLIP's BPE uses)."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    extra = iter(range(256, 512))  # unprintable bytes map to code points from 256 on
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
