"""The planner's time model: predicted seconds per image of a placement, stage by stage. Pure; no torch.

    seconds = text encoder + denoise + VAE (decode, and encode for an input image) + transfers + casts

Each stage is its FLOPs (:mod:`zimage.timing`) over the GPU's bf16 rate (:class:`~zimage.timing.Throughput`, probed at
start or taken from a spec sheet) times an *efficiency*: the share of that rate the stage reaches in practice, its
launch and Python overhead folded in. The efficiencies were calibrated once from an NVIDIA H200
(``benchmarks/results/``; each constant names its file and row). Rates change from card to card; the shares are
assumed to carry over, and every GPU run checks them again (``benchmarks/gpu_profiles.py`` prints predicted stages
next to measured ones; tests/test_planner.py holds the model to the committed rows within 20%).

Transfers are priced at the rate of the memory they use:

* streamed copies (diffusers' group offloading with a CUDA stream: the text encoder of ``transformer-resident`` and
  ``group-offload``, the transformer of ``group-offload``) come from pinned host memory at
  :attr:`~zimage.timing.Throughput.h2d_gbps`, at a share that depends on the size of what is copied, and overlap the
  compute: the stage takes the longer of the two;
* ``model-offload`` moves each component in from pageable memory and back out into a new host tensor (accelerate's
  ``module.to``): :attr:`~zimage.timing.Throughput.pageable_gbps`, the probe's round-trip rate, without overlap;
* ``sequential-offload`` moves every layer synchronously at every use (priced at the same round-trip rate: an upper
  estimate).

Casts: weights stored in another dtype than they compute in cost device-memory traffic at every forward: fp8
storage's layerwise casting and a GGUF transformer's dequantization, each at its measured share of
:attr:`~zimage.timing.Throughput.memory_gbps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .peak_model import weight_bytes
from .sizes import DTYPE_BYTES, PIXELS_PER_TOKEN, ComponentSizes, RequestSize
from .timing import (
    PLANNED_CAPTION_TOKENS,
    TEXT_ENCODER_TOKENS,
    Throughput,
    dense_flops,
    transformer_flops_per_image,
    vae_decode_flops,
    vae_encode_flops,
)

# --- Efficiencies: share of the probed bf16 matmul rate each stage reaches (calibrated on an H200) ---------------
#: The text encoder (512 tokens, batch 1: small matmuls and launch overhead): 0.061 s resident for 3.72 TFLOP at
#: 743 TFLOP/s probed (gpu-nvidia-h200-2026-12-04-run3.json, "full": stages_s.encode_s).
EFF_TEXT_ENCODER = 0.082
#: The denoising loop: the transformer's FLOPs (at PLANNED_CAPTION_TOKENS) over the measured denoise stage, the
#: pipeline's scheduler and Python overhead included. Compiled: 0.773 s at 743 TFLOP/s (run3 "full": 0.788); eager:
#: 1.21 s at 720.9 TFLOP/s (run1 "full": 1.37 s per image less the encode and decode stages of run3: 0.519).
EFF_DENOISE_EAGER = 0.51
EFF_DENOISE_COMPILED = 0.78
#: The VAE (convolutions and one attention block at the latent size): the 1024x1024 decode, 10.5 TFLOP, took 0.093 s
#: (run3 "full" and "transformer-resident": stages_s.decode_s): 0.15.
EFF_VAE = 0.15
#: fp8 compute (torchao's float8 dynamic activation and weight quantization): how many times faster the transformer's
#: linear layers run than in bf16. ASSUMED, not measured yet (the spec sheets give 2x for dense fp8 on Ada and
#: Hopper; the dynamic quantization of the activations costs part of it); the auto planner does not pick fp8-compute
#: until a GPU run has measured it (zimage.planner.UNMEASURED_OPTIONS).
FP8_LINEAR_SPEEDUP = 1.5
#: Share of the pinned host-to-device rate that group offloading with a stream reaches, by what it copies: the text
#: encoder leaf by leaf (layers of 25-50 MB, the 0.78 GB embedding) moved 8.04 GB in 0.263 s, 30.6 GB/s against
#: 55.3 (run3 "transformer-resident": stages_s.encode_s); the transformer block by block (362 MB each) moved 98.5 GB in
#: 1.98 s, 49.7 GB/s against 55.1 (run1 "group-offload (streams)": 2.98 s less the encode and decode stages).
STREAM_EFFICIENCY_LEAF = 0.55
STREAM_EFFICIENCY_BLOCK = 0.90
#: Seconds each streamed transformer block adds per step when the copies hide under the compute: the offload hooks'
#: synchronization and Python (run1 "group-offload + fp8-storage (streams)": 2.68 s, 0.35 s above its compute and
#: casts, over 8 steps of 34 blocks).
STREAMED_BLOCK_OVERHEAD_S = 1.3e-3
#: Share of the GPU's memory bandwidth that layerwise casting (fp8 storage) reaches: +0.11 s for 295 GB of casts
#: (run1 "full + fp8-storage" against "full").
CAST_EFFICIENCY = 0.65
#: diffusers' GGUF dequantization runs several small kernels per layer from Python: +0.97 s per image on the H200
#: (run1 "transformer-resident [GGUF]" against the model's other stages), of which its 126 GB of memory traffic at
#: the casts' share is 0.05 s. The rest, 0.115 s per step, is launch and Python time: assumed to be the host's, the
#: same on any card (one measurement; the next runs on other cards will say).
DEQUANT_OVERHEAD_S_PER_STEP = 0.115
#: Share of the steps on which step-cache (pyramid attention broadcast, every second step) skips the attention
#: modules (projections and attention). ASSUMED from its schedule (it reuses the attention output of every second
#: step after the first), not measured yet.
STEP_CACHE_SKIPPED_STEP_SHARE = 0.5
#: Device bytes per weight that diffusers' layerwise casting moves at every forward of an fp8-stored layer: up to the
#: compute dtype before it (read 1 byte, write 2) and back to fp8 after it (read 2, write 1); diffusers 0.42.1
#: ``LayerwiseCastingHook.pre_forward``/``post_forward``. For bf16/fp16 compute (fp8 storage needs one of them).
LAYERWISE_CAST_BYTES_PER_WEIGHT = 2 * (1 + 2)


@dataclass(frozen=True)
class Workload:
    """What the time model needs of a request and the model: FLOPs of each stage (per request), the bytes of each
    component as stored, the share of the transformer's FLOPs in its linear layers (fp8 compute speeds those up) and
    in attention (step-cache skips part of those), and the device-memory traffic of casts."""

    text_encoder_flops: float
    transformer_flops: float
    transformer_linear_share: float
    transformer_attention_module_share: float
    vae_decode_flops: float
    vae_encode_flops: float
    text_encoder_bytes: int
    text_encoder_embedding_bytes: int  # its part outside the blocks (the token embedding)
    transformer_bytes: int
    transformer_blocks: int
    vae_bytes: int
    controlnet_bytes: int
    cast_bytes: int  # fp8 storage: read and written per request to turn stored weights into compute ones
    dequant_bytes: int  # a GGUF transformer's: the same for its dequantization
    prompts: int  # prompts encoded (2 with guidance)
    steps: int


@dataclass(frozen=True)
class StageSeconds:
    """Predicted seconds of one request, by stage. ``transfers`` are the copies not hidden under compute (model and
    sequential offload), ``casts`` the conversions of stored weights; neither is counted in another field."""

    encode: float
    denoise: float
    decode: float
    transfers: float
    casts: float

    @property
    def total(self) -> float:
        return self.encode + self.denoise + self.decode + self.transfers + self.casts

    def per_image(self, images: int) -> "StageSeconds":
        """The same request's stages divided among its ``images`` images."""
        return StageSeconds(self.encode / images, self.denoise / images, self.decode / images, self.transfers / images,
                            self.casts / images)

    def to_json(self) -> dict[str, float]:
        return {"encode_s": self.encode, "denoise_s": self.denoise, "decode_s": self.decode,
                "transfers_s": self.transfers, "casts_s": self.casts}


