"""The memory planner: a pure function from (device facts, component sizes, request size) to a plan.

Nothing here touches a GPU, a file or the environment, so every decision is testable as a table.

Profiles, fastest first (each is a documented placement, applied by :mod:`zimage.loader` with
diffusers' own calls):

========================  ==================================================================
``full``                  every component on one GPU. Fastest; needs all weights + activations.
``balanced``              diffusers ``device_map="balanced"``: whole components spread over
                          several GPUs, no transfers during a generation.
``transformer-resident``  the transformer and the VAE stay on the GPU; the text encoder lives in RAM
                          and is streamed block by block for each prompt (diffusers'
                          ``apply_group_offloading`` on the text encoder alone). Needs the
                          transformer + VAE + two text-encoder blocks; moves the encoder per prompt.
``model-offload``         ``enable_model_cpu_offload``: weights live in RAM, each component
                          (text encoder, transformer, VAE) moves to the GPU while it runs.
                          Needs the largest component + its activations.
``group-offload``         ``enable_group_offload(block_level, 1 block per group)``: the
                          transformer and text encoder move one block at a time, prefetched on
                          a CUDA stream; the small VAE stays on the GPU.
``sequential-offload``    ``enable_sequential_cpu_offload``: one layer at a time. Least memory,
                          by far the slowest.
``cpu``                   no accelerator: everything on the CPU (the demo model and tests; the
                          real model takes tens of minutes per image on a CPU).
========================  ==================================================================

Options: ``vae-tiling`` (decode in 512 px tiles: the VAE's activations stop growing with the
image), ``fp8-storage`` (transformer and ControlNet weights stored in float8, computed in bf16: half
their memory, a slight quality change), ``te-fp8-storage`` (the text encoder's linear layers stored in
float8, its token embedding and norms kept in bf16), ``attention-slicing`` (accepted for users who ask
for it; measured as no change for this model, so the planner never relies on it).

A configured ControlNet (:attr:`ComponentSizes.controlnet`) counts where it lives: resident beside the
transformer under ``full``/``balanced``, on the GPU only for its own requests under the offload profiles
(:attr:`RequestSize.controlnet`). Requests with an input image (:attr:`RequestSize.encode`) add the VAE's
encode of it as a stage of its own.

Each candidate gets a predicted peak (:func:`predict_peak_bytes`) and predicted seconds per image
(:func:`predict_seconds`: FLOPs over the GPU's bf16 rate, plus the bytes it moves host-to-device per image over the
link's bandwidth, plus the bytes cast on the GPU for weights stored in fp8 or GGUF over its memory bandwidth;
:mod:`zimage.timing`). The auto planner takes the fastest candidate whose peak fits the GPU's free memory minus the
reserve, with one rule for lossy options (``fp8-storage``, ``te-fp8-storage``): each has to earn its place.
Starting from the fastest lossless candidate, the fastest with at most one more lossy option replaces the choice
only when it is predicted more than :data:`TIME_TIE_SHARE` faster than it (the time model is not more precise than
that), or when nothing with fewer fits; so a lossy choice is more than that share faster than every lossless
candidate that fits.
``auto_fp8=False`` (and fp32, where fp8 storage cannot compute) forbids lossy options. So the choice is never
more than :data:`TIME_TIE_SHARE` slower than the fastest that fits, and more memory never gives a placement
predicted slower by more than that share (none slower without lossy options).

The activation constants below are estimates from the model's shapes, not yet measurements: the
GPU benchmark (``benchmarks/gpu_profiles.py``) measures the real peaks to replace them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from .timing import (
    PLANNED_CAPTION_TOKENS,
    TEXT_ENCODER_TOKENS,
    Throughput,
    dense_flops,
    transformer_flops_per_image,
)

GIB = 1024**3
MIB = 1024**2

PROFILES_FASTEST_FIRST = ("full", "balanced", "transformer-resident", "model-offload", "group-offload",
                          "sequential-offload")
#: A lossy option must make a placement predicted faster than this share to be chosen over one without it: the time
#: model's own error is about this size (its target is 10%), so a smaller gain is no reason to change pixels.
TIME_TIE_SHARE = 0.05
#: Options that change pixels.
LOSSY_OPTIONS = ("fp8-storage", "te-fp8-storage")
#: Steps the time model assumes when a request does not say (Turbo's default).
PLANNED_STEPS = 8
#: The rates used when neither a probe nor a card name gave any (assumed: a mid-range PCIe 4.0 card). The choice
#: between single-GPU placements barely depends on them: their compute is the same and they differ in bytes moved.
DEFAULT_THROUGHPUT = Throughput(bf16_tflops=70.0, h2d_gbps=25.0, memory_gbps=400.0,
                                source="assumed (no probe, no --gpu-name): 70 TFLOP/s bf16, 25 GB/s host-to-device, "
                                       "400 GB/s memory")
#: Sequential offload copies one layer at a time from pageable memory, synchronously: assumed to reach half the
#: bandwidth of the block-sized pinned copies of group offload (not measured).
SEQUENTIAL_BANDWIDTH_SHARE = 0.5
#: Device bytes per weight that diffusers' layerwise casting moves at every forward of an fp8-stored layer: up to the
#: compute dtype before it (read 1 byte, write 2) and back to fp8 after it (read 2, write 1); diffusers 0.42.1
#: ``LayerwiseCastingHook.pre_forward``/``post_forward``. For bf16/fp16 compute (fp8 storage needs one of them).
LAYERWISE_CAST_BYTES_PER_WEIGHT = 2 * (1 + 2)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# --- Estimated activation and overhead constants (bytes) -------------------------------------
#: Live activation bytes per token per hidden unit inside one transformer block (qkv, attention
#: output, the 2.7x-wide SwiGLU FFN, residual and norm copies), with flash/mem-efficient SDPA.
TRANSFORMER_ACTIVATION_HIDDEN_MULTIPLE = 20
#: Caption tokens the transformer sees at most (the pipeline's max_sequence_length).
MAX_CAPTION_TOKENS = 512
#: Pixels per latent token: VAE factor 8 times patch size 2, squared.
PIXELS_PER_TOKEN = 16 * 16
#: VAE decoder bytes per output pixel per channel of its widest full-resolution stage.
VAE_DECODE_BYTES_PER_PIXEL_CHANNEL = 10
#: VAE encoder bytes per input pixel per channel of its full-resolution stage (image-to-image, inpainting and the
#: ControlNet's control image are encoded before denoising). The encoder's full-resolution stage has the decoder's
#: 128 channels but fewer blocks; the decoder's constant is used as a cautious estimate until measured.
VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL = VAE_DECODE_BYTES_PER_PIXEL_CHANNEL
#: A ControlNet's hints: one (tokens x dim) tensor per control layer is kept for the transformer, and the
#: control blocks stack them as they go (``torch.stack`` of all hints so far): about twice the hints at the peak.
CONTROLNET_HINT_COPIES = 2
#: The tile edge the loader sets when vae-tiling is on (the Flux VAE's own tile is 1024 px,
#: which would leave a 1024x1024 decode untiled).
VAE_TILE_PX = 512
#: Text encoder: 512 tokens through the blocks, plus all hidden states kept (output_hidden_states).
TEXT_ENCODER_ACTIVATION_HIDDEN_MULTIPLE = 60
#: cuBLAS workspaces, the prompt embeddings, latents, RoPE tables and allocator slack.
FIXED_OVERHEAD_BYTES = 512 * MIB
#: A card of N GB shows less free memory once a CUDA context exists: used for hypothetical cards.
CUDA_CONTEXT_BYTES = 512 * MIB


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as the hardware probe saw it."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    supports_bf16: bool = True
    #: Its bf16 rate and host-to-device bandwidth (a probe at start, or a spec sheet); None: not known.
    throughput: Throughput | None = None


@dataclass(frozen=True)
class DeviceFacts:
    """The machine: its GPUs (maybe none), its RAM, and whether its CPU computes bf16 natively."""

    gpus: tuple[GpuFacts, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    # False unless the probe saw bf16 instructions (see cpu_has_native_bf16): without them bf16 on the CPU
    # is emulated and far slower than fp32, so "not known" must mean fp32.
    cpu_bf16: bool = False

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)


@dataclass(frozen=True)
class ComponentStats:
    """Parameter counts of one component, read from its weight files or published configs."""

    params: int
    largest_block_params: int = 0  # biggest numbered block (a transformer layer)
    non_block_params: int = 0  # everything outside numbered blocks (embeddings, heads)
    largest_leaf_params: int = 0  # biggest single module (what sequential offload moves)
    hidden_size: int = 0
    #: Bytes as stored when the weights are quantized (a GGUF transformer: the sum of its tensors' bytes from the
    #: file header); None: ``params`` x the dtype's bytes.
    stored_bytes: int | None = None


@dataclass(frozen=True)
class ComponentSizes:
    """The three weighted components (and a ControlNet when one is configured) and where the numbers came from.

    ``controlnet`` counts the ControlNet's own weights only: it borrows the transformer's embedders and refiner
    blocks (diffusers' ``ZImageControlNetModel.from_transformer``), which the transformer already counts.
    ``controlnet_hints`` is its number of control layers (one hint tensor each for the transformer).
    """

    transformer: ComponentStats
    text_encoder: ComponentStats
    vae: ComponentStats
    vae_base_channels: int = 128  # channels of the decoder's full-resolution stage
    source: str = "published sizes"
    controlnet: ComponentStats | None = None
    controlnet_hints: int = 0
    #: The transformer's config.json (dim, n_layers, n_refiner_layers, all_patch_size, in_channels, cap_feat_dim)
    #: for the FLOPs of the time model; None: FLOPs estimated from the parameter count.
    transformer_config: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def total_params(self) -> int:
        return (self.transformer.params + self.text_encoder.params + self.vae.params
                + (self.controlnet.params if self.controlnet is not None else 0))


#: Z-Image-Turbo's published architecture, counted on the meta device from its config.json files.
PUBLISHED_SIZES = ComponentSizes(
    transformer=ComponentStats(params=6_154_908_736, largest_block_params=180_910_336,
                               non_block_params=503_104, largest_leaf_params=39_321_600, hidden_size=3840),
    text_encoder=ComponentStats(params=4_022_468_096, largest_block_params=100_930_816,
                                non_block_params=388_958_720, largest_leaf_params=388_956_160, hidden_size=2560),
    vae=ComponentStats(params=83_819_683, largest_block_params=16_524_800, non_block_params=230_051,
                       largest_leaf_params=2_359_808),
    vae_base_channels=128,
    source="published sizes of Tongyi-MAI/Z-Image-Turbo",
    transformer_config={"dim": 3840, "n_layers": 30, "n_refiner_layers": 2, "all_patch_size": [2], "in_channels": 16,
                        "cap_feat_dim": 2560},
)

#: alibaba-pai's Z-Image-Turbo Fun ControlNet Union 2.1 (the largest published Z-Image ControlNet; 1.0 has 6 control
#: layers, 3.10 GB, and the 2.1 "lite" 3, 2.02 GB), counted on the meta device from the config diffusers maps that
#: checkpoint to (hlky/Z-Image-Turbo-Fun-Controlnet-Union-2.1: control layers at transformer layers 0, 2, ..., 28,
#: two control refiner blocks, dim 3840; see zimage.architecture.PUBLISHED): 3,356,225,792 parameters, 6.71 GB in
#: bf16, which is the published checkpoint's file size. Used when the ControlNet is not on disk; its files give the
#: real size otherwise (zimage.model_files.controlnet_stats).
PUBLISHED_CONTROLNET = ComponentStats(params=3_356_225_792, largest_block_params=210_409_216,
                                      non_block_params=510_720, largest_leaf_params=39_321_600, hidden_size=3840)
PUBLISHED_CONTROLNET_HINTS = 15


def with_controlnet(sizes: ComponentSizes, stats: ComponentStats | None, hints: int,
                    source: str = "") -> ComponentSizes:
    """``sizes`` with a ControlNet of ``stats`` (``hints`` control layers); ``stats=None`` removes it."""
    label = sizes.source if stats is None or not source else f"{sizes.source}; ControlNet: {source}"
    return replace(sizes, controlnet=stats, controlnet_hints=hints if stats is not None else 0, source=label)


@dataclass(frozen=True)
class RequestSize:
    """What one generation asks of memory."""

    width: int = 1024
    height: int = 1024
    num_images: int = 1
    guidance: bool = False  # guidance > 0 runs classifier-free guidance: twice the batch
    #: The VAE encodes an input before denoising (image-to-image, inpainting, the ControlNet's control image).
    encode: bool = False
    #: The ControlNet runs beside the transformer (the controlnet and controlnet_inpaint modes).
    controlnet: bool = False
    #: Denoising steps (transformer forwards), for the time model only.
    steps: int = PLANNED_STEPS

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class MemoryPlan:
    """A placement decision: what the loader applies and what it is predicted to cost."""

    profile: str
    options: tuple[str, ...]
    device: str  # "cuda:N" or "cpu"
    dtype: str  # "bf16", "fp16" or "fp32"
    predicted_peak_bytes: int  # on the busiest GPU (0 for cpu)
    budget_bytes: int  # free memory minus the reserve on that GPU (0 for cpu)
    reason: str
    use_streams: bool = False  # group-offload prefetches on a CUDA stream
    gpu_indices: tuple[int, ...] = ()  # the GPUs used (several for balanced)
    fits: bool = True
    warnings: tuple[str, ...] = field(default=())
    #: Predicted seconds per image (:func:`predict_seconds`; None on the CPU) and host-to-device bytes per image.
    predicted_seconds: float | None = None
    bytes_moved_per_image: int = 0
    #: The rates the time model used, and where they came from.
    throughput: Throughput | None = None
    #: Every placement the auto planner weighed, fastest first (empty for the CPU and explicit profiles).
    candidates: tuple["CandidateEstimate", ...] = ()

    def to_json(self) -> dict:
        """The stable JSON form printed by ``python -m zimage plan --json``."""
        return {
            "profile": self.profile,
            "options": list(self.options),
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "reason": self.reason,
            "device": self.device,
            "dtype": self.dtype,
            "budget_bytes": self.budget_bytes,
            "fits": self.fits,
            "use_streams": self.use_streams,
            "gpu_indices": list(self.gpu_indices),
            "warnings": list(self.warnings),
            "predicted_seconds": self.predicted_seconds,
            "bytes_moved_per_image": self.bytes_moved_per_image,
            "throughput": (None if self.throughput is None else
                           {"bf16_tflops": self.throughput.bf16_tflops, "h2d_gbps": self.throughput.h2d_gbps,
                            "memory_gbps": self.throughput.memory_gbps, "source": self.throughput.source}),
            "candidates": [c.to_json() for c in self.candidates],
        }

    def describe(self) -> str:
        """One line for logs and the UI, e.g. ``model-offload + vae-tiling on cuda:0 (bf16)``."""
        name = " + ".join((self.profile,) + self.options)
        where = "" if self.profile == "cpu" else f" on {self.device}"
        if self.profile == "balanced" and len(self.gpu_indices) > 1:  # its components spread over these GPUs
            where = " on " + ", ".join(f"cuda:{index}" for index in self.gpu_indices)
        return f"{name}{where} ({self.dtype})"


@dataclass(frozen=True)
class CandidateEstimate:
    """One placement the planner weighed: its predicted peak (bytes, on the busiest GPU), seconds per image,
    host-to-device bytes per image, and whether it fits the budget and changes pixels (lossy)."""

    profile: str
    options: tuple[str, ...]
    predicted_peak_bytes: int
    predicted_seconds: float
    bytes_moved_per_image: int
    fits: bool
    lossy: bool

    def describe(self) -> str:
        return " + ".join((self.profile,) + self.options)

    def to_json(self) -> dict:
        return {"profile": self.profile, "options": list(self.options),
                "predicted_peak_bytes": self.predicted_peak_bytes, "predicted_seconds": self.predicted_seconds,
                "bytes_moved_per_image": self.bytes_moved_per_image, "fits": self.fits, "lossy": self.lossy}


class PlanError(ValueError):
    """The requested placement cannot work on this machine; the message says what to do."""


#: CPU feature flags (as /proc/cpuinfo spells them) that mean bf16 matrix math runs in hardware:
#: x86 AVX512-BF16 (Cooper Lake, Zen 4 and later) and AMX-BF16 (Sapphire Rapids), and the Armv8.6
#: BF16 extension ("bf16" in the Features line of aarch64 kernels). Without one of these, PyTorch
#: emulates bf16 on the CPU and a generation is many times slower than in fp32 (measured 27x on a
#: 2-core AMD CPU without them).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


# --- Pure helpers ------------------------------------------------------------------------------

def cpu_has_native_bf16(flags: frozenset[str]) -> bool:
    """True when the CPU feature ``flags`` (lower case, as in /proc/cpuinfo) include bf16 instructions.

    See :data:`NATIVE_BF16_CPU_FLAGS`. An empty set (flags unknown) gives False.
    """
    return bool(NATIVE_BF16_CPU_FLAGS & {flag.lower() for flag in flags})


def hypothetical_devices(vram_gb: float, gpus: int = 1, ram_gb: float = 64.0, cpu_bf16: bool = False,
                         throughput: Throughput | None = None, name: str | None = None) -> DeviceFacts:
    """Facts for a machine we are not on (``plan --vram-gb``): N GB cards with a CUDA context open.

    ``cpu_bf16`` says whether that machine's CPU computes bf16 natively (default: it does not); ``throughput`` is
    the cards' rates for the time model (a spec sheet, :mod:`zimage.timing`), ``name`` their name.
    """
    if vram_gb <= 0:
        return DeviceFacts(gpus=(), ram_total_bytes=int(ram_gb * GIB), ram_available_bytes=int(ram_gb * GIB),
                           cpu_bf16=cpu_bf16)
    total = int(vram_gb * GIB)
    cards = tuple(
        GpuFacts(index=i, name=name or f"hypothetical {vram_gb:g} GB GPU", total_bytes=total,
                 free_bytes=max(0, total - CUDA_CONTEXT_BYTES), throughput=throughput)
        for i in range(gpus)
    )
    return DeviceFacts(gpus=cards, ram_total_bytes=int(ram_gb * GIB), ram_available_bytes=int(ram_gb * GIB),
                       cpu_bf16=cpu_bf16)


def choose_device(requested: str, devices: DeviceFacts) -> str:
    """Resolve ``auto``/``cuda``/``cuda:N``/``cpu`` against the GPUs that exist."""
    if requested == "cpu":
        return "cpu"
    if requested == "auto":
        return "cuda:0" if devices.has_gpu else "cpu"
    index = 0 if requested == "cuda" else int(requested.split(":", 1)[1])
    if not any(gpu.index == index for gpu in devices.gpus):
        found = ", ".join(f"cuda:{g.index}" for g in devices.gpus) or "no CUDA GPU"
        raise PlanError(f"device={requested!r} was asked for but this machine has {found}: "
                        "use --device auto, or check CUDA_VISIBLE_DEVICES and the driver (nvidia-smi).")
    return f"cuda:{index}"


def choose_dtype(requested: str, device: str, devices: DeviceFacts) -> str:
    """Resolve the dtype for the resolved ``device`` ("cpu" or "cuda:N").

    ``auto`` gives bf16 where the hardware computes it natively (the model was trained in bf16): a GPU
    with compute capability 8.0 or later, or a CPU with bf16 instructions (:func:`cpu_has_native_bf16`);
    fp16 on older GPUs and fp32 on other CPUs. Raises :class:`PlanError` for fp16 on the CPU, also when
    the CPU was chosen by ``--device auto`` on a machine without a GPU.
    """
    if device == "cpu":
        if requested == "fp16":
            where = "this machine has no CUDA GPU" if not devices.has_gpu else "--device cpu was asked for"
            raise PlanError(f"--dtype fp16 would run on the CPU ({where}), where fp16 is 60-120x slower than "
                            "bf16: use --dtype auto (bf16 or fp32, whichever this CPU computes natively), "
                            "bf16 or fp32, or run on a machine with a CUDA GPU.")
        if requested == "auto":
            # Emulated bf16 is many times slower than fp32 on CPUs without bf16 instructions.
            return "bf16" if devices.cpu_bf16 else "fp32"
        return requested
    if requested != "auto":
        return requested
    gpu = _gpu(devices, device)
    return "bf16" if gpu.supports_bf16 else "fp16"


def safe_dtype_after_nan(dtype: str, device: str, devices: DeviceFacts) -> str | None:
    """The dtype to retry in after a NaN (black) image, or None when there is nothing safer."""
    if dtype != "fp16":
        return None
    if device != "cpu" and _gpu(devices, device).supports_bf16:
        return "bf16"
    return "fp32"


def _gpu(devices: DeviceFacts, device: str) -> GpuFacts:
    index = int(device.split(":", 1)[1])
    return next(g for g in devices.gpus if g.index == index)


def _weight_bytes(stats: ComponentStats, dtype_bytes: int) -> int:
    return stats.params * dtype_bytes


def _transformer_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, fp8: bool) -> int:
    if sizes.transformer.stored_bytes is not None:
        # Quantized (GGUF): its real bytes, plus one block dequantized to the compute dtype while it runs.
        return sizes.transformer.stored_bytes + sizes.transformer.largest_block_params * dtype_bytes
    if not fp8:
        return _weight_bytes(sizes.transformer, dtype_bytes)
    # 1 byte per stored weight, plus one block upcast to the compute dtype while it runs.
    return sizes.transformer.params + sizes.transformer.largest_block_params * dtype_bytes


def _text_encoder_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, te_fp8: bool) -> int:
    """The text encoder's weights; with te-fp8-storage its blocks' linear layers take 1 byte per weight (the token
    embedding and norms, outside the blocks, stay in the compute dtype), plus one block upcast while it runs."""
    stats = sizes.text_encoder
    if not te_fp8:
        return _weight_bytes(stats, dtype_bytes)
    return ((stats.params - stats.non_block_params) + stats.non_block_params * dtype_bytes
            + stats.largest_block_params * dtype_bytes)


def _controlnet_weight_bytes(sizes: ComponentSizes, dtype_bytes: int, fp8: bool) -> int:
    """The ControlNet's own weights (0 without one); fp8-storage stores them in fp8 like the transformer's."""
    stats = sizes.controlnet
    if stats is None:
        return 0
    if not fp8:
        return _weight_bytes(stats, dtype_bytes)
    return stats.params + stats.largest_block_params * dtype_bytes


def activation_bytes(sizes: ComponentSizes, request: RequestSize, dtype_bytes: int,
                     vae_tiling: bool) -> dict[str, int]:
    """Estimated peak activation bytes of each stage for one request.

    Stages: ``text_encoder``, ``vae_encode`` (0 unless the request encodes an input image), ``transformer`` (with
    the ControlNet's hints when the request uses it: they are held while the transformer runs) and ``vae`` (the
    decode).
    """
    batch = request.num_images * (2 if request.guidance else 1)
    image_tokens = math.ceil(request.pixels / PIXELS_PER_TOKEN)
    tokens = batch * (image_tokens + MAX_CAPTION_TOKENS)
    transformer = tokens * sizes.transformer.hidden_size * TRANSFORMER_ACTIVATION_HIDDEN_MULTIPLE * dtype_bytes
    if request.controlnet and sizes.controlnet is not None:
        transformer += (CONTROLNET_HINT_COPIES * (sizes.controlnet_hints + 1) * tokens
                        * sizes.controlnet.hidden_size * dtype_bytes)
    text_encoder = (batch * MAX_CAPTION_TOKENS * sizes.text_encoder.hidden_size
                    * TEXT_ENCODER_ACTIVATION_HIDDEN_MULTIPLE * dtype_bytes)
    decoded_pixels = min(request.pixels, VAE_TILE_PX**2) if vae_tiling else request.pixels
    # Tiles are decoded one at a time but all images of the batch together; the decoded full image
    # (float32 RGB) is kept in any case.
    vae = (request.num_images * decoded_pixels * sizes.vae_base_channels * VAE_DECODE_BYTES_PER_PIXEL_CHANNEL
           * dtype_bytes // 2 + request.num_images * request.pixels * 3 * 4)
    # The input goes through the encoder as one batch of num_images (diffusers repeats it per image), tiled like
    # the decode when tiling is on; the input pixels themselves are held in the compute dtype.
    vae_encode = 0
    if request.encode:
        vae_encode = (request.num_images * decoded_pixels * sizes.vae_base_channels
                      * VAE_ENCODE_BYTES_PER_PIXEL_CHANNEL * dtype_bytes // 2
                      + request.num_images * request.pixels * 3 * dtype_bytes)
    return {"text_encoder": text_encoder, "vae_encode": vae_encode, "transformer": transformer, "vae": vae}


def predict_peak_bytes(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                       dtype: str, use_streams: bool = False) -> int:
    """Predicted peak GPU bytes of one generation under ``profile`` (single GPU; 0 for cpu).

    A configured ControlNet is resident under ``full``/``balanced`` (placed with the transformer at load), so it
    counts for every request there; under the offload profiles it reaches the GPU only for a request that uses it
    (``request.controlnet``), as the loader places it (zimage.loader.place_mode_pipeline).
    """
    if profile == "cpu":
        return 0
    dtype_bytes = DTYPE_BYTES[dtype]
    acts = activation_bytes(sizes, request, dtype_bytes, "vae-tiling" in options)
    fp8 = "fp8-storage" in options
    te_fp8 = "te-fp8-storage" in options
    transformer_w = _transformer_weight_bytes(sizes, dtype_bytes, fp8)
    text_encoder_w = _text_encoder_weight_bytes(sizes, dtype_bytes, te_fp8)
    vae_w = _weight_bytes(sizes.vae, dtype_bytes)
    controlnet_w = _controlnet_weight_bytes(sizes, dtype_bytes, fp8)
    used_controlnet_w = controlnet_w if request.controlnet else 0
    if profile in ("full", "balanced"):  # balanced: callers split per GPU with _balanced_split
        peak = transformer_w + text_encoder_w + vae_w + controlnet_w + max(acts.values())
    elif profile == "transformer-resident":
        # Resident: transformer, VAE and a configured ControlNet (placed with the transformer, as under full). The
        # text encoder is group-offloaded: its non-block modules (the token embedding) and, with the prefetching
        # stream, two blocks at a time are on the GPU while it runs.
        peak = (transformer_w + vae_w + controlnet_w
                + max(_text_encoder_live_bytes(sizes, dtype_bytes, te_fp8, use_streams) + acts["text_encoder"],
                      acts["vae_encode"], acts["transformer"], acts["vae"]))
    elif profile == "model-offload":
        # Each component moves to the GPU when it runs and the chain text encoder -> transformer -> VAE sends the
        # previous one back. The VAE that encoded an input stays until the chain wraps (the decode) and the text
        # encoder is still there while it encodes. The ControlNet (outside the chain: diffusers hooks it alone)
        # first runs before the transformer, beside the text encoder and the transformer's refiner blocks it
        # borrows; the transformer outweighs those two, so the transformer stage below is the larger one.
        encoded_vae_w = vae_w if request.encode else 0
        stages = [text_encoder_w + acts["text_encoder"],
                  transformer_w + encoded_vae_w + used_controlnet_w + acts["transformer"],
                  vae_w + acts["vae"]]
        if request.encode:
            stages.append(text_encoder_w + vae_w + acts["vae_encode"])
        peak = max(stages)
    elif profile == "group-offload":
        blocks_resident = 2 if use_streams else 1
        block_scale = 1 if not fp8 else 0.5
        if sizes.transformer.stored_bytes is not None:  # quantized blocks, each dequantized while it runs
            block_scale = 1 + sizes.transformer.stored_bytes / max(1, sizes.transformer.params * dtype_bytes)
        transformer_live = (sizes.transformer.non_block_params * dtype_bytes
                            + int(blocks_resident * sizes.transformer.largest_block_params * dtype_bytes * block_scale))
        text_encoder_live = _text_encoder_live_bytes(sizes, dtype_bytes, te_fp8, use_streams)
        # The ControlNet is group-offloaded one block at a time, without prefetching (zimage.loader).
        controlnet_live = 0
        if request.controlnet and sizes.controlnet is not None:
            controlnet_live = (sizes.controlnet.non_block_params * dtype_bytes
                               + int(sizes.controlnet.largest_block_params * dtype_bytes * block_scale))
        peak = vae_w + max(text_encoder_live + acts["text_encoder"], acts["vae_encode"],
                           max(transformer_live, controlnet_live) + acts["transformer"], acts["vae"])
    elif profile == "sequential-offload":
        # One module's weights at a time, next to the activations of the stage it belongs to.
        controlnet_leaf = sizes.controlnet.largest_leaf_params if request.controlnet and sizes.controlnet else 0
        peak = max(sizes.text_encoder.largest_leaf_params * dtype_bytes + acts["text_encoder"],
                   sizes.vae.largest_leaf_params * dtype_bytes + acts["vae_encode"],
                   max(sizes.transformer.largest_leaf_params, controlnet_leaf) * dtype_bytes + acts["transformer"],
                   sizes.vae.largest_leaf_params * dtype_bytes + acts["vae"])
    else:
        raise PlanError(f"unknown memory profile {profile!r}")
    return int(peak + FIXED_OVERHEAD_BYTES)


def bytes_moved_per_request(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                          dtype: str) -> int:
    """Weight bytes copied host-to-device for one request of ``request.num_images`` images (a new prompt: the
    prompt cache would spare the text encoder's share).

    ``full``/``balanced``/``cpu``: none. ``transformer-resident``: the text encoder once per prompt it encodes (the
    prompt, and the negative prompt with guidance). ``model-offload``: every component once (text encoder,
    transformer, VAE, and the ControlNet for its requests). ``group-offload``: the text encoder per prompt and the
    transformer (and a used ControlNet) at every step. ``sequential-offload``: as group offload plus the VAE.
    """
    if profile in ("full", "balanced", "cpu"):
        return 0
    dtype_bytes = DTYPE_BYTES[dtype]
    fp8 = "fp8-storage" in options
    # What is stored, not the one block upcast on the GPU: the copy moves the stored bytes.
    transformer = (sizes.transformer.stored_bytes if sizes.transformer.stored_bytes is not None
                   else sizes.transformer.params * (1 if fp8 else dtype_bytes))
    stats = sizes.text_encoder
    text_encoder = (stats.params * dtype_bytes if "te-fp8-storage" not in options
                    else stats.params - stats.non_block_params + stats.non_block_params * dtype_bytes)
    vae = _weight_bytes(sizes.vae, dtype_bytes)
    controlnet = (sizes.controlnet.params * (1 if fp8 else dtype_bytes)
                  if request.controlnet and sizes.controlnet is not None else 0)
    prompts = 2 if request.guidance else 1
    if profile == "transformer-resident":
        return text_encoder * prompts
    if profile == "model-offload":
        return text_encoder + transformer + vae + controlnet
    if profile == "group-offload":
        return text_encoder * prompts + (transformer + controlnet) * request.steps
    if profile == "sequential-offload":
        return text_encoder * prompts + (transformer + controlnet) * request.steps + vae * (2 if request.encode else 1)
    raise PlanError(f"unknown memory profile {profile!r}")


def compute_flops_per_request(sizes: ComponentSizes, request: RequestSize) -> float:
    """FLOPs of one request: the transformer at every step for every image (twice with guidance) and the text
    encoder over its 512 padded tokens per prompt (:mod:`zimage.timing`). The VAE is left out: the same under
    every placement."""
    batch = request.num_images * (2 if request.guidance else 1)
    if sizes.transformer_config is not None:
        transformer = transformer_flops_per_image(sizes.transformer_config, request.width, request.height,
                                                  request.steps, PLANNED_CAPTION_TOKENS)
    else:
        tokens = math.ceil(request.pixels / PIXELS_PER_TOKEN) + PLANNED_CAPTION_TOKENS
        transformer = dense_flops(sizes.transformer.params, tokens) * request.steps
    if request.controlnet and sizes.controlnet is not None:
        tokens = math.ceil(request.pixels / PIXELS_PER_TOKEN) + PLANNED_CAPTION_TOKENS
        transformer += dense_flops(sizes.controlnet.params, tokens) * request.steps
    prompts = 2 if request.guidance else 1
    text_encoder = dense_flops(sizes.text_encoder.params - sizes.text_encoder.non_block_params,
                               TEXT_ENCODER_TOKENS) * prompts
    return transformer * batch + text_encoder


def cast_bytes_per_request(options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str) -> int:
    """Device memory bytes (read plus written) spent per request turning stored weights into the compute dtype.

    ``fp8-storage``: :data:`LAYERWISE_CAST_BYTES_PER_WEIGHT` per transformer weight (and per ControlNet weight for
    its requests) at every step; ``te-fp8-storage``: the same per text-encoder block weight per prompt encoded; a GGUF
    transformer: its quantized bytes read and the compute-dtype weights written at every step (a lower bound:
    diffusers' dequantization may take several passes). One forward per step (guidance batches both prompts). 0
    without such weights. Under every placement alike: the cast happens where the layer computes.
    """
    dtype_bytes = DTYPE_BYTES[dtype]
    per_weight = LAYERWISE_CAST_BYTES_PER_WEIGHT
    per_step = 0
    if sizes.transformer.stored_bytes is not None:
        per_step += sizes.transformer.stored_bytes + sizes.transformer.params * dtype_bytes
    elif "fp8-storage" in options:
        per_step += sizes.transformer.params * per_weight
    if "fp8-storage" in options and request.controlnet and sizes.controlnet is not None:
        per_step += sizes.controlnet.params * per_weight
    total = per_step * request.steps
    if "te-fp8-storage" in options:
        prompts = 2 if request.guidance else 1
        total += (sizes.text_encoder.params - sizes.text_encoder.non_block_params) * per_weight * prompts
    return total


def predict_seconds(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize, dtype: str,
                    throughput: Throughput) -> float:
    """Predicted seconds per image of ``request`` under ``profile``: its FLOPs over ``throughput.bf16_tflops``, plus
    :func:`bytes_moved_per_request` over ``throughput.h2d_gbps`` (half that for sequential offload:
    :data:`SEQUENTIAL_BANDWIDTH_SHARE`), plus :func:`cast_bytes_per_request` over ``throughput.memory_gbps``, no
    overlap assumed, divided by the images of the request. An estimate for ranking placements, not a measurement
    (see :mod:`zimage.timing`)."""
    compute_s = compute_flops_per_request(sizes, request) / (throughput.bf16_tflops * 1e12)
    bandwidth = throughput.h2d_gbps * 1e9 * (SEQUENTIAL_BANDWIDTH_SHARE if profile == "sequential-offload" else 1)
    copy_s = bytes_moved_per_request(profile, options, sizes, request, dtype) / bandwidth
    cast_s = cast_bytes_per_request(options, sizes, request, dtype) / (throughput.memory_gbps * 1e9)
    return (compute_s + copy_s + cast_s) / request.num_images


def _text_encoder_live_bytes(sizes: ComponentSizes, dtype_bytes: int, te_fp8: bool, use_streams: bool) -> int:
    """The text encoder's bytes on the GPU while it runs group-offloaded: its non-block modules and one block (two
    with the prefetching stream), blocks at 1 byte per weight with te-fp8-storage."""
    blocks_resident = 2 if use_streams else 1
    block_bytes = 1 if te_fp8 else dtype_bytes
    return (sizes.text_encoder.non_block_params * dtype_bytes
            + blocks_resident * sizes.text_encoder.largest_block_params * block_bytes)


def _balanced_split(sizes: ComponentSizes, request: RequestSize, dtype: str, options: tuple[str, ...],
                    budgets: list[int]) -> int:
    """Place whole components on GPUs, largest first onto the one with most room.

    Returns the predicted peak of the busiest GPU: above its budget when some component fits nowhere (it is placed
    on the GPU with the most room anyway, so the peak says by how much the placement misses).
    """
    dtype_bytes = DTYPE_BYTES[dtype]
    acts = activation_bytes(sizes, request, dtype_bytes, "vae-tiling" in options)
    fp8 = "fp8-storage" in options
    items = [
        # The ControlNet shares modules with the transformer and must sit on its GPU (zimage.loader).
        ("transformer", _transformer_weight_bytes(sizes, dtype_bytes, fp8)
         + _controlnet_weight_bytes(sizes, dtype_bytes, fp8)),
        ("text_encoder", _text_encoder_weight_bytes(sizes, dtype_bytes, "te-fp8-storage" in options)),
        ("vae", _weight_bytes(sizes.vae, dtype_bytes)),
    ]
    weights_on = [0] * len(budgets)
    acts_on = [0] * len(budgets)
    for name, weight in sorted(items, key=lambda item: -(item[1] + acts[item[0]])):
        room = [budgets[i] - weights_on[i] - max(acts_on[i], acts[name]) - FIXED_OVERHEAD_BYTES
                for i in range(len(budgets))]
        best = max(range(len(budgets)), key=lambda i: room[i])
        weights_on[best] += weight
        acts_on[best] = max(acts_on[best], acts[name])
    return max(w + a + FIXED_OVERHEAD_BYTES for w, a in zip(weights_on, acts_on))


@dataclass(frozen=True)
class _Candidate:
    profile: str
    options: tuple[str, ...]
    use_streams: bool = False


def _candidates(devices: DeviceFacts, device: str, auto_fp8: bool,
                forced: tuple[str, ...]) -> list[_Candidate]:
    """Placements to weigh, in the order that breaks ties (the fewer options, the earlier); each without then with
    VAE tiling, and with the lossy options when ``auto_fp8`` allows them, on every placement but sequential offload
    (diffusers' layerwise casting under accelerate's per-layer hooks is not something this project has checked)."""
    base: list[tuple[str, bool]] = [("full", False)]
    if device == "cuda:0" and len(devices.gpus) > 1:
        base.append(("balanced", False))
    base += [("transformer-resident", True), ("model-offload", False), ("group-offload", True),
             ("sequential-offload", False)]
    lossy_sets: list[tuple[str, ...]] = [()]
    if auto_fp8:
        lossy_sets += [("fp8-storage",), ("te-fp8-storage",), ("fp8-storage", "te-fp8-storage")]
    result = []
    for extra in lossy_sets:
        for profile, streams in base:
            if extra and profile == "sequential-offload":
                continue
            for tiling in ((), ("vae-tiling",)):
                options = _normalise_options(forced + extra + tiling)
                candidate = _Candidate(profile, options, streams)
                if candidate not in result:
                    result.append(candidate)
    return result


def _normalise_options(options: tuple[str, ...]) -> tuple[str, ...]:
    order = ("fp8-storage", "te-fp8-storage", "vae-tiling", "attention-slicing")
    return tuple(o for o in order if o in options)


def _budget(devices: DeviceFacts, device: str, reserve_bytes: int) -> int:
    return max(0, _gpu(devices, device).free_bytes - reserve_bytes)


def _evaluate(candidate: _Candidate, devices: DeviceFacts, device: str, sizes: ComponentSizes,
              request: RequestSize, dtype: str, reserve_bytes: int) -> tuple[int, int, tuple[int, ...]]:
    """(predicted peak, budget, GPUs used) of a candidate; peak > budget means it does not fit."""
    if candidate.profile == "balanced":
        budgets = [max(0, g.free_bytes - reserve_bytes) for g in devices.gpus]
        peak = _balanced_split(sizes, request, dtype, candidate.options, budgets)
        indices = tuple(g.index for g in devices.gpus)
        return peak, min(budgets), indices
    peak = predict_peak_bytes(candidate.profile, candidate.options, sizes, request, dtype, candidate.use_streams)
    return peak, _budget(devices, device, reserve_bytes), (int(device.split(":")[1]),)


def _fmt_gb(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class _Weighed:
    candidate: _Candidate
    peak: int
    budget: int
    indices: tuple[int, ...]
    seconds: float
    moved: int  # per image
    order: int
    lossy: int  # lossy options beyond the forced ones

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def estimate(self) -> CandidateEstimate:
        c = self.candidate
        return CandidateEstimate(c.profile, c.options, self.peak, self.seconds, self.moved, self.fits, self.lossy > 0)


def device_throughput(devices: DeviceFacts, device: str) -> Throughput:
    """The rates the time model uses for ``device``: what the probe measured (or the card's spec sheet for a
    hypothetical card), else :data:`DEFAULT_THROUGHPUT`."""
    if device == "cpu" or not devices.has_gpu:
        return DEFAULT_THROUGHPUT
    return _gpu(devices, device).throughput or DEFAULT_THROUGHPUT


def _speed(w: _Weighed) -> tuple[float, int, int]:
    """Fastest first; among equal predictions the fewer options, then the earlier candidate."""
    return w.seconds, len(w.candidate.options), w.order


def _choose(weighed: list[_Weighed]) -> tuple[_Weighed | None, str]:
    """The fastest fitting candidate, where each lossy option has to earn its place: starting from the fastest
    lossless one, the fastest with at most one more lossy option replaces the choice only when it is predicted more
    than :data:`TIME_TIE_SHARE` faster, and so on. So a lossy choice is always more than that share faster than
    every lossless candidate that fits, and never more than that share slower than the fastest that fits. Returns
    (choice or None, why it is lossy: "" when it is not)."""
    fitting = [w for w in weighed if w.fits]
    chosen: _Weighed | None = None
    for level in range(max((w.lossy for w in fitting), default=-1) + 1):
        best = min((w for w in fitting if w.lossy <= level), key=_speed, default=None)
        if best is None or best is chosen:
            continue
        if chosen is None or best.seconds * (1 + TIME_TIE_SHARE) < chosen.seconds:
            chosen = best
    if chosen is None or not chosen.lossy:
        return chosen, ""
    lossless = min((w for w in fitting if not w.lossy), key=_speed, default=None)
    if lossless is None:
        return chosen, "nothing lossless fits"
    return chosen, (f"{_speedup(lossless.seconds, chosen.seconds, up=True)} faster than the fastest lossless one, "
                    f"{_describe(lossless.candidate)}")


def _speedup(slower_s: float, faster_s: float, *, up: bool) -> str:
    """How much faster ``faster_s`` is than ``slower_s`` as the rule measures it (slower / faster - 1), in percent
    with one decimal, rounded up (``up``: a gain the rule counted as more than the tie share) or down (one it did
    not), so that a message never shows 5.0% for a gain that was more than 5%, or 5.1% for one that was not."""
    tenths = (slower_s / faster_s - 1) * 1000
    return f"{(math.ceil(tenths - 1e-9) if up else math.floor(tenths + 1e-9)) / 10:.1f}%"


def plan_memory(devices: DeviceFacts, sizes: ComponentSizes, request: RequestSize = RequestSize(), *,
                requested_profile: str = "auto", forced_options: tuple[str, ...] = (),
                dtype: str = "auto", device: str = "auto", reserve_bytes: int = 1 * GIB,
                auto_fp8: bool = True) -> MemoryPlan:
    """Choose how to place the model. Pure: same inputs, same plan.

    Each candidate's predicted peak and predicted seconds per image decide (see the module docstring); the plan
    carries every candidate weighed, fastest first (:attr:`MemoryPlan.candidates`). ``requested_profile`` other
    than ``auto`` is honoured (and checked for feasibility: a warning when it is predicted not to fit, a
    :class:`PlanError` when it cannot work on this machine).
    """
    device = choose_device(device, devices)
    dtype = choose_dtype(dtype, device, devices)
    forced = _normalise_options(tuple(forced_options))
    ram_warnings = _ram_warnings(devices, sizes, dtype)
    quantized = sizes.transformer.stored_bytes is not None
    if quantized and "fp8-storage" in forced:
        raise PlanError("fp8-storage cannot be combined with a GGUF transformer (--transformer-file, or plan "
                        "--gguf-quant): its weights are already quantized. Drop fp8-storage from --memory-options.")

    if device == "cpu":
        if requested_profile not in ("auto", "cpu"):
            raise PlanError(f"memory profile {requested_profile!r} needs a CUDA GPU, and "
                            f"{'this machine has none' if not devices.has_gpu else 'device=cpu was chosen'}: "
                            "use --memory-profile auto (or cpu).")
        if forced and any(o in forced for o in LOSSY_OPTIONS) and dtype != "bf16":
            raise PlanError("fp8-storage and te-fp8-storage compute in bf16: use --dtype bf16 with them.")
        reason = ("no CUDA GPU: everything runs on the CPU" if not devices.has_gpu
                  else "device=cpu was asked for: everything runs on the CPU")
        return MemoryPlan(profile="cpu", options=forced, device="cpu", dtype=dtype, predicted_peak_bytes=0,
                          budget_bytes=0, reason=reason, warnings=ram_warnings)

    if requested_profile == "cpu":
        raise PlanError("memory profile 'cpu' with a GPU device: use --device cpu to run on the CPU, "
                        "or --memory-profile auto.")
    if requested_profile == "balanced" and len(devices.gpus) < 2:
        raise PlanError("memory profile 'balanced' spreads components over several GPUs and this machine "
                        f"has {len(devices.gpus)}: use full or model-offload (or auto).")
    if any(o in forced for o in LOSSY_OPTIONS) and dtype == "fp32":
        raise PlanError("fp8-storage and te-fp8-storage compute in bf16/fp16: use --dtype bf16 with them.")

    throughput = device_throughput(devices, device)
    # fp8 storage computes in bf16/fp16 (refused above when asked for with fp32): never a candidate in fp32.
    candidates = _candidates(devices, device, auto_fp8 and dtype != "fp32", forced)
    if quantized:  # fp8 storage does not apply to quantized weights
        candidates = [c for c in candidates if "fp8-storage" not in c.options]
    asked = candidates
    if requested_profile != "auto":
        # Honour the user's profile, lossless; still pick tiling if only that makes it fit.
        asked = [c for c in candidates if c.profile == requested_profile
                 and not set(c.options) - set(forced) - {"vae-tiling"}] or [
            _Candidate(requested_profile, forced, requested_profile in ("group-offload", "transformer-resident"))]

    def weigh(order: int, c: _Candidate) -> _Weighed:
        peak, budget, indices = _evaluate(c, devices, device, sizes, request, dtype, reserve_bytes)
        return _Weighed(
            c, peak, budget, indices, predict_seconds(c.profile, c.options, sizes, request, dtype, throughput),
            bytes_moved_per_request(c.profile, c.options, sizes, request, dtype) // request.num_images, order,
            len([o for o in c.options if o in LOSSY_OPTIONS and o not in forced]))

    # Every candidate is weighed, also under an asked-for profile: the table and the reason then show what auto
    # would have picked, so whoever forced a profile sees what it costs.
    everything = [weigh(order, c) for order, c in enumerate(candidates)]
    weighed = everything if asked is candidates else [
        next((w for w in everything if w.candidate == c), None) or weigh(len(candidates) + order, c)
        for order, c in enumerate(asked)]
    chosen, lossy_why = _choose(weighed)
    fits = chosen is not None
    if chosen is None:
        # Nothing fits: the leanest placement; it may still OOM, and the ladder takes over.
        chosen = min(weighed, key=lambda w: (w.lossy, w.peak, w.order))
    peak, budget, indices, candidate = chosen.peak, chosen.budget, chosen.indices, chosen.candidate
    free_gib = _fmt_gb(budget + reserve_bytes)
    ranked = sorted(weighed, key=_speed)
    if requested_profile != "auto":
        reason = (f"{requested_profile} was asked for: predicted {chosen.seconds:.2f} s per image, peak "
                  f"{_fmt_gb(peak)} of {_fmt_gb(budget)} usable{'' if fits else ' (it does not fit)'}")
        auto, _ = _choose(everything)
        if auto is not None and auto.candidate != candidate:
            if auto.seconds < chosen.seconds:
                reason += (f"; auto would pick {_describe(auto.candidate)} "
                           f"({auto.seconds:.2f} s, {_speedup(chosen.seconds, auto.seconds, up=True)} faster)")
            elif not fits:
                reason += (f"; auto would pick {_describe(auto.candidate)}, which fits "
                           f"({_fmt_gb(auto.peak)}, {auto.seconds:.2f} s)")
        ranked = sorted({id(w): w for w in everything + weighed}.values(), key=_speed)
    elif fits:
        skipped = [w for w in ranked if w.fits and w.seconds < chosen.seconds]  # lossier, and not faster enough
        beyond = " beyond those asked for" if any(o in LOSSY_OPTIONS for o in forced) else ""
        what = "the fastest placement that fits" if not skipped else (
            f"the fastest that fits with {chosen.lossy or 'no'} lossy option{'' if chosen.lossy == 1 else 's'}"
            f"{beyond}")
        reason = (f"{_describe(candidate)} is {what}: predicted {chosen.seconds:.2f} s per image, peak "
                  f"{_fmt_gb(peak)} within {_fmt_gb(budget)} usable ({free_gib} free minus "
                  f"{_fmt_gb(reserve_bytes)} reserve)")
        if lossy_why:
            reason += f" ({lossy_why})"
        if skipped:
            gain = _speedup(chosen.seconds, skipped[0].seconds, up=False)
            reason += (f"; {_describe(skipped[0].candidate)} ({skipped[0].seconds:.2f} s) is only {gain} faster: more "
                       f"lossy storage must buy more than {TIME_TIE_SHARE:.0%}")
        faster = [w for w in ranked if w.seconds < chosen.seconds and not w.fits]
        if faster:
            reason += (f"; {_describe(faster[0].candidate)} ({faster[0].seconds:.2f} s) would need "
                       f"{_fmt_gb(faster[0].peak)}")
    else:
        reason = (f"nothing is predicted to fit in {_fmt_gb(budget)} usable; using the leanest placement, "
                  f"{_describe(candidate)} (predicted {_fmt_gb(peak)})")
    warnings = list(ram_warnings)
    if not fits:
        warnings.append(f"predicted peak {_fmt_gb(peak)} exceeds the {_fmt_gb(budget)} usable on {device}: "
                        "expect out-of-memory errors; use a smaller image size or free GPU memory.")
    return MemoryPlan(profile=candidate.profile, options=candidate.options, device=device, dtype=dtype,
                      predicted_peak_bytes=peak, budget_bytes=budget, reason=reason,
                      use_streams=candidate.use_streams, gpu_indices=indices, fits=fits,
                      warnings=tuple(warnings), predicted_seconds=chosen.seconds,
                      bytes_moved_per_image=chosen.moved, throughput=throughput,
                      candidates=tuple(w.estimate() for w in ranked))


def _describe(candidate: _Candidate) -> str:
    return " + ".join((candidate.profile,) + candidate.options)


def _ram_warnings(devices: DeviceFacts, sizes: ComponentSizes, dtype: str) -> tuple[str, ...]:
    weights = sizes.total_params * DTYPE_BYTES[dtype]
    if devices.ram_available_bytes and weights > devices.ram_available_bytes:
        return (f"the weights need {_fmt_gb(weights)} of RAM while loading (and for offloading) but only "
                f"{_fmt_gb(devices.ram_available_bytes)} is available: add swap or RAM, or expect the loader "
                "to be killed.",)
    return ()


def with_placement(plan: MemoryPlan, profile: str, options: tuple[str, ...], streams: bool, sizes: ComponentSizes,
                   request: RequestSize) -> MemoryPlan:
    """``plan`` moved to another profile/options, with its predicted peak for ``request`` (same device and budget)."""
    options = _normalise_options(options)
    peak = predict_peak_bytes(profile, options, sizes, request, plan.dtype, streams)
    throughput = plan.throughput or DEFAULT_THROUGHPUT
    return replace(plan, profile=profile, options=options, use_streams=streams, predicted_peak_bytes=peak,
                   predicted_seconds=predict_seconds(profile, options, sizes, request, plan.dtype, throughput),
                   bytes_moved_per_image=bytes_moved_per_request(profile, options, sizes, request, plan.dtype)
                   // request.num_images, candidates=(),
                   fits=peak <= plan.budget_bytes, gpu_indices=plan.gpu_indices[:1],
                   reason=f"stepped down after an out-of-memory error (predicted {_fmt_gb(peak)})")
