"""Pipeline loader: find the model, build the pipeline in the plan's dtype, apply the plan.

:func:`apply_plan` is the thin adapter between a :class:`~zimage.planner.MemoryPlan` and diffusers'
own placement calls (``.to``, ``enable_model_cpu_offload``, ``enable_group_offload``,
``enable_sequential_cpu_offload``, ``enable_layerwise_casting``, ``vae.enable_tiling``). It never
calls an offload API for a CPU plan: diffusers needs an accelerator for those.

The ControlNet (``--controlnet``) is loaded beside the pipeline (:func:`load_controlnet`) and placed in two
steps, because diffusers' ControlNet pipelines attach the transformer's embedders and refiner blocks to it
(``ZImageControlNetModel.from_transformer``) when they are built:

* at load, on the ControlNet alone: fp8 storage (``enable_layerwise_casting``; after the attachment it would
  meet the transformer's own casting hooks and raise), and ``.to(device)`` for ``full``/``balanced``/``cpu``;
* once a ControlNet pipeline is built over the loaded components (:func:`place_mode_pipeline`), group offload:
  ``enable_group_offload`` on the ControlNet (block level, one block at a time, no stream: its control blocks
  are offloaded like the transformer's; the transformer's blocks it borrows keep the transformer's hooks, and
  the small modules it calls outside the transformer's forward (timestep and patch embedders, pad tokens) join
  its own top-level group, so they are on the GPU when it runs). Sequential offload cannot carry a ControlNet in
  diffusers 0.42.1 (:data:`SEQUENTIAL_CONTROLNET`): its requests are refused there, and the out-of-memory
  ladder skips that rung for them;
* model offload: around each ControlNet denoise (:func:`denoise_placement`), not with diffusers' hooks. accelerate's
  ``CpuOffload`` hook skips moving a model whose *first* parameter is already on the GPU, and the transformer's
  first parameter (``x_pad_token``) is one the ControlNet borrows: the ControlNet runs first at every step, its hook
  moves it (and the borrowed modules) to the GPU, and the transformer's hook then leaves its 30 main layers in RAM
  (``mat1 is on cuda:0, different from other tensors on cpu``, seen on an H200, tests/test_gpu.py). So for that
  stage the hooks are removed and the denoiser (transformer, ControlNet, and the VAE that encodes the control image)
  is moved to the GPU as one, the text encoder back to RAM; afterwards the ControlNet goes back to RAM and the base
  pipeline's model offload is enabled again, which moves the rest there too.

Everything else survives building a mode pipeline from ``base.components``: accelerate's and diffusers' hooks
and fp8 storage live on the module objects, which the mode pipelines share (checked on the CPU in
tests/test_controlnet.py).
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from .demo_model import DEMO_CONTROLNET_DIRNAME, demo_model_path, ensure_demo_model
from .errors import ModelNotFoundError, first_line
from .model_family import ModelDefaults, defaults_for, detect_family
from .model_files import controlnet_stats, find_local_model_folder, looks_like_local_path, sizes_for
from .planner import (
    PUBLISHED_CONTROLNET,
    PUBLISHED_CONTROLNET_HINTS,
    VAE_TILE_PX,
    ComponentSizes,
    DeviceFacts,
    MemoryPlan,
    PlanError,
    RequestSize,
    plan_memory,
    with_controlnet,
)
from .settings import Settings

log = logging.getLogger(__name__)

OFFLOAD_PROFILES = ("transformer-resident", "model-offload", "group-offload", "sequential-offload")
#: Module name patterns the text encoder's fp8 storage leaves in the compute dtype (``apply_layerwise_casting``'s
#: ``skip_modules_pattern``, regular expressions searched in the module names): Qwen3's token embedding
#: (``embed_tokens``, an nn.Embedding the casting would otherwise store in fp8) and every norm (``input_layernorm``,
#: ``post_attention_layernorm``, ``q_norm``, ``k_norm``, the final ``norm``: RMSNorms, which diffusers' casting
#: does not touch anyway; named so that a later diffusers that does still keeps them in bf16). diffusers' own
#: default patterns (``pos_embed``, ``patch_embed``, ``norm``, ``proj_in``, ``proj_out``) are written for its
#: transformers and would miss ``embed_tokens``.
TEXT_ENCODER_FP8_SKIP_PATTERNS = ("embed_tokens", "norm")


@dataclass(frozen=True)
class ModelSource:
    """What will be loaded: the argument given to ``from_pretrained`` and a label for metadata."""

    pretrained: str  # hub id or folder
    label: str  # "demo (random weights)" or the id/path the user gave
    folder: Path | None  # local folder when the weights are on this machine
    is_demo: bool = False
    #: A GGUF transformer loaded instead of the folder's (--transformer-file); the rest comes from ``pretrained``.
    transformer_file: Path | None = None


def resolve_model_source(settings: Settings) -> ModelSource:
    """Decide where the weights come from; build the demo model when asked for it. A ``--transformer-file`` that
    does not exist is a :class:`ModelNotFoundError`."""
    source = _resolve_model_source(settings)
    if settings.transformer_file is None:
        return source
    from .gguf_files import gguf_file_problem

    path = Path(settings.transformer_file).expanduser()
    problem = gguf_file_problem(path)
    if problem:
        raise ModelNotFoundError(problem)
    return replace(source, transformer_file=path, label=f"{source.label} + {path.name}")


def _resolve_model_source(settings: Settings) -> ModelSource:
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


def component_sizes(source: ModelSource, controlnet: ControlNetSource | None = None) -> ComponentSizes:
    """Sizes for the planner: from the safetensors headers when on disk, else published sizes; with the
    ControlNet's own weights when one is configured (its files' headers, else the published Union 2.1 size)."""
    sizes = sizes_for(source.pretrained, source.folder)
    if source.transformer_file is not None:
        from .gguf_files import gguf_transformer_stats, mismatch_problem

        try:
            stats = gguf_transformer_stats(source.transformer_file)
        except ValueError as exc:
            raise ModelNotFoundError(f"--transformer-file {source.transformer_file.name!r} cannot be read: {exc}") from exc
        problem = mismatch_problem(stats, sizes.transformer, source.transformer_file.name,
                                   f"{source.label.split(' + ')[0]} ({sizes.source})")
        if problem:
            raise ModelNotFoundError(problem)
        sizes = replace(sizes, transformer=replace(stats, hidden_size=sizes.transformer.hidden_size),
                                  source=f"{sizes.source}; transformer: GGUF header of {source.transformer_file.name}")
    if controlnet is None:
        return sizes
    if controlnet.local is not None:
        try:
            stats, hints = controlnet_stats(controlnet.local)
            return with_controlnet(sizes, stats, hints, f"safetensors headers of {controlnet.local.name}")
        except (OSError, ValueError, KeyError):
            pass
    return with_controlnet(sizes, PUBLISHED_CONTROLNET, PUBLISHED_CONTROLNET_HINTS,
                           "published size of the Z-Image-Turbo Fun ControlNet Union 2.1 (the largest)")


# --- Model family: the request defaults --------------------------------------------------------------------

def model_defaults(settings: Settings, source: ModelSource | None = None) -> ModelDefaults:
    """The request defaults of the configured model (:mod:`zimage.model_family`), from ``--model-family``, the
    ``shift`` in its ``scheduler/scheduler_config.json`` when the folder is on this machine, then its name.

    Never downloads and never fails: an unreadable config only means the name decides.
    """
    if source is not None:
        folder, name = source.folder, (source.label if not source.is_demo else "demo")
    elif settings.demo:
        folder, name = demo_model_path(settings.data_dir), "demo"
    else:
        folder, name = find_local_model_folder(settings.model), settings.model
    family, reason = detect_family(settings.model_family, name, _scheduler_shift(folder))
    return defaults_for(family, reason)


def _scheduler_shift(folder: Path | None) -> float | None:
    if folder is None:
        return None
    try:
        config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        return float(config["shift"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --- ControlNet -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ControlNetSource:
    """Where the ControlNet comes from: a local folder or file, a hub repository, or one file of a hub repository
    (``owner/name/FILE.safetensors``); ``local`` is set when its weights are on this machine (sizes are read there)."""

    pretrained: str
    label: str
    local: Path | None
    is_demo: bool = False


def resolve_controlnet_source(settings: Settings, model: ModelSource | None = None) -> ControlNetSource | None:
    """The configured ControlNet, or None. Never downloads; raises :class:`ModelNotFoundError` for a local path
    that does not exist or holds no weights."""
    choice = settings.controlnet_choice
    if not choice:
        return None
    if choice == "demo":
        folder = (model.folder if model is not None and model.folder is not None
                  else demo_model_path(settings.data_dir)) / DEMO_CONTROLNET_DIRNAME
        return ControlNetSource(str(folder), "demo ControlNet (random weights)", folder, is_demo=True)
    path = Path(choice).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not any(path.glob("*.safetensors")):
            raise ModelNotFoundError(_controlnet_message(choice, "the folder has neither a config.json nor a "
                                                                 ".safetensors file"))
        return ControlNetSource(str(path), choice, path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ModelNotFoundError(_controlnet_message(choice, "a ControlNet checkpoint must be a .safetensors file"))
        return ControlNetSource(str(path), choice, path)
    if _HUB_FILE.match(choice) is None and looks_like_local_path(choice):
        raise ModelNotFoundError(_controlnet_message(choice, "no such file or folder"))
    cached = find_local_model_folder(choice.rsplit("/", 1)[0] if _HUB_FILE.match(choice) else choice)
    if cached is not None and _HUB_FILE.match(choice):
        cached = cached / choice.rsplit("/", 1)[1] if (cached / choice.rsplit("/", 1)[1]).is_file() else None
    elif cached is not None and not any(cached.glob("*.safetensors")):
        cached = None  # only its json files are cached
    return ControlNetSource(choice, choice, cached)


#: ``owner/name/FILE.safetensors``: one checkpoint of a hub repository holding several (alibaba-pai publishes
#: the Union ControlNets as single files, some repositories with several versions).
_HUB_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/[^/]+\.safetensors$")


def choose_controlnet_file(files: list[str], repo: str) -> str | None:
    """What to load from a hub repository listing ``files``: None for a diffusers model folder (``config.json``
    at its root: ``from_pretrained``), else its one top-level ``.safetensors`` checkpoint (``from_single_file``).

    Raises :class:`ModelNotFoundError` naming the checkpoints when there are several, or none.
    """
    if "config.json" in files:
        return None
    checkpoints = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if len(checkpoints) == 1:
        return checkpoints[0]
    if not checkpoints:
        raise ModelNotFoundError(_controlnet_message(repo, "the repository has neither a config.json nor a "
                                                           ".safetensors checkpoint at its root"))
    shown = ", ".join(checkpoints[:8]) + (", ..." if len(checkpoints) > 8 else "")
    raise ModelNotFoundError(f"ControlNet {repo!r} holds several checkpoints ({shown}): pick one with --controlnet "
                             f"{repo}/<file>, e.g. --controlnet {repo}/{checkpoints[-1]}.")


def _controlnet_message(controlnet: str, cause: str) -> str:
    return (f"ControlNet {controlnet!r} could not be loaded ({cause}). Give a diffusers folder (config.json and "
            "weights), a .safetensors checkpoint, or a hub id such as "
            "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1 (or owner/name/FILE.safetensors); --controlnet none "
            "runs without one.")


def load_controlnet(source: ControlNetSource, plan: MemoryPlan, pipe: Any) -> Any:
    """Load the ControlNet in the plan's dtype and do the placement that must happen before a pipeline attaches
    the transformer's modules to it (see the module docstring); the offload profiles follow in
    :func:`place_mode_pipeline`.

    diffusers documents two forms: ``ZImageControlNetModel.from_single_file`` for alibaba-pai's published
    checkpoints (one ``.safetensors`` file; diffusers fetches the matching config from the hub the first time,
    hlky/Z-Image-Turbo-Fun-Controlnet-Union-*), and ``from_pretrained`` for a diffusers folder (the demo's).
    Raises :class:`ModelNotFoundError` with the cause when it cannot be loaded.
    """
    import torch
    from diffusers import ZImageControlNetModel

    dtype = torch_dtype(plan.dtype)
    try:
        kind, where = _controlnet_location(source)
        if kind == "single_file":
            controlnet = ZImageControlNetModel.from_single_file(where, dtype=dtype)
        else:
            controlnet = ZImageControlNetModel.from_pretrained(where, dtype=dtype)
    except ModelNotFoundError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(_controlnet_message(source.label, first_line(exc, 300))) from exc
    in_channels, control_in = pipe.transformer.config.in_channels, controlnet.config.control_in_dim
    if control_in < in_channels:
        raise ModelNotFoundError(_controlnet_message(source.label, f"its control input has {control_in} channels, "
                                                                   f"fewer than the model's {in_channels} latent ones"))
    if "fp8-storage" in plan.options:
        controlnet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    if plan.profile in ("full", "balanced", "cpu", "transformer-resident"):
        # Beside the transformer, wherever the plan put it (one GPU, one of several, the CPU): it feeds the
        # transformer and borrows its modules.
        controlnet.to(pipe.transformer.device)
    log.info("ControlNet %s loaded (%s)", source.label, plan.describe())
    return controlnet


def _controlnet_location(source: ControlNetSource) -> tuple[str, str]:
    """(how, where): ("pretrained", folder or hub id) or ("single_file", checkpoint path) for ``source``;
    downloads a hub checkpoint (into the Hugging Face cache)."""
    local = Path(source.pretrained).expanduser()
    if local.is_file():
        return "single_file", str(local)
    if local.is_dir():
        if (local / "config.json").is_file():
            return "pretrained", str(local)
        checkpoints = sorted(local.glob("*.safetensors"))
        if len(checkpoints) != 1:
            raise ModelNotFoundError(f"ControlNet folder {source.label!r} has {len(checkpoints)} .safetensors "
                                     "checkpoints and no config.json: give the path of the one to load.")
        return "single_file", str(checkpoints[0])
    from huggingface_hub import hf_hub_download

    if _HUB_FILE.match(source.pretrained):
        repo, filename = source.pretrained.rsplit("/", 1)
        return "single_file", hf_hub_download(repo, filename)
    filename = choose_controlnet_file(_repo_files(source.pretrained), source.pretrained)
    if filename is None:
        return "pretrained", source.pretrained
    return "single_file", hf_hub_download(source.pretrained, filename)


def _repo_files(repo: str) -> list[str]:
    """The files of a hub repository: from the hub, or from the local cache when offline."""
    from huggingface_hub import list_repo_files

    try:
        return list_repo_files(repo)
    except Exception:  # noqa: BLE001 - offline or unreachable: what the cache holds is the answer
        folder = find_local_model_folder(repo)
        if folder is None:
            raise ModelNotFoundError(_controlnet_message(repo, "not on this machine and the hub cannot be reached: "
                                                               "download it first with `hf download`")) from None
        return [str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()]


#: Why ControlNet requests cannot run under sequential offload (checked here on the CPU, where the call itself fails).
SEQUENTIAL_CONTROLNET = (
    "the ControlNet cannot run on the sequential-offload placement: diffusers 0.42.1's enable_sequential_cpu_offload "
    "fails on a Z-Image ControlNet pipeline (the ControlNet shares the transformer's modules, which the transformer's "
    "offload has already moved to the meta device: 'Cannot copy out of meta tensor'). Use a GPU with more free "
    "memory, a smaller size, or --memory-profile group-offload.")


def place_mode_pipeline(pipe: Any, plan: MemoryPlan) -> None:
    """Place a ControlNet pipeline just built over the loaded components, for the offload profiles (see the
    module docstring). Nothing to do for ``full``/``balanced``/``cpu``/``transformer-resident``:
    :func:`load_controlnet` placed it; nor for ``model-offload``, placed around each denoise
    (:func:`denoise_placement`). Raises :class:`PlanError` for ``sequential-offload`` (:data:`SEQUENTIAL_CONTROLNET`).
    """
    import torch

    if plan.profile == "sequential-offload":
        raise PlanError(SEQUENTIAL_CONTROLNET)
    elif plan.profile == "group-offload":
        pipe.controlnet.enable_group_offload(onload_device=torch.device(plan.device),
                                             offload_device=torch.device("cpu"), offload_type="block_level",
                                             num_blocks_per_group=1, use_stream=False)


@contextmanager
def denoise_placement(pipe: Any, base: Any, plan: MemoryPlan) -> Iterator[None]:
    """Around a ControlNet pipeline's denoise under ``model-offload``: the transformer, the ControlNet and the VAE on
    ``plan.device`` together and the text encoder in RAM, without diffusers' offload hooks (which cannot move a
    transformer whose modules the ControlNet borrows: see the module docstring); afterwards the ControlNet back in
    RAM and the base pipeline's model offload enabled again (it moves the other components to RAM). A no-op for any
    other pipeline or placement. The peak is the planner's for that stage (zimage.planner.predict_peak_bytes).

    With step-cache, the cache's state starts empty for every denoise (:func:`reset_step_cache`)."""
    if "step-cache" in plan.options:
        reset_step_cache(pipe.transformer)
    if plan.profile != "model-offload" or getattr(pipe, "controlnet", None) is None:
        yield
        return
    pipe.remove_all_hooks()  # diffusers' public call: the hooks come off the shared modules (and the ControlNet)
    pipe.text_encoder.to("cpu")
    for module in (pipe.transformer, pipe.controlnet, pipe.vae):
        module.to(plan.device)
    try:
        yield
    finally:
        pipe.controlnet.to("cpu")
        base.enable_model_cpu_offload(device=plan.device)


