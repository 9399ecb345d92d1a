"""Loader: model resolution, plan application (fakes for GPU-only calls, real calls on CPU where they work)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import RecordingPipeline
from zimage.errors import ModelNotFoundError
from zimage.loader import (
    apply_plan,
    component_sizes,
    enable_group_offload,
    load_pipeline,
    resolve_model_source,
)
from zimage.model_files import read_component_sizes
from zimage.planner import PUBLISHED_SIZES, MemoryPlan, PlanError, hypothetical_devices, plan_memory
from zimage.settings import Settings


def gpu_plan(profile: str, options: tuple[str, ...] = (), **kw) -> MemoryPlan:
    return MemoryPlan(profile=profile, options=options, device="cuda:0", dtype="bf16", predicted_peak_bytes=1,
                      budget_bytes=2, reason="test", gpu_indices=(0,), **kw)


@pytest.mark.parametrize(
    ("plan", "expected"),
    [
        (gpu_plan("full"), [("to", "cuda:0")]),
        (gpu_plan("model-offload"), [("enable_model_cpu_offload", {"device": "cuda:0"})]),
        (gpu_plan("sequential-offload"), [("enable_sequential_cpu_offload", {"device": "cuda:0"})]),
        (gpu_plan("balanced"), []),
    ],
)
def test_each_profile_makes_the_diffusers_call(plan: MemoryPlan, expected: list) -> None:
    pipe = RecordingPipeline()
    apply_plan(pipe, plan)
    assert pipe.calls == expected


def _recorded_group_offloading(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A demo pipeline, the image it makes before any placement, and the list diffusers' real
    ``apply_group_offloading`` calls are recorded into (module, kwargs)."""
    import diffusers.hooks
    from diffusers import ZImagePipeline

    from zimage.demo_model import demo_model_path

    folder = demo_model_path(data_dir)
    reference = _generate(ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16))
    calls: list = []
    real = diffusers.hooks.apply_group_offloading

    def spy(module, **kwargs):  # the real call, recorded
        calls.append((module, kwargs))
        return real(module, **kwargs)

    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", spy)
    return ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16), reference, calls


