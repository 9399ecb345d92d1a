"""Pipeline loader: find the model, build the pipeline in the plan's dtype, apply the plan.

:func:`apply_plan` is the thin adapter between a :class:`~zimage.planner.MemoryPlan` and diffusers'
own placement calls (``.to``, ``enable_model_cpu_offload``, ``enable_group_offload``,
``enable_sequential_cpu_offload``, ``enable_layerwise_casting``, ``vae.enable_tiling``). It never
calls an offload API for a CPU plan: diffusers needs an accelerator for those.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_model import ensure_demo_model
from .errors import ModelNotFoundError
from .model_files import find_local_model_folder, looks_like_local_path, sizes_for
from .planner import (
    VAE_TILE_PX,
    ComponentSizes,
    DeviceFacts,
    MemoryPlan,
    PlanError,
    RequestSize,
    plan_memory,
)
from .settings import Settings

log = logging.getLogger(__name__)

OFFLOAD_PROFILES = ("model-offload", "group-offload", "sequential-offload")


@dataclass(frozen=True)
class ModelSource:
    """What will be loaded: the argument given to ``from_pretrained`` and a label for metadata."""

    pretrained: str  # hub id or folder
    label: str  # "demo (random weights)" or the id/path the user gave
    folder: Path | None  # local folder when the weights are on this machine
    is_demo: bool = False


def resolve_model_source(settings: Settings) -> ModelSource:
    """Decide where the weights come from; build the demo model when asked for it."""
    if settings.demo:
        folder = ensure_demo_model(settings.data_dir)
        return ModelSource(str(folder), "demo (random weights)", folder, is_demo=True)
    folder = find_local_model_folder(settings.model)
    if folder is None and looks_like_local_path(settings.model):
        raise ModelNotFoundError(_not_found_message(settings.model, "no such folder"))
    if folder is not None and not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(_not_found_message(settings.model, "the folder has no model_index.json, so "
                                                    "it is not a diffusers pipeline folder"))
    return ModelSource(str(folder) if folder is not None and Path(settings.model).expanduser().is_dir()
                       else settings.model, settings.model, folder)


def _not_found_message(model: str, cause: str) -> str:
    return (f"Model {model!r} could not be loaded ({cause}). Either download it first "
            f"(`hf download Tongyi-MAI/Z-Image-Turbo`, or copy the folder to this machine and pass its path "
            f"with --model), or run with --demo to try the service on the built-in demo model.")


def component_sizes(source: ModelSource) -> ComponentSizes:
    """Sizes for the planner: from the safetensors headers when on disk, else published sizes."""
    return sizes_for(source.pretrained, source.folder)


def plan_for(settings: Settings, devices: DeviceFacts, sizes: ComponentSizes,
             request: RequestSize = RequestSize()) -> MemoryPlan:
    """Run the planner with this deployment's settings."""
    return plan_memory(devices, sizes, request, requested_profile=settings.memory_profile,
                       forced_options=settings.memory_options, dtype=settings.dtype, device=settings.device,
                       reserve_bytes=settings.reserve_mb * 1024 * 1024, auto_fp8=settings.auto_fp8)


def torch_dtype(name: str) -> Any:
    """The torch dtype for "bf16" / "fp16" / "fp32"."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_pipeline(source: ModelSource, plan: MemoryPlan) -> Any:
    """Load ``ZImagePipeline`` from ``source`` in the plan's dtype and apply the plan.

    Raises :class:`ModelNotFoundError` with a clear message when the model cannot be found.
    """
    from diffusers import ZImagePipeline

    kwargs: dict[str, Any] = {"dtype": torch_dtype(plan.dtype)}
    if plan.profile == "balanced":
        # Whole components spread over the GPUs, each limited to its usable memory.
        kwargs["device_map"] = "balanced"
        kwargs["max_memory"] = {index: plan.budget_bytes for index in plan.gpu_indices}
    try:
        pipe = ZImagePipeline.from_pretrained(source.pretrained, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(source.label, _first_line(exc))) from exc
    apply_plan(pipe, plan)
    pipe.set_progress_bar_config(disable=True)  # the service reports progress itself
    return pipe


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def apply_plan(pipe: Any, plan: MemoryPlan) -> None:
    """Place an already loaded pipeline as ``plan`` says, with diffusers' own calls."""
    import torch

    if plan.profile in OFFLOAD_PROFILES and plan.device == "cpu":
        raise PlanError(f"{plan.profile} needs a CUDA GPU; this plan is for the CPU. Use --memory-profile auto.")
    if "fp8-storage" in plan.options:
        # Before placement: the offload hooks then move the fp8 weights (half the bytes).
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                  compute_dtype=torch_dtype(plan.dtype))
    apply_in_place_options(pipe, plan.options)
    if plan.profile in ("full", "cpu"):
        pipe.to(plan.device)
    elif plan.profile == "balanced":
        pass  # placed by device_map at load time
    elif plan.profile == "model-offload":
        pipe.enable_model_cpu_offload(device=plan.device)
    elif plan.profile == "group-offload":
        enable_group_offload(pipe, plan.device, plan.use_streams)
    elif plan.profile == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    else:
        raise PlanError(f"unknown memory profile {plan.profile!r}")
    log.info("memory plan applied: %s", plan.describe())


def enable_group_offload(pipe: Any, device: str, use_streams: bool) -> None:
    """Block-level group offloading of the text encoder and transformer; the small VAE stays put."""
    import torch

    pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                              offload_type="block_level", num_blocks_per_group=1, use_stream=use_streams,
                              exclude_modules=["vae"])


def apply_in_place_options(pipe: Any, options: tuple[str, ...]) -> None:
    """Options that can be switched on in a loaded, placed pipeline without reloading it."""
    if "attention-slicing" in options:
        pipe.enable_attention_slicing()
    if "vae-tiling" in options:
        pipe.vae.enable_tiling()
        # The Flux VAE's own tile is 1024 px, which leaves a 1024x1024 decode untiled: use 512 px tiles.
        pipe.vae.tile_sample_min_size = min(VAE_TILE_PX, pipe.vae.tile_sample_min_size)
        pipe.vae.tile_latent_min_size = pipe.vae.tile_sample_min_size // 8


def set_vae_tiling(pipe: Any, enabled: bool) -> None:
    """Turn VAE tiling on or off in a loaded pipeline: a per-request measure, so it must also turn off."""
    if enabled:
        apply_in_place_options(pipe, ("vae-tiling",))
    elif getattr(pipe.vae, "use_tiling", False):
        pipe.vae.disable_tiling()