def plan_for(settings: Settings, devices: DeviceFacts, sizes: ComponentSizes,
             request: RequestSize = RequestSize()) -> MemoryPlan:
    """Run the planner with this deployment's settings."""
    return plan_memory(devices, sizes, request, requested_profile=settings.memory_profile,
                       forced_options=settings.memory_options, dtype=settings.dtype, device=settings.device,
                       reserve_bytes=settings.reserve_mb * 1024 * 1024, auto_fp8=settings.auto_fp8,
                       compile_mode=settings.compile)


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
    if source.transformer_file is not None:
        from .gguf_files import load_gguf_transformer

        try:
            kwargs["transformer"] = load_gguf_transformer(source.transformer_file, source.pretrained,
                                                          torch_dtype(plan.dtype))
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(f"--transformer-file {source.transformer_file.name!r} could not be loaded as a "
                                     f"Z-Image transformer: {first_line(exc, 300)}. Give the GGUF file made from "
                                     "this model's transformer.") from exc
    if plan.profile == "balanced":
        # Whole components spread over the GPUs, each limited to its usable memory.
        kwargs["device_map"] = "balanced"
        kwargs["max_memory"] = {index: plan.budget_bytes for index in plan.gpu_indices}
    try:
        pipe = ZImagePipeline.from_pretrained(source.pretrained, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(_not_found_message(source.label, first_line(exc, 300))) from exc
    apply_plan(pipe, plan)
    pipe.set_progress_bar_config(disable=True)  # the service reports progress itself
    return pipe


def apply_plan(pipe: Any, plan: MemoryPlan) -> None:
    """Place an already loaded pipeline as ``plan`` says, with diffusers' own calls."""
    import torch

    if plan.profile in OFFLOAD_PROFILES and plan.device == "cpu":
        raise PlanError(f"{plan.profile} needs a CUDA GPU; this plan is for the CPU. Use --memory-profile auto.")
    if "fp8-storage" in plan.options:
        # Before placement: the offload hooks then move the fp8 weights (half the bytes).
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                  compute_dtype=torch_dtype(plan.dtype))
    if "te-fp8-storage" in plan.options:
        store_text_encoder_in_fp8(pipe, plan.dtype)
    if "fp8-compute" in plan.options:
        quantize_transformer_fp8(pipe, plan.device)
    if "step-cache" in plan.options:
        enable_step_cache(pipe)
    apply_in_place_options(pipe, plan.options)
    if plan.profile in ("full", "cpu"):
        pipe.to(plan.device)
    elif plan.profile == "transformer-resident":
        place_transformer_resident(pipe, plan.device, plan.use_streams)
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


