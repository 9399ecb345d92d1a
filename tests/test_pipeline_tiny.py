"""Facts about the real diffusers classes that the service relies on, checked on the demo model."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from zimage.demo_model import demo_model_path, ensure_demo_model


@pytest.fixture(scope="module")
def pipe(data_dir: Path):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(demo_model_path(data_dir), dtype=torch.bfloat16)


def test_demo_model_is_the_real_architecture(pipe) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    assert isinstance(pipe, ZImagePipeline)
    assert isinstance(pipe.transformer, ZImageTransformer2DModel)
    assert isinstance(pipe.text_encoder, Qwen3Model)
    assert isinstance(pipe.vae, AutoencoderKL) and pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8  # as the real Flux VAE
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    text = pipe.tokenizer.apply_chat_template([{"role": "user", "content": "一只猫"}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\n一只猫<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("steps", [8, 9])
def test_n_steps_run_n_transformer_forwards_and_callbacks(pipe, steps: int) -> None:
    """Why the default is 8: the model card's 9 steps run 9 forwards in diffusers 0.42.1."""
    forwards = []
    hook = pipe.transformer.register_forward_hook(lambda *args: forwards.append(1))
    callbacks = []
    try:
        pipe(prompt="a cat", width=256, height=256, num_inference_steps=steps, guidance_scale=0.0,
             callback_on_step_end=lambda p, i, t, kw: (callbacks.append(i), kw)[1], output_type="np")
    finally:
        hook.remove()
    assert len(forwards) == steps and callbacks == list(range(steps))


def test_demo_model_generates_1024(pipe) -> None:
    images = pipe(prompt="a cat", width=1024, height=1024, num_inference_steps=1, guidance_scale=0.0,
                  output_type="np").images
    assert images.shape == (1, 1024, 1024, 3) and not np.isnan(images).any()


def test_demo_build_is_cached_and_safe_to_race(tmp_path: Path) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_demo_model(tmp_path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [demo_model_path(tmp_path)] * 2
    assert (results[0] / "model_index.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [results[0].name]  # no staging folders left
    mtime = (results[0] / "model_index.json").stat().st_mtime
    ensure_demo_model(tmp_path)
    assert (results[0] / "model_index.json").stat().st_mtime == mtime  # reused, not rebuilt
