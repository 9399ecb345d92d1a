"""The memory planner: a pure function from (device facts, component sizes, request size) to a plan.

Nothing here touches a GPU, a file or the environment, so every decision is testable as a table. What a placement
costs is predicted by two models beside it: :mod:`zimage.peak_model` (the bytes the CUDA allocator reserves at the
largest stage) and :mod:`zimage.time_model` (seconds per image, stage by stage), both calibrated on a GPU
(tests/test_planner_gpu_rows.py holds them to every committed measurement).

Profiles, fastest first (each is a documented placement, applied by :mod:`zimage.loader` with
diffusers' own calls):

========================  ==================================================================
``full``                  every component on one GPU. Fastest; needs all weights + activations.
``balanced``              diffusers ``device_map="balanced"``: whole components spread over
                          several GPUs, no transfers during a generation.
``transformer-resident``  the transformer and the VAE stay on the GPU; the text encoder lives in RAM
                          and is streamed layer by layer for each prompt (diffusers'
                          ``apply_group_offloading`` on the text encoder alone, leaf level, on a
                          CUDA stream). Moves the encoder per prompt.
``model-offload``         ``enable_model_cpu_offload``: weights live in RAM, each component
                          (text encoder, transformer, VAE) moves to the GPU while it runs, through
                          pageable memory (slow: priced at the probe's pageable round-trip rate).
                          Needs the largest component + its activations.
``group-offload``         group offloading with a CUDA stream: the transformer block by block, the
                          text encoder layer by layer; the small VAE stays on the GPU.
``sequential-offload``    ``enable_sequential_cpu_offload``: one layer at a time. Least memory,
                          by far the slowest.
``cpu``                   no accelerator: everything on the CPU (the demo model and tests; the
                          real model takes tens of minutes per image on a CPU).
========================  ==================================================================

Options: ``vae-tiling`` (decode in 512 px tiles: the VAE's activations stop growing with the image),
``fp8-storage`` (transformer and ControlNet weights stored in float8, computed in bf16: half their memory, a slight
quality change), ``te-fp8-storage`` (the text encoder's linear layers stored in float8, its token embedding and
norms kept in bf16), ``fp8-compute`` (the transformer's linear layers in float8 with float8 matmuls, torchao: GPUs of
compute capability 8.9 and later, full and transformer-resident only), ``step-cache`` (diffusers' pyramid attention
broadcast: the attention output reused on every second step; opt-in only), ``attention-slicing`` (accepted for
users who ask for it; measured as no change for this model, so the planner never relies on it).

Regional compilation of the transformer (``compile_mode``, ``--compile``) is part of a plan too
(:attr:`MemoryPlan.compiled`): by default on CUDA, wherever it composes with the placement's hooks
(:func:`compile_problem`); the time model prices compiled and eager denoising differently.

A configured ControlNet (:attr:`ComponentSizes.controlnet`) counts where it lives: resident beside the
transformer under ``full``/``balanced``/``transformer-resident``, on the GPU only for its own requests under the
offload profiles (:attr:`RequestSize.controlnet`). Requests with an input image (:attr:`RequestSize.encode`) add the
VAE's encode of it as a stage of its own.

The auto planner takes the fastest candidate whose predicted peak fits the GPU's free memory minus the reserve, with
one rule for lossy options (:data:`LOSSY_OPTIONS`): each has to earn its place. Starting from the fastest lossless
candidate, the fastest with at most one more lossy option replaces the choice only when it is predicted more than
:data:`TIME_TIE_SHARE` faster than it (the time model is not more precise than that), or when nothing with fewer
fits; so a lossy choice is more than that share faster than every lossless candidate that fits. Options no GPU run
has measured (:data:`UNMEASURED_OPTIONS`) and opt-in ones (:data:`OPT_IN_OPTIONS`) are never added by the planner.
``auto_fp8=False`` (and fp32, where fp8 storage cannot compute) forbids lossy options. So the choice is never
more than :data:`TIME_TIE_SHARE` slower than the fastest that fits, and more memory never gives a placement
predicted slower by more than that share (none slower without lossy options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from . import peak_model
from .peak_model import VAE_TILE_PX, activation_bytes  # noqa: F401 - part of the planner's interface
from .sizes import (  # noqa: F401 - the planner's interface: its inputs are defined there
    DTYPE_BYTES,
    GIB,
    MIB,
    PLANNED_STEPS,
    PUBLISHED_CONTROLNET,
    PUBLISHED_CONTROLNET_HINTS,
    PUBLISHED_SIZES,
    ComponentSizes,
    ComponentStats,
    RequestSize,
    with_controlnet,
)
from .time_model import (  # noqa: F401 - part of the planner's interface
    StageSeconds,
    bytes_moved_per_request,
    cast_bytes_per_request,
    predict_seconds,
    predict_stages,
)
from .timing import Throughput

PROFILES_FASTEST_FIRST = ("full", "balanced", "transformer-resident", "model-offload", "group-offload",
                          "sequential-offload")
#: A lossy option must make a placement predicted faster than this share to be chosen over one without it: the time
#: model's own error is about this size (its target is 10%), so a smaller gain is no reason to change pixels.
TIME_TIE_SHARE = 0.05
#: Options that change pixels.
LOSSY_OPTIONS = ("fp8-storage", "te-fp8-storage", "fp8-compute", "step-cache")
#: Options that store weights in float8 and cast them to bf16 or fp16 to compute (never in fp32).
FP8_STORAGE_OPTIONS = ("fp8-storage", "te-fp8-storage")
#: Options the auto planner never adds: only a user who asks for them gets them (their effect on pixels is not
#: bounded by anything this project measures).
OPT_IN_OPTIONS = ("step-cache",)
#: Placements fp8 compute is offered on: torchao's float8 tensors under accelerate's or diffusers' offload hooks are
#: not something this project has checked on a GPU.
FP8_COMPUTE_PROFILES = ("full", "transformer-resident")
#: fp8 tensor cores arrived with compute capability 8.9 (Ada); Hopper is 9.0, Blackwell 10.0 and 12.0.
FP8_COMPUTE_CAPABILITY = (8, 9)
#: Placements whose hooks break regional compilation's graph (fullgraph): diffusers' group offloading and
#: accelerate's sequential offload hook each transformer block, which is what is compiled (seen on the CPU:
#: "graph break ... ModuleGroup.onload_"). Options that do the same: layerwise casting (fp8-storage: "construct
#: torch.nn.Parameter() outside the compiled region") and pyramid attention broadcast (step-cache).
COMPILE_BREAKING_PROFILES = ("group-offload", "sequential-offload")
COMPILE_BREAKING_OPTIONS = ("fp8-storage", "step-cache")
#: Options whose speed no GPU run has measured yet: the auto planner does not add them (a user still can, with
#: --memory-options), so that no choice rests on an assumed figure (zimage.time_model.FP8_LINEAR_SPEEDUP).
UNMEASURED_OPTIONS = ("fp8-compute",)
#: The rates used when neither a probe nor a card name gave any (assumed: a mid-range PCIe 4.0 card). The choice
#: between single-GPU placements barely depends on them: their compute is the same and they differ in bytes moved.
DEFAULT_THROUGHPUT = Throughput(bf16_tflops=70.0, h2d_gbps=25.0, memory_gbps=400.0,
                                source="assumed (no probe, no --gpu-name): 70 TFLOP/s bf16, 25 GB/s host-to-device, "
                                       "400 GB/s memory, 1.19 GB/s pageable round trip")
#: A card of N GB shows less free memory once a CUDA context exists: used for hypothetical cards.
CUDA_CONTEXT_BYTES = 512 * MIB
#: Steps the time model assumes when a request does not say (Turbo's default).


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
    #: CUDA compute capability (major, minor); None: not known (then fp8 compute is not offered).
    compute_capability: tuple[int, int] | None = None


@dataclass(frozen=True)
class DeviceFacts:
    """The machine: its GPUs (maybe none), its RAM, and whether its CPU computes bf16 natively."""

    gpus: tuple[GpuFacts, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    # False unless the probe saw bf16 instructions (see cpu_has_native_bf16): without them bf16 on the CPU
    # is emulated and far slower than fp32, so "not known" must mean fp32.
    cpu_bf16: bool = False
    #: torchao, which fp8 compute needs, can be imported (a software fact the probe reads with the hardware).
    fp8_compute_library: bool = False
    #: The CUDA caching allocator's configuration: "expandable" (segments, as the server sets it) or "default";
    #: what it reserves beyond what tensors hold differs (zimage.peak_model.FRAGMENTATION_SHARE).
    allocator: str = "expandable"

    @property
    def has_gpu(self) -> bool:
        return bool(self.gpus)



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
    #: The transformer's repeated blocks are compiled (torch.compile, regional) on this placement (--compile).
    compiled: bool = False
    #: The predicted seconds per image by stage (:class:`~zimage.time_model.StageSeconds`), None on the CPU.
    stages: StageSeconds | None = None
    #: The allocator configuration the peak was predicted for (:attr:`DeviceFacts.allocator`).
    allocator: str = "expandable"

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
                            "memory_gbps": self.throughput.memory_gbps, "pageable_gbps": self.throughput.pageable_gbps,
                            "source": self.throughput.source}),
            "candidates": [c.to_json() for c in self.candidates],
            "compiled": self.compiled,
            "predicted_stages": None if self.stages is None else self.stages.to_json(),
            "allocator": self.allocator,
        }

    def describe(self) -> str:
        """One line for logs and the UI, e.g. ``model-offload + vae-tiling on cuda:0 (bf16)``."""
        name = " + ".join((self.profile,) + self.options) + (", compiled" if self.compiled else "")
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
    compiled: bool = False

    def describe(self) -> str:
        return " + ".join((self.profile,) + self.options) + (", compiled" if self.compiled else "")

    def to_json(self) -> dict:
        return {"profile": self.profile, "options": list(self.options),
                "predicted_peak_bytes": self.predicted_peak_bytes, "predicted_seconds": self.predicted_seconds,
                "bytes_moved_per_image": self.bytes_moved_per_image, "fits": self.fits, "lossy": self.lossy,
                "compiled": self.compiled}


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
                         throughput: Throughput | None = None, name: str | None = None,
                         compute_capability: tuple[int, int] | None = None,
                         fp8_compute_library: bool = True, allocator: str = "expandable") -> DeviceFacts:
    """Facts for a machine we are not on (``plan --vram-gb``): N GB cards with a CUDA context open.

    ``cpu_bf16`` says whether that machine's CPU computes bf16 natively (default: it does not); ``throughput`` is
    the cards' rates for the time model (a spec sheet, :mod:`zimage.timing`), ``name`` their name,
    ``compute_capability`` theirs (None: not known, no fp8 compute); ``fp8_compute_library``: torchao would be
    installed there (default: yes, as the README's GPU install does).
    """
    if vram_gb <= 0:
        return DeviceFacts(gpus=(), ram_total_bytes=int(ram_gb * GIB), ram_available_bytes=int(ram_gb * GIB),
                           cpu_bf16=cpu_bf16)
    total = int(vram_gb * GIB)
    cards = tuple(
        GpuFacts(index=i, name=name or f"hypothetical {vram_gb:g} GB GPU", total_bytes=total,
                 free_bytes=max(0, total - CUDA_CONTEXT_BYTES), throughput=throughput,
                 compute_capability=compute_capability)
        for i in range(gpus)
    )
    return DeviceFacts(gpus=cards, ram_total_bytes=int(ram_gb * GIB), ram_available_bytes=int(ram_gb * GIB),
                       cpu_bf16=cpu_bf16, fp8_compute_library=fp8_compute_library, allocator=allocator)


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



@dataclass(frozen=True)
class _Candidate:
    profile: str
    options: tuple[str, ...]
    use_streams: bool = False


def predict_peak_bytes(profile: str, options: tuple[str, ...], sizes: ComponentSizes, request: RequestSize,
                       dtype: str, use_streams: bool = False, allocator: str = "expandable") -> int:
    """Predicted peak GPU bytes the allocator reserves for one generation under ``profile`` (single GPU; 0 for
    cpu), for the ``dtype`` ("bf16", "fp16", "fp32") and ``allocator`` configuration: :mod:`zimage.peak_model`.
    Raises :class:`PlanError` for an unknown profile."""
    try:
        return peak_model.predict_peak_bytes(profile, options, sizes, request, DTYPE_BYTES[dtype], use_streams,
                                             allocator)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


def _candidates(devices: DeviceFacts, device: str, auto_fp8: bool, forced: tuple[str, ...],
                fp8_compute: bool) -> list[_Candidate]:
    """Placements to weigh, in the order that breaks ties (the fewer options, the earlier); each without then with
    VAE tiling, and with the lossy options when ``auto_fp8`` allows them (fp8 compute when ``fp8_compute``: this GPU
    and this install can run it, on :data:`FP8_COMPUTE_PROFILES` only), on every placement but sequential offload
    (diffusers' layerwise casting under accelerate's per-layer hooks is not something this project has checked)."""
    base: list[tuple[str, bool]] = [("full", False)]
    if device == "cuda:0" and len(devices.gpus) > 1:
        base.append(("balanced", False))
    base += [("transformer-resident", True), ("model-offload", False), ("group-offload", True),
             ("sequential-offload", False)]
    lossy_sets: list[tuple[str, ...]] = [()]
    if auto_fp8:
        lossy_sets += [("fp8-storage",), ("te-fp8-storage",), ("fp8-storage", "te-fp8-storage")]
        if fp8_compute and "fp8-compute" not in UNMEASURED_OPTIONS:
            lossy_sets += [("fp8-compute",), ("fp8-compute", "te-fp8-storage")]
    result = []
    for extra in lossy_sets:
        for profile, streams in base:
            if extra and profile == "sequential-offload":
                continue
            for tiling in ((), ("vae-tiling",)):
                options = _normalise_options(forced + extra + tiling)
                if "fp8-compute" in options and (profile not in FP8_COMPUTE_PROFILES or "fp8-storage" in options):
                    continue
                candidate = _Candidate(profile, options, streams)
                if candidate not in result:
                    result.append(candidate)
    return result


def _normalise_options(options: tuple[str, ...]) -> tuple[str, ...]:
    order = ("fp8-storage", "fp8-compute", "te-fp8-storage", "step-cache", "vae-tiling", "attention-slicing")
    return tuple(o for o in order if o in options)


def fp8_compute_problem(devices: DeviceFacts, device: str, dtype: str, quantized: bool) -> str | None:
    """Why fp8 compute cannot run on ``device`` of this machine, with the fix; None when it can."""
    if device == "cpu":
        return "fp8-compute needs a CUDA GPU with fp8 tensor cores; this plan runs on the CPU."
    capability = _gpu(devices, device).compute_capability
    if capability is None or tuple(capability) < FP8_COMPUTE_CAPABILITY:
        have = ("an unknown compute capability" if capability is None
                else f"compute capability {capability[0]}.{capability[1]}")
        hint = (" (for a card this machine does not have, plan with --gpu-name: the table knows its compute "
                "capability)" if capability is None else "")
        return (f"fp8-compute needs fp8 tensor cores (compute capability 8.9 or later: RTX 40 and 50 series, L4, L40S, "
                f"H100, H200); {device} has {have}{hint}. Use fp8-storage instead (same memory, bf16 matmuls).")
    if not devices.fp8_compute_library:
        return "fp8-compute needs the torchao package, which is not installed: pip install torchao==0.18.0."
    if dtype != "bf16":
        return f"fp8-compute computes in bf16 around its float8 matmuls: use --dtype bf16 (not {dtype})."
    if quantized:
        return "fp8-compute cannot be combined with a GGUF transformer (--transformer-file): its weights are quantized."
    return None


def compile_problem(profile: str, options: tuple[str, ...], quantized: bool) -> str | None:
    """Why regional compilation does not compose with this placement (its hooks break the compiled graph); None
    when it does. See :data:`COMPILE_BREAKING_PROFILES`."""
    if profile in COMPILE_BREAKING_PROFILES:
        return f"{profile} hooks every transformer block, which breaks the compiled graph"
    breaking = [o for o in options if o in COMPILE_BREAKING_OPTIONS]
    if breaking:
        return f"{breaking[0]} hooks every transformer layer, which breaks the compiled graph"
    if quantized:
        return "a GGUF transformer dequantizes in Python at every layer, which has not been checked compiled"
    return None


def will_compile(compile_mode: str, device: str, profile: str, options: tuple[str, ...], quantized: bool) -> bool:
    """Whether the transformer is compiled under this placement: ``compile_mode`` "off" never, "auto" on CUDA where
    it composes (:func:`compile_problem`), "on" wherever it composes (the CPU too)."""
    if compile_mode == "off" or compile_problem(profile, options, quantized) is not None:
        return False
    return compile_mode == "on" or device.startswith("cuda")


def _budget(devices: DeviceFacts, device: str, reserve_bytes: int) -> int:
    return max(0, _gpu(devices, device).free_bytes - reserve_bytes)


def _evaluate(candidate: _Candidate, devices: DeviceFacts, device: str, sizes: ComponentSizes,
              request: RequestSize, dtype: str, reserve_bytes: int) -> tuple[int, int, tuple[int, ...]]:
    """(predicted peak, budget, GPUs used) of a candidate; peak > budget means it does not fit."""
    if candidate.profile == "balanced":
        budgets = [max(0, g.free_bytes - reserve_bytes) for g in devices.gpus]
        peak = peak_model.balanced_split(sizes, request, DTYPE_BYTES[dtype], candidate.options, budgets,
                                         devices.allocator)
        indices = tuple(g.index for g in devices.gpus)
        return peak, min(budgets), indices
    peak = predict_peak_bytes(candidate.profile, candidate.options, sizes, request, dtype, candidate.use_streams,
                              devices.allocator)
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
    compiled: bool = False
    stages: StageSeconds | None = None

    @property
    def fits(self) -> bool:
        return self.peak <= self.budget

    def estimate(self) -> CandidateEstimate:
        c = self.candidate
        return CandidateEstimate(c.profile, c.options, self.peak, self.seconds, self.moved, self.fits, self.lossy > 0,
                                 self.compiled)


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
                auto_fp8: bool = True, compile_mode: str = "auto") -> MemoryPlan:
    """Choose how to place the model. Pure: same inputs, same plan.

    Each candidate's predicted peak and predicted seconds per image decide (see the module docstring); the plan
    carries every candidate weighed, fastest first (:attr:`MemoryPlan.candidates`). ``requested_profile`` other
    than ``auto`` is honoured (and checked for feasibility: a warning when it is predicted not to fit, a
    :class:`PlanError` when it cannot work on this machine). ``compile_mode`` (auto, on, off: ``--compile``) decides
    which candidates are compiled (:func:`will_compile`), which their predicted seconds count.
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
        storage = [o for o in forced if o in FP8_STORAGE_OPTIONS]
        if storage and dtype != "bf16":
            raise PlanError(f"{' and '.join(storage)} compute{'s' if len(storage) == 1 else ''} in bf16: use "
                            "--dtype bf16 with it.")
        if "fp8-compute" in forced:
            raise PlanError(fp8_compute_problem(devices, "cpu", dtype, quantized))
        if compile_mode == "on" and compile_problem("cpu", forced, quantized):
            raise PlanError(f"--compile on cannot be used here: {compile_problem('cpu', forced, quantized)}. Use "
                            "--compile auto or off, or drop the option.")
        reason = ("no CUDA GPU: everything runs on the CPU" if not devices.has_gpu
                  else "device=cpu was asked for: everything runs on the CPU")
        return MemoryPlan(profile="cpu", options=forced, device="cpu", dtype=dtype, predicted_peak_bytes=0,
                          budget_bytes=0, reason=reason, warnings=ram_warnings,
                          compiled=will_compile(compile_mode, "cpu", "cpu", forced, quantized))

    if requested_profile == "cpu":
        raise PlanError("memory profile 'cpu' with a GPU device: use --device cpu to run on the CPU, "
                        "or --memory-profile auto.")
    if requested_profile == "balanced" and len(devices.gpus) < 2:
        raise PlanError("memory profile 'balanced' spreads components over several GPUs and this machine "
                        f"has {len(devices.gpus)}: use full or model-offload (or auto).")
    storage = [o for o in forced if o in FP8_STORAGE_OPTIONS]
    if storage and dtype == "fp32":
        raise PlanError(f"{' and '.join(storage)} compute{'s' if len(storage) == 1 else ''} in bf16/fp16: use "
                        "--dtype bf16 with it.")

    fp8_compute_why = fp8_compute_problem(devices, device, dtype, quantized)
    if "fp8-compute" in forced:
        if fp8_compute_why:
            raise PlanError(fp8_compute_why)
        if "fp8-storage" in forced:
            raise PlanError("fp8-compute and fp8-storage both store the transformer in float8: keep one of them.")
        if requested_profile not in ("auto",) + FP8_COMPUTE_PROFILES:
            raise PlanError(f"fp8-compute runs on the {' and '.join(FP8_COMPUTE_PROFILES)} placements (torchao's "
                            f"float8 weights under offload hooks are unchecked), not {requested_profile}: use "
                            "--memory-profile auto, or fp8-storage for an offloaded transformer.")
    if compile_mode == "on":
        # What breaks compilation whatever the placement (an option, a GGUF file), then the placement asked for.
        why = compile_problem("full", forced, quantized) or (
            compile_problem(requested_profile, forced, quantized) if requested_profile != "auto" else None)
        if why:
            what = _describe(_Candidate(requested_profile, forced)) if requested_profile != "auto" else (
                " + ".join(forced) or "a GGUF transformer")
            raise PlanError(f"--compile on with {what}: {why}. Use --compile auto (compiles where it composes) or "
                            "off.")
    throughput = device_throughput(devices, device)
    # fp8 storage computes in bf16/fp16 (refused above when asked for with fp32): never a candidate in fp32.
    candidates = _candidates(devices, device, auto_fp8 and dtype != "fp32", forced, fp8_compute_why is None)
    if compile_mode == "on":  # only what compiles
        candidates = [c for c in candidates if compile_problem(c.profile, c.options, quantized) is None]
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
        compiled = will_compile(compile_mode, device, c.profile, c.options, quantized)
        stages = predict_stages(c.profile, c.options, sizes, request, dtype, throughput, compiled)
        return _Weighed(
            c, peak, budget, indices, stages.total / request.num_images,
            bytes_moved_per_request(c.profile, c.options, sizes, request, dtype) // request.num_images, order,
            len([o for o in c.options if o in LOSSY_OPTIONS and o not in forced]), compiled,
            stages.per_image(request.num_images))

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
        if compile_mode == "on":
            reason += ("; --compile on keeps only the placements that compile: --compile auto would also weigh group "
                       "and sequential offload")
    warnings = list(ram_warnings)
    if not fits:
        warnings.append(f"predicted peak {_fmt_gb(peak)} exceeds the {_fmt_gb(budget)} usable on {device}: "
                        "expect out-of-memory errors; use a smaller image size or free GPU memory.")
    return MemoryPlan(profile=candidate.profile, options=candidate.options, device=device, dtype=dtype,
                      predicted_peak_bytes=peak, budget_bytes=budget, reason=reason,
                      use_streams=candidate.use_streams, gpu_indices=indices, fits=fits,
                      warnings=tuple(warnings), predicted_seconds=chosen.seconds,
                      bytes_moved_per_image=chosen.moved, throughput=throughput,
                      candidates=tuple(w.estimate() for w in ranked), compiled=chosen.compiled, stages=chosen.stages,
                      allocator=devices.allocator)


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
    if profile not in FP8_COMPUTE_PROFILES:  # fp8 compute only where it was checked (FP8_COMPUTE_PROFILES)
        options = tuple(o for o in options if o != "fp8-compute")
    peak = predict_peak_bytes(profile, options, sizes, request, plan.dtype, streams, plan.allocator)
    throughput = plan.throughput or DEFAULT_THROUGHPUT
    # A step down keeps the compiled transformer only when it keeps the loaded pipeline (a reload for a one-off
    # request does not pay for compiling again).
    compiled = plan.compiled and profile == plan.profile and compile_problem(
        profile, options, sizes.transformer.stored_bytes is not None) is None
    stages = predict_stages(profile, options, sizes, request, plan.dtype, throughput, compiled)
    return replace(plan, profile=profile, options=options, use_streams=streams, predicted_peak_bytes=peak,
                   compiled=compiled, stages=stages.per_image(request.num_images),
                   predicted_seconds=stages.total / request.num_images,
                   bytes_moved_per_image=bytes_moved_per_request(profile, options, sizes, request, plan.dtype)
                   // request.num_images, candidates=(),
                   fits=peak <= plan.budget_bytes, gpu_indices=plan.gpu_indices[:1],
                   reason=f"stepped down after an out-of-memory error (predicted {_fmt_gb(peak)})")