def store_text_encoder_in_fp8(pipe: Any, dtype: str) -> None:
    """te-fp8-storage: the text encoder's linear layers stored in float8 (e4m3) and cast to ``dtype`` ("bf16" or
    "fp16") one layer at a time while it runs; its token embedding and norms stay in ``dtype``
    (:data:`TEXT_ENCODER_FP8_SKIP_PATTERNS`). transformers models have no ``enable_layerwise_casting``, so this is
    diffusers' public ``diffusers.hooks.apply_layerwise_casting`` on the module. Call it before any offloading."""
    import torch
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(pipe.text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch_dtype(dtype),
                            skip_modules_pattern=TEXT_ENCODER_FP8_SKIP_PATTERNS)


#: torchao's float8 recipe for fp8 compute: dynamic (per token) activation scales and per-row weight scales, the
#: torchao and diffusers documentation's recommendation for diffusion transformers on fp8 tensor cores.
def quantize_transformer_fp8(pipe: Any, device: str) -> None:
    """fp8-compute: torchao's ``Float8DynamicActivationFloat8WeightConfig`` (row-wise scales) on the transformer's
    linear layers, with torchao's public ``quantize_``. Each layer is moved to ``device`` and quantized there
    (``device=``), so the bf16 transformer is never on the GPU whole: the peak is the float8 weights plus one bf16
    layer. Call before placement. Raises ImportError without torchao (the planner refuses that plan before)."""
    import torch
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(pipe.transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              device=torch.device(device))