def test_group_offload_streams_the_transformer_by_block_and_the_text_encoder_by_layer(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage.loader import enable_group_offload

    pipe, reference, calls = _recorded_group_offloading(data_dir, monkeypatch)
    enable_group_offload(pipe, "cpu", use_streams=False)  # streams need CUDA; the CPU is the onload device
    (transformer, t_kwargs), (text_encoder, e_kwargs) = calls
    assert transformer is pipe.transformer and text_encoder is pipe.text_encoder  # the small VAE stays put
    assert (t_kwargs["offload_type"], t_kwargs["num_blocks_per_group"], t_kwargs["use_stream"]) == ("block_level", 1,
                                                                                                      False)
    assert (e_kwargs["offload_type"], e_kwargs["use_stream"]) == ("leaf_level", False)
    assert t_kwargs["onload_device"] == torch.device("cpu") and t_kwargs["offload_device"] == torch.device("cpu")
    assert np.array_equal(_generate(pipe), reference)  # same math, only placement hooks


def test_options_are_applied_before_placement() -> None:
    pipe = RecordingPipeline()
    apply_plan(pipe, gpu_plan("model-offload", ("fp8-storage", "vae-tiling", "attention-slicing")))
    assert pipe.names() == ["transformer.enable_layerwise_casting", "enable_attention_slicing",
                            "vae.enable_tiling", "enable_model_cpu_offload"]
    casting = pipe.calls[0][1]
    assert casting == {"storage_dtype": torch.float8_e4m3fn, "compute_dtype": torch.bfloat16}
    # 512 px tiles: the Flux VAE's own 1024 px tile would leave a 1024x1024 decode untiled.
    assert (pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size) == (512, 64)


@pytest.mark.parametrize("profile", ["model-offload", "group-offload", "sequential-offload"])
def test_no_offload_call_for_a_cpu_plan(profile: str) -> None:
    pipe = RecordingPipeline()
    with pytest.raises(PlanError, match="needs a CUDA GPU"):
        apply_plan(pipe, replace(gpu_plan(profile), device="cpu"))
    assert pipe.calls == []


# --- Model resolution ----------------------------------------------------------------------------

def test_demo_source_and_header_sizes_match_the_loaded_model(demo_settings: Settings) -> None:
    source = resolve_model_source(demo_settings)
    assert source.is_demo and source.label == "demo (random weights)"
    sizes = component_sizes(source)
    assert sizes.source.startswith("safetensors headers")
    pipe = load_pipeline(source, plan_memory(hypothetical_devices(0), sizes))
    for name in ("transformer", "text_encoder", "vae"):
        counted = sum(p.numel() for p in getattr(pipe, name).parameters())
        assert getattr(sizes, name).params == counted, name
    assert sizes.transformer.hidden_size == 32 and sizes.text_encoder.hidden_size == 16


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_source(Settings(model=str(tmp_path / "nope")))
    message = str(info.value)
    assert "nope" in message and "no such folder" in message
    assert "hf download" in message and "--demo" in message


def test_folder_that_is_not_a_pipeline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        resolve_model_source(Settings(model=str(tmp_path)))


def test_uncached_hub_id_without_network_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = Settings(model="Tongyi-MAI/Z-Image-Turbo")
    source = resolve_model_source(settings)
    assert source.folder is None and component_sizes(source) is PUBLISHED_SIZES
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(source, plan_memory(hypothetical_devices(0), PUBLISHED_SIZES))
    assert "Tongyi-MAI/Z-Image-Turbo" in str(info.value) and "--demo" in str(info.value)


def test_local_folder_loads_through_the_real_path(data_dir: Path) -> None:
    from zimage.demo_model import demo_model_path

    folder = demo_model_path(data_dir)
    source = resolve_model_source(Settings(model=str(folder)))
    assert not source.is_demo and source.folder == folder
    assert read_component_sizes(folder).total_params == component_sizes(source).total_params


# --- Real memory features on the tiny model, on the CPU -----------------------------------------

def _generate(pipe, size: int = 256) -> np.ndarray:
    out = pipe(prompt="a cat", width=size, height=size, num_inference_steps=2, guidance_scale=0.0,
               generator=torch.Generator().manual_seed(1), output_type="np")
    return out.images


def test_real_group_offload_and_fp8_storage_on_cpu(data_dir: Path) -> None:
    from zimage.demo_model import demo_model_path
    from diffusers import ZImagePipeline

    folder = demo_model_path(data_dir)
    reference = _generate(ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16))

    offloaded = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    enable_group_offload(offloaded, "cpu", use_streams=False)
    assert np.array_equal(_generate(offloaded), reference)  # same math, only placement hooks

    fp8 = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    bf16_cpu = hypothetical_devices(0, cpu_bf16=True)  # fp8 storage computes in bf16
    apply_plan(fp8, replace(plan_memory(bf16_cpu, PUBLISHED_SIZES), options=("fp8-storage",)))
    weight = fp8.transformer.layers[0].attention.to_q.weight
    assert weight.dtype == torch.float8_e4m3fn  # stored in fp8 ...
    images = _generate(fp8)
    assert not np.isnan(images).any() and images.shape == reference.shape  # ... and still computes


def test_real_fp8_storage_under_group_offload_on_cpu(data_dir: Path) -> None:
    """group-offload + fp8-storage, which the planner picks where streaming fp8 weights is worth it: the casting is
    applied first (the loader's order), then the group offload hooks move the fp8 weights; both hooks work together
    and give the same pixels as fp8 storage alone."""
    from zimage.demo_model import demo_model_path
    from diffusers import ZImagePipeline

    folder = demo_model_path(data_dir)
    bf16_cpu = hypothetical_devices(0, cpu_bf16=True)
    fp8_plan = replace(plan_memory(bf16_cpu, PUBLISHED_SIZES), options=("fp8-storage",))
    fp8_only = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    apply_plan(fp8_only, fp8_plan)
    reference = _generate(fp8_only)
    both = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    apply_plan(both, fp8_plan)
    enable_group_offload(both, "cpu", use_streams=False)
    assert both.transformer.layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    images = _generate(both)
    assert not np.isnan(images).any() and np.array_equal(images, reference)