def transformer_shares(config: Mapping[str, Any] | None, width: int, height: int) -> tuple[float, float]:
    """(linear layers, attention modules) shares of a transformer block's FLOPs at this size: the linear layers are
    the q/k/v/o projections and the feed-forward (what fp8 compute speeds up); the attention modules are the
    projections and the attention itself (what step-cache skips on the steps it reuses). (0.9, 0.4) when the config
    is unknown."""
    if config is None:
        return 0.9, 0.4
    dim = config["dim"]
    hidden = int(dim / 3 * 8)
    tokens = (width // 16) * (height // 16) + PLANNED_CAPTION_TOKENS
    projections = 2 * tokens * 4 * dim * dim
    linear = projections + 2 * tokens * 3 * dim * hidden
    attention = 2 * 2 * tokens * tokens * dim
    return linear / (linear + attention), (projections + attention) / (linear + attention)


def bytes_moved_per_request(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                            dtype: str) -> int:
    """Weight bytes copied host-to-device for one request of ``request.num_images`` images (a new prompt: the
    prompt cache would spare the text encoder's share).

    ``full``/``balanced``/``cpu``: none. ``transformer-resident``: the text encoder once per prompt it encodes (the
    prompt, and the negative prompt with guidance). ``model-offload``: every component once (text encoder,
    transformer, VAE, and the ControlNet for its requests). ``group-offload``: the text encoder per prompt and the
    transformer (and a used ControlNet) at every step. ``sequential-offload``: as group offload plus the VAE.
    Raises ValueError for an unknown profile.
    """
    if profile in ("full", "balanced", "cpu"):
        return 0
    work = workload(options, sizes, request, dtype)
    if profile == "transformer-resident":
        return work.text_encoder_bytes * work.prompts
    if profile == "model-offload":
        return work.text_encoder_bytes + work.transformer_bytes + work.vae_bytes + work.controlnet_bytes
    if profile == "group-offload":
        return work.text_encoder_bytes * work.prompts + (work.transformer_bytes + work.controlnet_bytes) * work.steps
    if profile == "sequential-offload":
        return (work.text_encoder_bytes * work.prompts + (work.transformer_bytes + work.controlnet_bytes) * work.steps
                + work.vae_bytes * (2 if request.encode else 1))
    raise ValueError(f"unknown memory profile {profile!r}")


def cast_bytes_per_request(options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str) -> int:
    """Device memory bytes (read plus written) spent per request turning stored weights into the compute dtype: with
    ``fp8-storage`` :data:`LAYERWISE_CAST_BYTES_PER_WEIGHT` per transformer weight (and per ControlNet weight for its
    requests) at every step; with ``te-fp8-storage`` the same per text-encoder block weight per prompt encoded; a
    GGUF transformer's quantized bytes read and compute-dtype weights written at every step. One forward per step
    (guidance batches both prompts)."""
    work = workload(options, sizes, request, dtype)
    return work.cast_bytes + work.dequant_bytes


def workload(options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str) -> Workload:
    """The :class:`Workload` of ``request`` under ``options``: each stage's FLOPs, and the components' bytes as they
    are stored and copied (fp8 storage halves the transformer's and ControlNet's, te-fp8-storage the text encoder's
    blocks, fp8 compute the transformer's; a GGUF transformer is its file's)."""
    dtype_bytes = DTYPE_BYTES[dtype]
    batch = request.num_images * (2 if request.guidance else 1)
    prompts = 2 if request.guidance else 1
    config = sizes.transformer_config
    tokens = math.ceil(request.pixels / PIXELS_PER_TOKEN) + PLANNED_CAPTION_TOKENS
    if config is not None:
        transformer = transformer_flops_per_image(config, request.width, request.height, request.steps,
                                                  PLANNED_CAPTION_TOKENS)
        blocks = config["n_layers"] + 2 * config["n_refiner_layers"]
    else:
        transformer = dense_flops(sizes.transformer.params, tokens) * request.steps
        blocks = max(1, sizes.transformer.params // max(1, sizes.transformer.largest_block_params))
    transformer *= batch
    if request.controlnet and sizes.controlnet is not None:
        transformer += dense_flops(sizes.controlnet.params, tokens) * request.steps * batch
    linear, attention = transformer_shares(config, request.width, request.height)
    stats = sizes.text_encoder
    fp8 = "fp8-storage" in options
    quantized = sizes.transformer.stored_bytes is not None
    transformer_bytes = (sizes.transformer.stored_bytes if quantized
                         else sizes.transformer.params * (1 if fp8 or "fp8-compute" in options else dtype_bytes))
    cast = 0
    if fp8:
        cast += sizes.transformer.params * LAYERWISE_CAST_BYTES_PER_WEIGHT * request.steps
        if request.controlnet and sizes.controlnet is not None:
            cast += sizes.controlnet.params * LAYERWISE_CAST_BYTES_PER_WEIGHT * request.steps
    if "te-fp8-storage" in options:
        cast += (stats.params - stats.non_block_params) * LAYERWISE_CAST_BYTES_PER_WEIGHT * prompts
    dequant = (sizes.transformer.stored_bytes + sizes.transformer.params * dtype_bytes) * request.steps if quantized \
        else 0
    return Workload(
        text_encoder_flops=dense_flops(stats.params - stats.non_block_params, TEXT_ENCODER_TOKENS) * prompts,
        transformer_flops=transformer, transformer_linear_share=linear, transformer_attention_module_share=attention,
        vae_decode_flops=vae_decode_flops(request.pixels) * request.num_images,
        vae_encode_flops=vae_encode_flops(request.pixels) * request.num_images if request.encode else 0.0,
        text_encoder_bytes=(stats.params * dtype_bytes if "te-fp8-storage" not in options
                            else stats.params - stats.non_block_params + stats.non_block_params * dtype_bytes),
        text_encoder_embedding_bytes=stats.non_block_params * dtype_bytes,
        transformer_bytes=transformer_bytes, transformer_blocks=int(blocks),
        vae_bytes=weight_bytes(sizes.vae, dtype_bytes),
        controlnet_bytes=(sizes.controlnet.params * (1 if fp8 else dtype_bytes)
                          if request.controlnet and sizes.controlnet is not None else 0),
        cast_bytes=cast, dequant_bytes=dequant, prompts=prompts, steps=request.steps)


def stage_seconds(profile: str, options: tuple[str, ...], work: Workload, throughput: Throughput, *,
                  compiled: bool, text_encoder_offload: str = "leaf_level") -> StageSeconds:
    """Predicted seconds of one request of ``work`` under ``profile`` and ``options`` (see the module docstring).

    ``compiled``: the transformer's blocks are compiled (:attr:`~zimage.planner.MemoryPlan.compiled`);
    ``text_encoder_offload``: how the loader streams the text encoder ("leaf_level"; "block_level" before
    2026-12-04, which moved its embedding through pageable memory). Raises ValueError for an unknown profile."""
    rate = throughput.bf16_tflops * 1e12
    pinned = throughput.h2d_gbps * 1e9
    pageable = throughput.pageable_gbps * 1e9
    encode_compute = work.text_encoder_flops / (rate * EFF_TEXT_ENCODER)
    linear = work.transformer_linear_share
    shaped = work.transformer_flops * ((1 - linear) + linear / (FP8_LINEAR_SPEEDUP if "fp8-compute" in options else 1))
    if "step-cache" in options:  # the attention modules' work on the steps that reuse their output
        shaped -= (work.transformer_flops * work.transformer_attention_module_share * STEP_CACHE_SKIPPED_STEP_SHARE
                   / (FP8_LINEAR_SPEEDUP if "fp8-compute" in options else 1))
    denoise_compute = shaped / (rate * (EFF_DENOISE_COMPILED if compiled else EFF_DENOISE_EAGER))
    decode = (work.vae_decode_flops + work.vae_encode_flops) / (rate * EFF_VAE)
    memory = throughput.memory_gbps * 1e9
    casts = (work.cast_bytes + work.dequant_bytes) / (memory * CAST_EFFICIENCY)
    if work.dequant_bytes:
        casts += DEQUANT_OVERHEAD_S_PER_STEP * work.steps

    def streamed_encoder() -> float:
        if text_encoder_offload == "leaf_level":
            copy = work.text_encoder_bytes / (pinned * STREAM_EFFICIENCY_LEAF)
        else:  # the embedding in and out through pageable memory, the blocks streamed
            blocks = work.text_encoder_bytes - work.text_encoder_embedding_bytes
            copy = work.text_encoder_embedding_bytes / pageable + blocks / (pinned * STREAM_EFFICIENCY_BLOCK)
        return max(encode_compute, copy) * work.prompts

    transfers = 0.0
    if profile in ("full", "balanced", "cpu"):
        encode, denoise = encode_compute, denoise_compute
    elif profile == "transformer-resident":
        encode, denoise = streamed_encoder(), denoise_compute
    elif profile == "group-offload":
        encode = streamed_encoder()
        copy = (work.transformer_bytes + work.controlnet_bytes) * work.steps / (pinned * STREAM_EFFICIENCY_BLOCK)
        hooks = STREAMED_BLOCK_OVERHEAD_S * work.transformer_blocks * work.steps
        # Casts run on the compute side: they hide under the copies only as far as the compute does.
        denoise = max(denoise_compute + hooks + casts, copy)
        casts = 0.0
    elif profile == "model-offload":
        encode, denoise = encode_compute, denoise_compute
        # Each component in and out once per request, through pageable memory.
        transfers = (work.text_encoder_bytes + work.transformer_bytes + work.controlnet_bytes
                     + work.vae_bytes) / pageable
    elif profile == "sequential-offload":
        # Every layer at every use, synchronously: priced at the round-trip rate (an upper estimate: accelerate
        # drops a layer instead of copying it back).
        encode = encode_compute + work.text_encoder_bytes * work.prompts / pageable
        denoise = denoise_compute
        transfers = ((work.transformer_bytes + work.controlnet_bytes) * work.steps + work.vae_bytes) / pageable
    else:
        raise ValueError(f"unknown memory profile {profile!r}")
    return StageSeconds(encode=encode, denoise=denoise, decode=decode, transfers=transfers, casts=casts)


def predict_stages(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str,
                   throughput: Throughput, compiled: bool = False,
                   text_encoder_offload: str = "leaf_level") -> StageSeconds:
    """Predicted seconds of one request under ``profile`` and ``options``, by stage. An estimate for ranking
    placements and for telling users what to expect; benchmarks/gpu_profiles.py prints it next to the measurement."""
    return stage_seconds(profile, options, workload(options, sizes, request, dtype), throughput, compiled=compiled,
                         text_encoder_offload=text_encoder_offload)


def predict_seconds(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str,
                    throughput: Throughput, compiled: bool = False) -> float:
    """Predicted seconds per image of ``request`` under ``profile``: :func:`predict_stages`' total divided by the
    images of the request."""
    return predict_stages(profile, options, sizes, request, dtype, throughput, compiled).total / request.num_images