#: Pyramid attention broadcast for step-cache: the attention output of a step is reused by the next one
#: (``spatial_attention_block_skip_range=2``) at every step after the first (the whole timestep range); the main
#: layers only (the refiners are cheap). diffusers 0.42.1's FirstBlockCache and MagCache fail on Z-Image's block
#: signature ("Parameter 'hidden_states' not found"), TaylorSeer needs a cache context the Z-Image pipelines do not
#: set ("No cache context is set"): pyramid attention broadcast is the step cache that runs on it
#: (tests/test_speed_options.py).
STEP_CACHE_SKIP_RANGE = 2
STEP_CACHE_TIMESTEPS = (0, 1000)


def enable_step_cache(pipe: Any) -> None:
    """step-cache: diffusers' ``apply_pyramid_attention_broadcast`` on the transformer's main layers. Its timestep is
    read from the scheduler's public ``step_index`` and ``timesteps`` (the Z-Image pipelines do not report one); the
    mode pipelines share the scheduler, so it serves them all."""
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    scheduler = pipe.scheduler

    def current_timestep() -> float:
        index = scheduler.step_index or 0
        return float(scheduler.timesteps[min(index, len(scheduler.timesteps) - 1)])

    apply_pyramid_attention_broadcast(pipe.transformer, PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=STEP_CACHE_SKIP_RANGE,
        spatial_attention_timestep_skip_range=STEP_CACHE_TIMESTEPS,
        spatial_attention_block_identifiers=(r"^layers\.\d+\.",), current_timestep_callback=current_timestep))