def test_real_vae_tiling_decodes_large_images_on_cpu(data_dir: Path) -> None:
    from zimage.demo_model import demo_model_path
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(demo_model_path(data_dir), dtype=torch.bfloat16)
    apply_plan(pipe, replace(plan_memory(hypothetical_devices(0), PUBLISHED_SIZES), options=("vae-tiling",)))
    assert pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == 512
    images = _generate(pipe, size=768)  # larger than one 512 px tile
    assert images.shape == (1, 768, 768, 3) and not np.isnan(images).any()


# --- transformer-resident and te-fp8-storage, real calls on the CPU --------------------------------------

def test_transformer_resident_streams_only_the_text_encoder(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zimage.loader import place_transformer_resident

    pipe, reference, calls = _recorded_group_offloading(data_dir, monkeypatch)
    place_transformer_resident(pipe, "cpu", use_streams=False)  # streams need CUDA; the CPU is the onload device
    ((module, kwargs),) = calls
    assert module is pipe.text_encoder  # only the text encoder is offloaded
    # Leaf level: block level would move the 0.78 GB token embedding through pageable memory at every prompt
    # (0.905 s against 0.198 s per prompt on an H200, zimage.loader.stream_text_encoder).
    assert (kwargs["offload_type"], kwargs["use_stream"]) == ("leaf_level", False)
    forwards = []
    pipe.text_encoder.register_forward_hook(lambda *a: forwards.append(1))
    assert np.array_equal(_generate(pipe), reference)  # same math, only placement hooks
    assert forwards == [1]


def test_transformer_resident_on_a_gpu_plan_uses_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    import zimage.loader as loader

    placed = []
    monkeypatch.setattr(loader, "place_transformer_resident", lambda pipe, device, streams: placed.append((device, streams)))
    pipe = RecordingPipeline()
    apply_plan(pipe, gpu_plan("transformer-resident", use_streams=True))
    assert placed == [("cuda:0", True)] and pipe.calls == []
    with pytest.raises(PlanError, match="needs a CUDA GPU"):
        apply_plan(pipe, replace(gpu_plan("transformer-resident"), device="cpu"))


def test_text_encoder_fp8_storage_keeps_embedding_and_norms_in_bf16(data_dir: Path) -> None:
    from diffusers import ZImagePipeline

    from zimage.demo_model import demo_model_path
    from zimage.loader import place_transformer_resident

    folder = demo_model_path(data_dir)
    reference = _generate(ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16))
    pipe = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    bf16_cpu = hypothetical_devices(0, cpu_bf16=True)
    apply_plan(pipe, replace(plan_memory(bf16_cpu, PUBLISHED_SIZES), options=("te-fp8-storage",)))
    encoder = pipe.text_encoder
    assert encoder.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
    assert encoder.embed_tokens.weight.dtype == torch.bfloat16
    assert encoder.norm.weight.dtype == torch.bfloat16
    assert encoder.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert pipe.transformer.layers[0].attention.to_q.weight.dtype == torch.bfloat16  # the transformer is untouched
    images = _generate(pipe)
    assert not np.isnan(images).any() and images.shape == reference.shape
    # With the text encoder streamed as well (the two hooks on the same layers).
    both = ZImagePipeline.from_pretrained(folder, dtype=torch.bfloat16)
    from zimage.loader import store_text_encoder_in_fp8

    store_text_encoder_in_fp8(both, "bf16")
    place_transformer_resident(both, "cpu", use_streams=False)
    assert np.array_equal(_generate(both), images)