def reset_step_cache(transformer: Any) -> None:
    """Empty the step cache's state (diffusers' public ``HookRegistry.reset_stateful_hooks``): pyramid attention
    broadcast counts the forwards it has seen and keeps the last attention output, and the Z-Image pipelines never
    reset it; without this a request's image would depend on the step counts of the requests before it."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks(recurse=True)


def place_transformer_resident(pipe: Any, device: str, use_streams: bool) -> None:
    """``transformer-resident``: the transformer and the VAE (and anything else but the text encoder) move to
    ``device`` for good; the text encoder stays in RAM and is group-offloaded, block by block, per prompt.

    Why group offload (``diffusers.hooks.apply_group_offloading`` on the text encoder alone, see
    :func:`stream_text_encoder`) rather than model offload of that one component
    (accelerate's ``cpu_offload_with_hook``): model offload moves the whole encoder in before it runs, 8 GB in bf16,
    next to the resident 12.3 GB transformer, so its peak is that of ``full`` and nothing is saved. Group offload
    holds only a layer or two of the encoder on the GPU, and with the stream the copy of the next one overlaps the
    current one's compute; both copy the same 8 GB per prompt (the planner counts it:
    zimage.planner.bytes_moved_per_request), and the prompt cache skips it for a repeated prompt.

    diffusers then reports the group's onload device as the pipeline's execution device, so latents and
    embeddings are made on ``device``. ``use_streams`` needs CUDA; with ``device="cpu"`` (tests) it must be False.
    """
    import torch
    from diffusers.hooks import apply_group_offloading

    for name, component in pipe.components.items():
        if name != "text_encoder" and isinstance(component, torch.nn.Module):
            component.to(device)
    stream_text_encoder(pipe, device, use_streams)


def stream_text_encoder(pipe: Any, device: str, use_streams: bool) -> None:
    """The text encoder group-offloaded at leaf level (each linear layer and the token embedding its own group),
    prefetched on a CUDA stream when ``use_streams``.

    Why leaf level: block level leaves the encoder's token embedding (389M parameters, 0.78 GB in bf16) in the
    top-level group, which diffusers moves without the stream, from and back into pageable memory, at every prompt.
    Measured on an H200 (gpu-mechanisms-nvidia-h200-2026-12-04.json, text_encoder): 512 tokens took 0.905 s streamed
    at block level and 0.198 s at leaf level (0.055 s resident): 8.9 against 40.7 GB/s."""
    import torch
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.text_encoder, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="leaf_level", use_stream=use_streams)


def enable_group_offload(pipe: Any, device: str, use_streams: bool) -> None:
    """Group offloading: the transformer block by block (its embedders and final layer, 1 MB, in the top-level
    group), the text encoder layer by layer (:func:`stream_text_encoder`), both prefetched on a CUDA stream when
    ``use_streams``; the small VAE stays on ``device``."""
    import torch
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(pipe.transformer, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=use_streams)
    stream_text_encoder(pipe, device, use_streams)
    pipe.vae.to(device)


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

