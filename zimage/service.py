"""The generation service: owns the pipeline and every job, runs one job at a time on the GPU.

A job's life (see :mod:`zimage.jobs`):

1. :meth:`GenerationService.submit` validates the request (:func:`validate_request`), checks its size
   against the base placement (:func:`zimage.recovery.plan_request`: refused at once when nothing on this
   GPU fits it) and admits it to the bounded queue (:class:`~zimage.errors.QueueFull` when full);
2. the one GPU worker thread takes jobs in order, places the pipeline for the job (the base placement,
   or a per-request measure), and renders it in three stages (:mod:`zimage.render`): encoding, denoising
   (cancel is checked after every step), decoding (skipped after a cancel);
3. an error is classified (:func:`zimage.recovery.classify_error`) and the pure policy
   (:func:`zimage.recovery.next_action`) says what follows: tiling for the decode, a leaner placement for
   this request, a failure with a clear message, or an exit for a restart when the GPU is unusable;
4. NaN pixels (fp16 black images) are retried once in a safe dtype;
5. the worker hands the pixels to the saving thread and takes the next job, so the next job denoises
   while this one's PNGs are written (all images of a request or none).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import __version__, render
from .attention import apply as apply_attention
from .attention import compile_transformer, compiled_or_eager
from .errors import (
    GenerationCancelled,
    LoraError,
    NaNOutputError,
    OutOfMemoryAfterRetries,
    QueueFull,
    RequestTooLarge,
    ServiceFailed,
    ServiceNotReady,
    ValidationError,
    ZImageError,
)
from .errors import first_line as _first_line
from .errors import shown as _shown
from .hardware import (
    StageMeter,
    device_available,
    gpu_memory_stats,
    probe_devices,
    release_memory,
    reset_gpu_peak,
)
from .jobs import RUNNING, SAVING, Job, JobQueue, Progress
from .loader import denoise_placement
from .model_family import TURBO, ModelDefaults
from .lora import MAX_LORAS, LoraAdapters, LoraFile, LoraFolder, LoraLoadFailed, placement_problem, validate_loras
from .planner import DeviceFacts, MemoryPlan, PlanError, RequestSize, compile_problem, safe_dtype_after_nan
from .prompt_cache import PromptCache, prompt_key
from .recovery import (
    DECODE,
    DENOISE,
    ENCODE,
    EXIT,
    FAIL,
    RAISE,
    RETRY_DECODE,
    classify_error,
    next_action,
    plan_request,
    same_placement,
)
from .render import MAX_PROMPT_TOKENS, steps_run
from .settings import Settings
from .storage import OutputStore

log = logging.getLogger("zimage.service")
job_log = logging.getLogger("zimage.jobs")

# --- Request limits (documented in the README) --------------------------------------------------
#: Turbo is distilled for 8 transformer evaluations. In diffusers 0.42.1, N steps run exactly N
#: transformer forwards (counted in tests/test_pipeline_tiny.py), so the default is 8. The model card's
#: ``num_inference_steps=9`` ("results in 8 DiT forwards") describes an earlier scheduler setup.
DEFAULT_STEPS = 8
MIN_STEPS, MAX_STEPS = 1, 50
DEFAULT_GUIDANCE = 0.0  # Turbo is guidance-distilled; > 0 enables CFG and doubles the work
MAX_GUIDANCE = 10.0
DEFAULT_SIDE_PX = 1024
#: (width, height, images) of the compile warm-up's steps: the default size, then another size and batch, so that
#: torch's automatic dynamic shapes compile one graph for every size and batch before the first request.
WARM_UP_SHAPES = ((DEFAULT_SIDE_PX, DEFAULT_SIDE_PX, 1), (720, 720, 2))  # the second: no more pixels than the first
MIN_SIDE_PX, MAX_SIDE_PX = 256, 2048
SIDE_MULTIPLE_PX = 16  # VAE factor 8 x patch size 2
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
#: After a cancel (or at the shutdown bound), how long the service waits for the running job to stop: it
#: stops at the end of the current denoising step, which on a slow CPU can take seconds at 1024x1024.
CANCEL_WAIT_S = 30.0
#: How long a check of the outputs folder (for /healthz) stays valid, in seconds.
OUTPUTS_CHECK_S = 5.0
#: Outcomes counted per request, from every front door.
OUTCOMES = ("ok", "invalid", "busy", "cancelled", "failed", "not_ready")

ProgressCallback = Callable[[Progress], None]
__all__ = ["MAX_PROMPT_TOKENS", "GenerationRequest", "GenerationResult", "GenerationService", "validate_request"]


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for. ``seed=None`` draws a random seed (returned in the result); ``steps=None`` and
    ``guidance_scale=None`` take the loaded model's defaults (:attr:`GenerationService.defaults`: Turbo 8 and 0,
    Z-Image base 28 and 4)."""

    prompt: str
    width: int = DEFAULT_SIDE_PX
    height: int = DEFAULT_SIDE_PX
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    #: Image-to-image: the input (PIL RGB, exactly width x height: zimage.uploads.fit_to_size) and how much
    #: of it is repainted (0-1]; inpainting adds a mask (PIL L, white = repaint, same size).
    image: Any = field(default=None, repr=False, compare=False)
    mask: Any = field(default=None, repr=False, compare=False)
    strength: float | None = None
    #: What the inputs were, for the PNG metadata: (file name, sha256) or (file name, sha256, role), role one of
    #: "image", "mask", "control_image".
    inputs: tuple[tuple[str, ...], ...] = ()
    #: What the image should not show; used only when guidance is on (guidance_scale > 0).
    negative_prompt: str = ""
    #: LoRA adapters for this request: (name in the LoRA folder, weight in [-2, 2]), at most 4.
    loras: tuple[tuple[str, float], ...] = ()
    #: ControlNet: the control image (PIL RGB, width x height) and how strongly it steers (None: the default).
    control_image: Any = field(default=None, repr=False, compare=False)
    controlnet_conditioning_scale: float | None = None

    @property
    def mode(self) -> str:
        """"text", "img2img", "inpaint", "controlnet" or "controlnet_inpaint" (a control image and a mask)."""
        if self.control_image is not None:
            return "controlnet_inpaint" if self.mask is not None else "controlnet"
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "text"

    @property
    def size(self) -> RequestSize:
        """What this request asks of memory (meaningful once validated: defaults filled in)."""
        guidance = isinstance(self.guidance_scale, (int, float)) and self.guidance_scale > 0
        return RequestSize(self.width, self.height, self.num_images, guidance,
                           encode=self.image is not None or self.control_image is not None,
                           controlnet=self.control_image is not None)


@dataclass(frozen=True)
class GenerationResult:
    """Saved images and everything needed to reproduce and explain them."""

    request_id: str
    paths: tuple[Any, ...]
    # Image i starts from the noise of seeds[i] = seed + i, the same noise as a single image with that
    # seed (batched bf16 arithmetic can still move some pixels by a few levels).
    seeds: tuple[int, ...]
    request: GenerationRequest
    plan: MemoryPlan
    timings: dict[str, float]
    warnings: tuple[str, ...] = ()
    recoveries: tuple[str, ...] = ()
    gpu_peak_bytes: int | None = None
    images: tuple[Any, ...] = field(default=(), repr=False)  # PIL images
    #: The LoRA adapters used: {"name", "weight", "sha256"} each, in the request's order.
    loras: tuple[dict[str, Any], ...] = ()
    #: Peak allocated and reserved GPU bytes of each stage (encode, denoise, decode); empty on the CPU.
    stage_peaks: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.seeds[0]

    def info(self) -> dict[str, Any]:
        """JSON-ready summary for the API and the UI."""
        return {
            "request_id": self.request_id,
            "seed": self.seed,
            "seeds": list(self.seeds),
            "width": self.request.width,
            "height": self.request.height,
            "steps": self.request.steps,
            "guidance_scale": self.request.guidance_scale,
            "num_images": self.request.num_images,
            "mode": self.request.mode,
            "profile": self.plan.describe(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "recoveries": list(self.recoveries),
            "files": [p.name for p in self.paths],
            "loras": [dict(lora) for lora in self.loras],
        }


@dataclass(frozen=True)
class _Rendered:
    """What the GPU produced for a job, handed from the GPU worker to the saving thread."""

    pixels: Any
    plan: MemoryPlan
    generate_s: float
    warnings: tuple[str, ...]
    recoveries: tuple[str, ...]
    gpu_peak_bytes: int | None
    loras: tuple[dict[str, Any], ...] = ()  # {"name", "weight", "sha256"} of the adapters that were on
    #: Per stage (encode, denoise, decode): seconds, and peak allocated/reserved GPU bytes on CUDA (StageMeter).
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class ServiceStats:
    """Counters for metrics; read with :meth:`GenerationService.stats`."""

    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    oom_recoveries: int = 0
    nan_retries: int = 0
    images_generated: int = 0
    generation_seconds_total: float = 0.0
    last_gpu_peak_bytes: int | None = None
    last_gpu_allocated_bytes: int | None = None


def _nearest_multiples(value: int) -> str:
    low = max(MIN_SIDE_PX, value - value % SIDE_MULTIPLE_PX)
    high = min(MAX_SIDE_PX, low + SIDE_MULTIPLE_PX)
    return f"{low} or {high}" if low != high else str(low)


def _is_whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_request(request: GenerationRequest, *, draw_seed: Callable[[], int] | None = None,
                     defaults: ModelDefaults = TURBO) -> GenerationRequest:
    """Check every parameter; return the request with the prompt trimmed, a seed filled in, and the steps and
    guidance the caller left out (None) taken from ``defaults`` (the loaded model's, :mod:`zimage.model_family`).

    Types are refused, never coerced: 256.5 pixels, ``True`` steps or a prompt that is not text are errors.
    Raises :class:`ValidationError` naming the value and the allowed range.
    """
    request = replace(request, steps=defaults.steps if request.steps is None else request.steps,
                      guidance_scale=defaults.guidance_scale if request.guidance_scale is None
                      else request.guidance_scale)
    if not isinstance(request.prompt, str):
        raise ValidationError(f"prompt={_shown(request.prompt)} must be text.", param="prompt")
    prompt = request.prompt.strip()
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"prompt has a character that is not valid text at position {exc.start} (a lone "
                              "surrogate): send the prompt as UTF-8.", param="prompt") from None
    if not prompt:
        raise ValidationError("prompt is empty: describe the image you want.", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationError(f"prompt is {len(prompt)} characters long: the limit is {MAX_PROMPT_CHARS} "
                              f"(and the text encoder reads only its first {MAX_PROMPT_TOKENS} tokens).",
                              param="prompt")
    for name in ("width", "height"):
        value = getattr(request, name)
        if not _is_whole_number(value):
            raise ValidationError(f"{name}={_shown(value)} must be a whole number of pixels.", param=name)
        if not MIN_SIDE_PX <= value <= MAX_SIDE_PX:
            raise ValidationError(f"{name}={value} is out of range: use {MIN_SIDE_PX} to {MAX_SIDE_PX} pixels.",
                                  param=name)
        if value % SIDE_MULTIPLE_PX:
            raise ValidationError(f"{name}={value} is not a multiple of {SIDE_MULTIPLE_PX}: use "
                                  f"{_nearest_multiples(value)}.", param=name)
    if not _is_whole_number(request.steps):
        raise ValidationError(f"steps={_shown(request.steps)} must be a whole number from {MIN_STEPS} to {MAX_STEPS} "
                              f"({defaults.name}'s default is {defaults.steps}).", param="steps")
    if not MIN_STEPS <= request.steps <= MAX_STEPS:
        raise ValidationError(f"steps={request.steps} is out of range: use a whole number from {MIN_STEPS} to "
                              f"{MAX_STEPS} ({defaults.name}'s default is {defaults.steps}).", param="steps")
    guidance = request.guidance_scale
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool):
        raise ValidationError(f"guidance_scale={_shown(guidance)} must be a number from 0 to {MAX_GUIDANCE:g} "
                              f"({defaults.name}'s default is {defaults.guidance_scale:g}).", param="guidance_scale")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise ValidationError(f"guidance_scale={_shown(guidance)} is out of range: use 0 to {MAX_GUIDANCE:g} "
                              f"({defaults.name}'s default is {defaults.guidance_scale:g}).", param="guidance_scale")
    negative_prompt = _validate_negative_prompt(request.negative_prompt)
    if not _is_whole_number(request.num_images):
        raise ValidationError(f"num_images={_shown(request.num_images)} must be a whole number from 1 to {MAX_IMAGES}.",
                              param="num_images")
    if not 1 <= request.num_images <= MAX_IMAGES:
        raise ValidationError(f"num_images={request.num_images} is out of range: use a whole number from 1 to "
                              f"{MAX_IMAGES}.", param="num_images")
    seed = request.seed
    if seed is None:
        seed = (draw_seed or (lambda: secrets.randbelow(MAX_SEED + 1 - MAX_IMAGES)))()
    if not _is_whole_number(seed):
        raise ValidationError(f"seed={_shown(seed)} must be a whole number from 0 to {MAX_SEED}, or empty (-1 in "
                              "the page and the API) for a random seed.", param="seed")
    if not 0 <= seed <= MAX_SEED:
        raise ValidationError(f"seed={_shown(seed)} is out of range: use a whole number from 0 to {MAX_SEED}, or "
                              "leave it empty (-1 in the page and the API) for a random seed.", param="seed")
    if seed + request.num_images - 1 > MAX_SEED:
        raise ValidationError(f"seed={seed} with num_images={request.num_images} runs past {MAX_SEED} "
                              "(image i uses seed + i): use a smaller seed.", param="seed")
    request = replace(request, loras=validate_loras(request.loras))  # names are checked against the folder at submit
    return replace(request, prompt=prompt, seed=seed, guidance_scale=float(guidance), negative_prompt=negative_prompt,
                   **_validate_inputs(request))


def _validate_negative_prompt(value: Any) -> str:
    """The negative prompt trimmed ("" when none); text under the prompt's limits."""
    if not isinstance(value, str):
        raise ValidationError(f"negative_prompt={_shown(value)} must be text (empty for none).",
                              param="negative_prompt")
    text = value.strip()
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError(f"negative_prompt has a character that is not valid text at position {exc.start} (a "
                              "lone surrogate): send it as UTF-8.", param="negative_prompt") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise ValidationError(f"negative_prompt is {len(text)} characters long: the limit is {MAX_PROMPT_CHARS}.",
                              param="negative_prompt")
    return text


#: diffusers' defaults: image-to-image keeps 40% of the input's structure, inpainting repaints the masked area.
DEFAULT_STRENGTH = {"img2img": 0.6, "inpaint": 1.0}
#: The ControlNet's conditioning scale: diffusers' default and the range accepted (0 turns the ControlNet off;
#: alibaba-pai recommends 0.65-0.80 for its Union ControlNet; above 1 over-steers).
MIN_CONTROLNET_SCALE, MAX_CONTROLNET_SCALE = 0.0, 2.0


def _validate_inputs(request: GenerationRequest) -> dict[str, Any]:
    """Check the input image, mask, control image, strength and ControlNet scale of the image modes; returns the
    fields to set: ``strength`` (None for text, ControlNet and ControlNet inpainting) and
    ``controlnet_conditioning_scale`` (None without a control image)."""
    if request.mask is not None and request.image is None:
        raise ValidationError("a mask needs an image to repaint: send the image too (inpainting).", param="image")
    control = request.control_image is not None
    if control and request.image is not None and request.mask is None:
        raise ValidationError("a control image with an input image but no mask: diffusers has no ControlNet "
                              "image-to-image for Z-Image. Send a mask too (ControlNet inpainting), or leave the "
                              "input image out (ControlNet from the prompt).", param="mask")
    for name, picture in (("image", request.image), ("mask", request.mask), ("control image", request.control_image)):
        if picture is not None and tuple(getattr(picture, "size", ())) != (request.width, request.height):
            raise ValidationError(f"the {name} is {getattr(picture, 'size', '?')} but the request is "
                                  f"{request.width}x{request.height}: resize it to the request's size.",
                                  param=name.replace(" ", "_"))
    scale = request.controlnet_conditioning_scale
    if not control:
        if scale is not None:
            raise ValidationError(f"controlnet_conditioning_scale={_shown(scale)} applies only with a control image: "
                                  "send one, or leave the scale out.", param="controlnet_conditioning_scale")
    else:
        scale = render.DEFAULT_CONTROLNET_SCALE if scale is None else scale
        if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                or not MIN_CONTROLNET_SCALE <= scale <= MAX_CONTROLNET_SCALE):
            raise ValidationError(f"controlnet_conditioning_scale={_shown(scale)} is out of range: use "
                                  f"{MIN_CONTROLNET_SCALE:g} to {MAX_CONTROLNET_SCALE:g} (how strongly the control "
                                  f"image steers; default {render.DEFAULT_CONTROLNET_SCALE:g}, 0 ignores it).",
                                  param="controlnet_conditioning_scale")
        scale = float(scale)
    if request.image is None or control:
        if request.strength is not None and request.image is not None:
            raise ValidationError(f"strength={_shown(request.strength)} does not apply to ControlNet inpainting "
                                  "(diffusers' ZImageControlNetInpaintPipeline has no strength: the masked area is "
                                  "repainted in full): leave strength out.", param="strength")
        if request.strength is not None:
            raise ValidationError(f"strength={_shown(request.strength)} applies to image-to-image and inpainting: "
                                  "send an image, or leave strength out.", param="strength")
        return {"strength": None, "controlnet_conditioning_scale": scale}
    strength = DEFAULT_STRENGTH[request.mode] if request.strength is None else request.strength
    if not isinstance(strength, (int, float)) or isinstance(strength, bool):
        raise ValidationError(f"strength={_shown(strength)} must be a number: more than 0 and at most 1 (how much of "
                              "the input is repainted; default 0.6 for image-to-image, 1.0 for inpainting).",
                              param="strength")
    if not 0 < strength <= 1:
        raise ValidationError(f"strength={_shown(strength)} is out of range: use more than 0 and at most 1 (how much "
                              "of the input is repainted; default 0.6 for image-to-image, 1.0 for inpainting).",
                              param="strength")
    if render.steps_run(request.steps, strength) < 1:
        # diffusers skips the first (1 - strength) of the schedule: nothing would be left to run.
        raise ValidationError(f"strength={_shown(strength)} with steps={request.steps} runs no denoising step: use a "
                              f"strength of at least {1 / request.steps:.3g} (1/steps), or more steps.",
                              param="strength")
    return {"strength": float(strength), "controlnet_conditioning_scale": None}


PipelineFactory = Callable[[Any, MemoryPlan], Any]
FatalHandler = Callable[[str], None]
JobListener = Callable[[Job], None]


class GenerationService:
    """Owns one pipeline and every job. :meth:`submit` and :meth:`generate` are safe to call from any thread.

    ``on_fatal(message)`` is called when the service cannot go on (a failed reload with no fallback, a
    CUDA error that broke the context): the entry point exits non-zero so a supervisor restarts it.
    """

    def __init__(self, settings: Settings, *, devices: DeviceFacts | None = None,
                 pipeline_factory: PipelineFactory | None = None, store: OutputStore | None = None,
                 on_fatal: FatalHandler | None = None) -> None:
        self.settings = settings
        self.store = store or OutputStore(settings.outputs_dir)
        self.on_fatal = on_fatal
        self._devices = devices
        self._factory = pipeline_factory
        self._pipe: Any = None
        self._source: Any = None
        self._sizes: Any = None
        #: The placement requests return to, and the one the loaded pipeline has now.
        self.base_plan: MemoryPlan | None = None
        self.plan: MemoryPlan | None = None
        self.state = "starting"  # starting -> loading -> ready | failed; stopping at shutdown
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.queue = JobQueue(settings.queue_size, on_cancelled=lambda job: self._end(
            job, error=GenerationCancelled("The generation was cancelled before it started.")))
        self._stats_lock = threading.Lock()
        self._stats = ServiceStats()
        self._running: Job | None = None
        self._saving = 0
        self._idle = threading.Condition()
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        self._saver: ThreadPoolExecutor | None = None
        self._finished_listeners: list[JobListener] = []
        self._outputs_checked: tuple[float, str | None] | None = None
        self._mode_pipes: dict[str, Any] = {}
        self._closing = False
        #: The ControlNet (--controlnet): where it comes from, and the loaded model (None without one).
        self._controlnet_source: Any = None
        self._controlnet: Any = None
        self._controlnet_inpaint: bool | None = None  # the loaded ControlNet has an inpainting input
        #: The transformer's attention kernel in use ("native", "flash", ...), set when the model loads.
        self.attention_backend: str | None = None
        self._defaults: ModelDefaults | None = None
        #: LoRA files (listed and checked from any thread) and the adapters loaded in the pipeline (GPU worker only).
        self._lora_folder = LoraFolder(settings.lora_folder, self._lora_modules)
        self._lora_adapters = LoraAdapters()
        self._lora_table: tuple[bool, Any] | None = None  # (built from the loaded pipeline?, layer table)
        #: Prompt embeddings in host RAM (zimage.prompt_cache): a hit skips the text encoder. Cleared on every reload.
        #: Entries are (the device the encoder left them on, host copies).
        self.prompt_cache = PromptCache(settings.prompt_cache_mb * 1024 * 1024,
                                        lambda entry: render.embeds_nbytes(entry[1]))

    # --- Loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Probe the hardware, resolve the model, plan memory, load the pipeline and start the GPU worker.

        Raises the :class:`ZImageError` (model not found, plan impossible) after recording it.
        """
        from .loader import (
            component_sizes,
            load_pipeline,
            model_defaults,
            plan_for,
            resolve_controlnet_source,
            resolve_model_source,
        )

        self.state = "loading"
        started = time.perf_counter()
        try:
            if self._devices is None:
                self._devices = probe_devices(measure_throughput=True)  # the planner's time model: rates on CUDA
            self._source = resolve_model_source(self.settings)
            self._controlnet_source = resolve_controlnet_source(self.settings, self._source)
            self._defaults = model_defaults(self.settings, self._source)
            log.info("request defaults of %s: %d steps, guidance %g (%s)", self._defaults.label, self._defaults.steps,
                     self._defaults.guidance_scale, self._defaults.reason)
            self._sizes = component_sizes(self._source, self._controlnet_source)
            self.plan = self.base_plan = plan_for(self.settings, self._devices, self._sizes)
            for warning in self.plan.warnings:
                log.warning("%s", warning)
            log.info("memory plan: %s: %s", self.plan.describe(), self.plan.reason)
            self._factory = self._factory or load_pipeline
            self.plan = self.base_plan = self._load_models(self.plan)
        except (ZImageError, PlanError) as exc:
            self.state, self.load_error = "failed", str(exc)
            raise
        except Exception as exc:
            self.state, self.load_error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        self.load_seconds = time.perf_counter() - started
        self._start_threads()
        self.state = "stopping" if self._stopping.is_set() else "ready"
        log.info("model %s ready in %.1f s", self.model_label, self.load_seconds)

    def _start_threads(self) -> None:
        if self._worker is None:
            # Daemon: a stop must never wait on a thread stuck in a CUDA call; shutdown cancels jobs first.
            self._worker = threading.Thread(target=self._work, name="zimage-gpu", daemon=True)
            self._worker.start()
            self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zimage-save")

    @property
    def model_label(self) -> str:
        return self._source.label if self._source is not None else self.settings.model_source

    @property
    def is_demo(self) -> bool:
        return bool(self._source is not None and self._source.is_demo)

    @property
    def defaults(self) -> ModelDefaults:
        """The loaded model's request defaults (:class:`~zimage.model_family.ModelDefaults`: ``steps``,
        ``guidance_scale``, ``negative_prompt``, ``uses_guidance``, ``supports_negative_prompt``, ``steps_note``,
        ``label``); before :meth:`load`, what the settings and any local files say."""
        if self._defaults is None:
            from .loader import model_defaults

            self._defaults = model_defaults(self.settings)
        return self._defaults

    @property
    def has_controlnet(self) -> bool:
        """True when a ControlNet is configured (``--controlnet``, or ``--demo`` alone): the controlnet modes work."""
        if self._controlnet_source is not None:
            return True
        return self._source is None and bool(self.settings.controlnet_choice)

    @property
    def controlnet_label(self) -> str | None:
        """The configured ControlNet's id or path (``"demo ControlNet (random weights)"`` for the demo), or None."""
        if self._controlnet_source is not None:
            return self._controlnet_source.label
        return self.settings.controlnet_choice or None

    def _check_controlnet(self, request: GenerationRequest) -> None:
        """A control image needs a configured ControlNet; ControlNet inpainting needs one trained for it."""
        if request.mode not in render.CONTROLNET_MODES:
            return
        if not self.has_controlnet:
            raise ValidationError("a control image needs a ControlNet and this server runs without one: start it "
                                  "with --controlnet ID_OR_PATH (e.g. alibaba-pai/Z-Image-Turbo-Fun-Controlnet-"
                                  "Union-2.1, or ZIMAGE_CONTROLNET), or leave the control image out.")
        if self.base_plan is not None and self.base_plan.profile == "sequential-offload":
            from .loader import SEQUENTIAL_CONTROLNET

            raise ValidationError(f"This server runs on sequential offload, and {SEQUENTIAL_CONTROLNET}")
        if request.mode == "controlnet_inpaint" and self._controlnet_inpaint is False:
            raise ValidationError(f"the ControlNet {self.controlnet_label!r} has no inpainting input (its control "
                                  "input is the control image's latents alone, as in Union 1.0): send the control "
                                  "image without image and mask, or use a ControlNet Union 2.0/2.1.")

    def _negative_prompt_warnings(self, request: GenerationRequest) -> list[str]:
        """Say so when a negative prompt cannot act (no guidance), or is cut by the text encoder."""
        if not request.negative_prompt:
            return []
        if request.guidance_scale <= 0:
            return ["The negative prompt was not used: it takes effect only with guidance (guidance_scale > 0)."]
        count = render.prompt_token_count(self._pipe, request.negative_prompt)
        if count is None or count <= MAX_PROMPT_TOKENS:
            return []
        return [f"The negative prompt is {count} tokens long with its chat template; the text encoder reads the "
                f"first {MAX_PROMPT_TOKENS}."]

    @property
    def busy(self) -> bool:
        """True while a job runs on the pipeline (saving is not counted: the GPU is free then)."""
        return self._running is not None

    def queue_depth(self) -> int:
        """Jobs waiting for the GPU plus the one running."""
        return len(self.queue) + (1 if self._running is not None else 0)

    def outputs_problem(self) -> str | None:
        """Why the outputs folder cannot take images now (missing, unwritable, full), or None. Checked at most
        every :data:`OUTPUTS_CHECK_S` seconds: health checks come often and the check writes a probe file."""
        now = time.monotonic()
        if self._outputs_checked is None or now - self._outputs_checked[0] > OUTPUTS_CHECK_S:
            self._outputs_checked = (now, self.store.problem())
        return self._outputs_checked[1]

    def stats(self) -> ServiceStats:
        """A copy of the counters."""
        with self._stats_lock:
            return replace(self._stats, outcomes=dict(self._stats.outcomes))

    def add_finished_listener(self, listener: JobListener) -> None:
        """Call ``listener(job)`` once per job when it ends (any outcome), e.g. for metrics."""
        self._finished_listeners.append(listener)

    # --- LoRA adapters (zimage.lora) -----------------------------------------------------------------
    def list_loras(self) -> list[LoraFile]:
        """The LoRA folder's files, sorted by name; ``item.info()`` is JSON-ready: {"name", "size_bytes", "fits",
        "problem", "format"}. Reads only safetensors headers. Works before the model is loaded (the files are
        then judged against the configured model's architecture). Safe from any thread."""
        return self._lora_folder.list()

    def check_loras(self, loras: tuple[tuple[str, float], ...]) -> None:
        """Raise :class:`LoraError` unless each (name, weight) of validated ``loras`` names a file of the LoRA folder
        that fits this model (unknown names get the list of usable ones). :meth:`submit` checks this itself; front
        doors may call it earlier, e.g. the command line before it loads the model."""
        self._lora_folder.check(loras)

    def loaded_loras(self) -> list[str]:
        """LoRA names whose adapters are loaded in the pipeline now, least recently used first."""
        return self._lora_adapters.loaded()

    def lora_problem(self) -> str | None:
        """Why no request can use LoRAs on the current base placement (fp8 weight storage), with the fix; or None."""
        return placement_problem(self.base_plan) if self.base_plan is not None else None

    def _lora_modules(self) -> Any:
        """The transformer's layer table LoRA files are judged against: from the loaded pipeline's config, or
        before loading from the settings (the demo, a local folder's config, the published model)."""
        from .lora import transformer_config_for, transformer_modules

        pipe = self._pipe
        if self._lora_table is None or (pipe is not None and not self._lora_table[0]):
            config = dict(pipe.transformer.config) if pipe is not None else transformer_config_for(self.settings)
            self._lora_table = (pipe is not None, transformer_modules(config))
        return self._lora_table[1]

    def _check_loras(self, request: GenerationRequest, plan: MemoryPlan | None) -> None:
        """At submit: every LoRA is in the folder and fits, and ``plan`` can take adapters. Raises LoraError."""
        if not request.loras:
            return
        self.check_loras(request.loras)
        problem = placement_problem(plan) if plan is not None else None
        if problem:
            raise LoraError(problem)

    def _activate_loras(self, job: Job, request: GenerationRequest, plan: MemoryPlan) -> tuple[dict[str, Any], ...]:
        """On the GPU worker, before a render attempt: switch on the request's adapters (loading them when not
        cached or changed on disk), or make sure every adapter is off. Raises LoraError naming the file."""
        if not request.loras:
            if self.plan.compiled and self._lora_adapters.loaded():
                # The compiled graph is the original layers': without them every request would run eagerly.
                self._lora_adapters.unload(self._pipe)
            else:
                self._lora_adapters.deactivate(self._pipe)
            return ()
        problem = placement_problem(plan)  # a recovery step may have moved to a placement that cannot take them
        if problem:
            raise LoraError(problem)
        files = self._lora_folder.check(request.loras)
        weights = dict(request.loras)

        def loading(name: str) -> None:
            job.update(note=f"loading LoRA {name}")

        try:
            return self._lora_adapters.activate(self._pipe, [(item, weights[item.name]) for item in files],
                                                on_loading=loading)
        except LoraLoadFailed:
            if plan.profile in ("model-offload", "sequential-offload"):
                # diffusers took the offload hooks off for the load and puts them back only after a success.
                log.warning("a LoRA failed to load on %s: reloading the pipeline to restore its offload hooks",
                            plan.describe())
                self._reload(plan)
            raise
        finally:
            job.update(note="")

    def _loras_off(self) -> None:
        """After a job: switch the adapters off, so the next job without LoRAs computes as if none was loaded.

        Never raises (it runs on the GPU worker after the job ended): a failure is logged, the adapters stay
        marked as on, and the next job switches them off before it renders or fails with the error.
        """
        if self._pipe is None:
            return
        try:
            self._lora_adapters.deactivate(self._pipe)
        except Exception:  # noqa: BLE001 - the worker must go on
            log.exception("switching the LoRA adapters off failed")

    def count_outcome(self, outcome: str) -> None:
        """Count a request outcome decided outside :meth:`submit` (a front door's own busy refusal)."""
        with self._stats_lock:
            self._stats.outcomes[outcome] += 1

    def _count(self, **increments: float) -> None:
        with self._stats_lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    # --- Submitting ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, *, request_id: str | None = None,
               on_progress: ProgressCallback | None = None) -> Job:
        """Validate and admit a job; it runs when the GPU worker reaches it. Returns at once.

        ``on_progress(progress)`` is called on every change of the job, from the first (its place in the queue).

        Raises :class:`ValidationError` (bad parameter; :class:`RequestTooLarge` when nothing on this GPU fits
        the size; :class:`LoraError` for a LoRA that is not in the folder, does not fit this model or this
        placement), :class:`ServiceNotReady` (loading, failed, shutting down) or :class:`QueueFull`.
        """
        request_id = request_id or uuid.uuid4().hex[:12]
        try:
            request = validate_request(request, defaults=self.defaults)
            self._check_controlnet(request)
        except ValidationError as exc:
            self._refused(request_id, request, "invalid", exc)
            raise
        if self._stopping.is_set() or self.state != "ready":
            error = ServiceNotReady(self._not_ready_message())
            self._refused(request_id, request, "not_ready", error)
            raise error
        problem = self.outputs_problem()
        if problem is not None:  # do not spend GPU time on images that cannot be saved
            error = ServiceNotReady(f"Images cannot be saved now: {problem}")
            self._refused(request_id, request, "not_ready", error)
            raise error
        decision = plan_request(self.base_plan, self._sizes, request.size, allow_fp8=self.settings.recovery_fp8)
        if decision.refusal:
            error = RequestTooLarge(decision.refusal)
            self._refused(request_id, request, "invalid", error)
            raise error
        try:
            self._check_loras(request, decision.plan)
        except ValidationError as exc:  # unknown, pickle, foreign or ill-fitting LoRA; fp8 placement
            self._refused(request_id, request, "invalid", exc)
            raise
        job = Job(request_id, request)
        if on_progress is not None:
            job.add_listener(lambda changed: on_progress(changed.progress))
        try:
            self.queue.put(job)
        except (QueueFull, ServiceNotReady) as exc:
            self._refused(request_id, request, "busy" if isinstance(exc, QueueFull) else "not_ready", exc)
            raise
        return job

    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 request_id: str | None = None) -> GenerationResult:
        """Submit and wait: the synchronous form for scripts and benchmarks (to cancel, use :meth:`submit` and
        the job's ``cancel()``).

        Raises what :meth:`submit` raises, or the job's error (:class:`GenerationCancelled`,
        :class:`OutOfMemoryAfterRetries`, ...).
        """
        return self.submit(request, request_id=request_id, on_progress=on_progress).result()

    def _refused(self, request_id: str, request: Any, outcome: str, error: Exception) -> None:
        self.count_outcome(outcome)
        if outcome != "busy":  # a burst of busy refusals would flood the log; metrics count them
            self._log_job(request_id, request, "rejected" if outcome == "invalid" else outcome, time.monotonic(),
                          error=str(error))

    def _not_ready_message(self) -> str:
        if self._stopping.is_set():
            return "The service is shutting down: try again in a moment."
        if self.state == "failed":
            return f"The model failed to load: {self.load_error}"
        return "The model is still loading: try again in a moment."

    # --- Shutdown ----------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new jobs from now on and cancel the waiting ones (they never start); the running one continues."""
        self._stopping.set()
        if self.state == "ready":
            self.state = "stopping"
        for job in self.queue.close("The service is shutting down: try again in a moment."):
            job.cancel("shutdown")

    def wait_idle(self, timeout_s: float, cancel_wait_s: float = CANCEL_WAIT_S) -> bool:
        """Wait for the running job (and its saving); cancel it if it outlasts ``timeout_s``. True when idle.

        After a cancel the job stops within one denoising step; this waits at most ``cancel_wait_s`` more.
        """
        if self._wait_idle(time.monotonic() + timeout_s):
            return True
        running = self._running
        if running is not None:
            log.warning("the running job outlasted the %.0f s shutdown bound: cancelling it", timeout_s)
            running.cancel("shutdown")
        return self._wait_idle(time.monotonic() + cancel_wait_s)

    def _wait_idle(self, deadline: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._running is None and self._saving == 0 and not len(self.queue),
                                       max(0.0, deadline - time.monotonic()))

    def unload(self) -> None:
        """Stop taking jobs and drop the pipeline (for tests and tools); the service is then not ready."""
        self.begin_shutdown()
        self.wait_idle(0)
        self._pipe, self._mode_pipes, self._controlnet = None, {}, None
        self.prompt_cache.clear()  # a new pipeline: its text encoder may differ (dtype, fp8 storage)
        self._lora_adapters.reset()  # a pipeline loaded later has no adapters
        self.state = "starting"
        release_memory()

    # --- The GPU worker --------------------------------------------------------------------------
    def close(self, timeout_s: float = CANCEL_WAIT_S) -> None:
        """Stop the GPU worker and the saving thread (for the CLI and tests): waiting jobs are cancelled, the
        running one is cancelled and waited for. A process must not exit while the worker is inside torch
        (the C++ runtime aborts it)."""
        self.begin_shutdown()
        self._closing = True
        running = self._running
        if running is not None:
            running.cancel("the service closed")
        if self._worker is not None:
            self._worker.join(timeout_s)
        if self._saver is not None:
            self._saver.shutdown(wait=True)

    def _work(self) -> None:
        while True:
            job = self.queue.get(timeout=0.5)
            if job is None:
                if self._closing or self.queue.closed:  # nothing can come any more (and get() would not wait)
                    return
                continue
            with self._idle:
                self._running = job
            try:
                self._run(job)
            finally:
                with self._idle:
                    self._running = None
                    self._idle.notify_all()

    def _run(self, job: Job) -> None:
        job.started = time.monotonic()
        job.update(state=RUNNING, stage="encoding", position=0, waiting=0)
        if self.plan is not None:
            reset_gpu_peak(self.plan.device)  # this job's peak only: nothing else runs on the GPU now
        try:
            rendered = self._render(job)
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded on the job
            self._end(job, error=exc)
            return
        finally:
            self._loras_off()
        stats = gpu_memory_stats(rendered.plan.device)
        rendered = replace(rendered, gpu_peak_bytes=max(
            (row["peak_allocated_bytes"] for row in rendered.stages.values() if "peak_allocated_bytes" in row),
            default=stats.get("peak_allocated_bytes")))
        with self._stats_lock:
            self._stats.last_gpu_allocated_bytes = stats.get("allocated_bytes")
        job.update(state=SAVING, stage="saving")
        with self._idle:
            self._saving += 1
        # Saving overlaps the next job's denoising: the pipeline is free now.
        self._saver.submit(self._save, job, rendered)

    def _save(self, job: Job, rendered: _Rendered) -> None:
        try:
            job.raise_if_cancelled()  # cancelled after the decode: the client was told, nothing is saved
            result = self._save_result(job, rendered)
        except BaseException as exc:  # noqa: BLE001
            self._end(job, error=exc)
        else:
            self._end(job, result=result)
        finally:
            with self._idle:
                self._saving -= 1
                self._idle.notify_all()

    def _end(self, job: Job, *, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        """Record the job's outcome (counters, one JSON log line) and make it final."""
        request = job.request
        if error is None:
            self._count(images_generated=len(result.paths), generation_seconds_total=result.timings["generate_s"])
            with self._stats_lock:
                self._stats.outcomes["ok"] += 1
                self._stats.last_gpu_peak_bytes = result.gpu_peak_bytes
            self._log_job(job.id, request, "ok", job.created, result=result)
        elif isinstance(error, GenerationCancelled):
            self.count_outcome("cancelled")
            progress = job.progress  # where it stopped: a cancel never reaches "decoding"
            self._log_job(job.id, request, "cancelled", job.created, error=str(error), reason=job.cancel_reason,
                          stage=progress.stage, step=progress.step)
        elif isinstance(error, ZImageError):
            self.count_outcome("failed")
            self._log_job(job.id, request, "failed", job.created, error=str(error))
        else:
            self.count_outcome("failed")
            log.error("job %s failed", job.id, exc_info=error)
            self._log_job(job.id, request, "error", job.created, error=f"{type(error).__name__}: {error}")
            error = ZImageError(f"Internal error (request {job.id}): the server log has the details.")
        job.finish(result=result, error=error)
        for listener in list(self._finished_listeners):
            try:
                listener(job)
            except Exception:  # noqa: BLE001 - metrics must never break the service
                log.exception("a job listener failed")

    # --- One render, with its recovery -------------------------------------------------------------
    def _render(self, job: Job) -> _Rendered:
        """Encode, denoise and decode ``job`` on its placement, following the recovery policy on errors."""
        import numpy as np

        request: GenerationRequest = job.request
        size = request.size
        decision = plan_request(self.base_plan, self._sizes, size, allow_fp8=self.settings.recovery_fp8)
        if decision.refusal:  # the base was re-planned since the job was admitted
            raise RequestTooLarge(decision.refusal)
        attempt = decision.plan
        warnings = (self._prompt_warnings(request.prompt) + list(decision.notes)
                    + self._negative_prompt_warnings(request))
        for note in decision.notes:
            log.info("request %s: %s", job.id, note)
        recoveries: list[str] = []
        seeds = [request.seed + i for i in range(request.num_images)]
        latents = None
        nan_retried = False
        used_loras: tuple[dict[str, Any], ...] = ()
        started = time.perf_counter()
        meter = StageMeter(attempt.device)
        compiled = False
        while True:
            job.raise_if_cancelled()
            self._place(job, attempt)
            meter.restart()  # a reload is not a stage's time
            stage, failure = ENCODE, None
            try:
                if latents is None:
                    job.update(stage="encoding", step=0, total=request.steps)
                    used_loras = self._activate_loras(job, request, attempt)  # after _place: a reload drops them
                    embeds = self._encode(request, attempt)
                    meter.end("encode")
                    job.raise_if_cancelled()
                    stage = DENOISE
                    job.update(stage="denoising")
                    job.update(total=steps_run(request.steps, request.strength))
                    mode_pipe = self._mode_pipe(request.mode)
                    # Compiled blocks only while no LoRA adapter is in the transformer: peft's layers change the
                    # graph, and compiling again would stall this request for tens of seconds (zimage.attention). A
                    # request without LoRAs takes them out again (_activate_loras).
                    compiled = (self.plan.compiled and device_available(self.plan.device)
                                and not self._lora_adapters.loaded())
                    with denoise_placement(mode_pipe, self._pipe, attempt), compiled_or_eager(compiled):
                        latents = render.denoise(
                            mode_pipe, embeds, width=request.width, height=request.height,
                            steps=request.steps, guidance_scale=request.guidance_scale, seeds=seeds,
                            on_step=lambda step, total: job.update(step=step, total=total),
                            should_stop=lambda: job.cancel_requested, image=request.image, mask=request.mask,
                            strength=request.strength, control_image=request.control_image,
                            controlnet_conditioning_scale=request.controlnet_conditioning_scale,
                            cfg_normalization=self.defaults.cfg_normalization)
                    del embeds
                    meter.end("denoise")
                job.raise_if_cancelled()  # never decode a cancelled job
                stage = DECODE
                job.update(stage="decoding")
                pixels = render.decode(self._pipe, latents)
                meter.end("decode")
                job.raise_if_cancelled()  # cancelled while decoding: the client was told, nothing is saved
            except GenerationCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below; anything unknown is re-raised
                kind = classify_error(exc)
                if kind is None and stage == DENOISE and compiled:
                    # A compiled graph that fails (a recompile limit, a kernel torch cannot build for this shape)
                    # costs speed, not the request: this one and the next run eagerly.
                    log.warning("request %s: the compiled transformer failed (%s: %s): running eagerly from now on",
                                job.id, type(exc).__name__, _first_line(exc))
                    self.plan = replace(self.plan, compiled=False)
                    self.base_plan = replace(self.base_plan, compiled=False)
                    attempt = replace(attempt, compiled=False)
                    latents = None
                    continue
                if kind is None:
                    raise
                failure = (kind, _first_line(exc))
            if failure is None:
                if np.isnan(pixels).any():
                    if nan_retried:
                        raise NaNOutputError(f"The image came out as NaN (black) in {attempt.dtype} twice.")
                    attempt = self._after_nan(attempt, size, warnings)
                    nan_retried, latents = True, None
                    continue
                break
            # Outside the except block: the exception and its frames (holding the failed stage's tensors)
            # are gone, so emptying the cache can free memory.
            if stage != DECODE:
                latents = None
                release_memory()
            action = next_action(failure[0], stage, attempt, self.base_plan, size, self._sizes,
                                 allow_fp8=self.settings.recovery_fp8, error_text=failure[1])
            if action.kind == EXIT:
                self._fatal(action.message)
                raise ServiceFailed(action.message)
            if action.kind == FAIL:
                raise OutOfMemoryAfterRetries(action.message)
            if action.kind == RAISE:  # pragma: no cover - classify_error returned a kind next_action ignores
                raise ZImageError(failure[1])
            job.raise_if_cancelled()  # the ladder stops when the job was cancelled meanwhile
            log.warning("request %s: out of memory in the %s on %s (%s): %s", job.id, stage, attempt.describe(),
                        failure[1], action.what)
            recoveries.append(f"out of memory in the {stage}: {action.what} ({action.plan.describe()})")
            self._count(oom_recoveries=1)
            if action.rebase:
                log.warning("an out-of-memory error at or below the planned size on the base placement: this GPU "
                            "has less room than predicted; re-planning the base placement to %s",
                            action.plan.describe())
                self.base_plan = replace(action.plan, reason="re-planned after an out-of-memory error at the "
                                                             "planned size")
            attempt = action.plan
            if action.kind != RETRY_DECODE:
                latents = None
        return _Rendered(pixels=pixels, plan=attempt, generate_s=time.perf_counter() - started,
                         warnings=tuple(warnings), recoveries=tuple(recoveries), gpu_peak_bytes=None,
                         loras=used_loras, stages=meter.stages)

    def _encode(self, request: GenerationRequest, plan: MemoryPlan) -> Any:
        """The request's prompt embeddings: from the prompt cache when the same prompt was encoded by this text
        encoder before (the encoder does not run, and under model offload it is never moved to the GPU), else from
        :func:`render.encode`, kept in host RAM for the next request."""
        storage = "fp8" if "te-fp8-storage" in plan.options else plan.dtype  # fp8 storage changes the embeddings
        encoder = f"{self.model_label} (compute {plan.dtype}, storage {storage})"
        key = prompt_key(request.prompt, request.negative_prompt, request.guidance_scale, MAX_PROMPT_TOKENS, encoder)
        cached = self.prompt_cache.get(key)  # with the cache off (--prompt-cache-mb 0) every lookup is a miss
        if cached is not None:
            device, host = cached
            return render.embeds_to_device(host, device)
        embeds = render.encode(self._pipe, request.prompt, request.guidance_scale, request.negative_prompt)
        if self.prompt_cache.enabled:
            # Back onto the device the encoder put them on (the pipeline's execution device): the cache is emptied
            # on every reload, so the placement of a hit is that of the miss that stored it.
            self.prompt_cache.put(key, (render.embeds_device(embeds), render.embeds_to_host(embeds)))
        return embeds

    def _mode_pipe(self, mode: str) -> Any:
        """The pipeline of ``mode`` over the loaded components (built from them: no weight is copied), made once per
        loaded pipeline; a ControlNet pipeline is then placed for an offload profile (zimage.loader)."""
        if mode not in self._mode_pipes:
            pipe = render.mode_pipeline(self._pipe, mode, controlnet=self._controlnet)
            if mode in render.CONTROLNET_MODES:
                from .loader import place_mode_pipeline

                place_mode_pipeline(pipe, self.plan)
            self._mode_pipes[mode] = pipe
        return self._mode_pipes[mode]

    def _after_nan(self, attempt: MemoryPlan, size: RequestSize, warnings: list[str]) -> MemoryPlan:
        """NaN (a black image, fp16 overflow): switch the base to a safe dtype for good; it is this model on
        this card, not this request."""
        from .loader import plan_for

        safe = safe_dtype_after_nan(attempt.dtype, attempt.device, self._devices)
        if safe is None:
            raise NaNOutputError(
                f"The image came out as NaN (black) in {attempt.dtype}. This model is known to overflow in fp16 "
                "on some GPUs: run with --dtype bf16 (or fp32) if your GPU can.")
        self._count(nan_retries=1)
        safe_plan = plan_for(replace(self.settings, dtype=safe), self._devices, self._sizes, size)
        if not safe_plan.fits:
            raise NaNOutputError(f"The image came out as NaN (black) in {attempt.dtype}, and {safe} does not fit "
                                 f"this GPU ({safe_plan.reason}). Try --dtype {safe} with a smaller image size.")
        warnings.append(f"{attempt.dtype} produced NaN (a black image): switched to {safe} and retried.")
        log.warning("%s produced NaN: switching the base placement to %s", attempt.dtype, safe_plan.describe())
        self.base_plan = safe_plan
        return safe_plan

    def _place(self, job: Job, plan: MemoryPlan) -> None:
        """Make the loaded pipeline match ``plan``: reload for another placement, set VAE tiling in place."""
        from .loader import set_vae_tiling

        if not same_placement(self.plan, plan):
            job.update(note="switching the memory placement")
            self._reload(plan)
            job.update(note="")
        set_vae_tiling(self._pipe, "vae-tiling" in plan.options)
        self.plan = replace(self.plan, options=plan.options)

    def _reload(self, plan: MemoryPlan) -> None:
        """Load the pipeline again for ``plan`` (placements are not undone reliably in place).

        On failure the service is "failed" (``/healthz`` 503); the leanest placement is tried once, and
        without it :meth:`_fatal` asks the entry point to exit for a restart.
        """
        from .recovery import leanest_plan

        log.info("switching the memory placement: %s -> %s", self.plan.describe(), plan.describe())
        self._pipe, self._mode_pipes, self._controlnet = None, {}, None
        self.prompt_cache.clear()  # a new pipeline: its text encoder may differ (dtype, fp8 storage)
        self._lora_adapters.reset()  # the new pipeline has no adapters: they load again when a request needs them
        release_memory()
        try:
            self.plan = self._load_models(plan)
            return
        except Exception as exc:  # noqa: BLE001 - any failure to load leaves no pipeline
            cause = f"reloading the pipeline for {plan.describe()} failed: {type(exc).__name__}: {_first_line(exc)}"
        self.state, self.load_error = "failed", cause
        log.error("%s", cause)
        self._pipe = self._controlnet = None
        release_memory()
        fallback = leanest_plan(self.base_plan, self._sizes, allow_fp8=self.settings.recovery_fp8)
        if fallback is not None and not same_placement(fallback, plan):
            try:
                fallback = self._load_models(fallback)
            except Exception as exc:  # noqa: BLE001
                log.error("the leanest placement %s failed too: %s: %s", fallback.describe(), type(exc).__name__,
                          _first_line(exc))
            else:
                self.plan = self.base_plan = fallback
                self.state, self.load_error = "ready", None
                log.warning("running on the leanest placement %s from now on (restart the server to return to the "
                            "planned one)", fallback.describe())
                raise ServiceFailed(f"The server had to reload the model and {cause}; it now runs on "
                                    f"{fallback.describe()}. Please try again.")
        self._fatal(cause)
        raise ServiceFailed(f"The server lost its model ({cause}) and restarts itself. Please try again shortly.")

    def _load_models(self, plan: MemoryPlan) -> MemoryPlan:
        """Load the pipeline for ``plan`` and, when one is configured, the ControlNet placed to match (reloaded with
        the pipeline: its placement follows the plan, and fp8 storage cannot be undone in place). Returns the plan in
        effect: ``plan``, uncompiled when compiling failed (the blocks then run eagerly)."""
        from .loader import load_controlnet

        self._pipe = self._factory(self._source, plan)
        self.attention_backend = apply_attention(self._pipe, self.settings.attention_backend, plan.device)
        if plan.compiled and device_available(plan.device):  # not on the tests' pretend GPUs
            try:
                seconds = compile_transformer(self._pipe, self._warm_up)
            except Exception as exc:  # noqa: BLE001 - a failed compile or warm-up costs speed, never the service
                log.warning("compiling the transformer failed (%s: %s): it runs eagerly", type(exc).__name__,
                            _first_line(exc))
                plan = replace(plan, compiled=False)
                release_memory()
            else:
                log.info("transformer compiled (regional, fullgraph) and warmed up at %s in %.1f s (--compile off "
                         "skips this)", ", ".join(f"{w}x{h} x{n}" for w, h, n in WARM_UP_SHAPES), seconds)
        elif self.settings.compile != "off":
            why = compile_problem(plan.profile, plan.options, self._sizes.transformer.stored_bytes is not None)
            log.info("transformer not compiled: %s", why or "--compile auto compiles on CUDA GPUs only")
        if self._controlnet_source is not None:
            self._controlnet = load_controlnet(self._controlnet_source, plan, self._pipe)
            # diffusers' ZImageControlNetInpaintPipeline needs a control input wider than the latents (2.0/2.1: 33
            # channels = latents + mask + masked image); Union 1.0 has exactly the latents' 16.
            self._controlnet_inpaint = (self._controlnet.config.control_in_dim
                                        != self._pipe.transformer.config.in_channels)
        return plan

    def _warm_up(self) -> None:
        """One denoising step at each of :data:`WARM_UP_SHAPES`: compiles the transformer's graph before any request
        (after two shapes, torch marks the changing dimensions dynamic, so other sizes reuse that graph)."""
        embeds = render.encode(self._pipe, "warm-up", 0.0)
        for width, height, images in WARM_UP_SHAPES:
            render.denoise(self._pipe, embeds, width=width, height=height, steps=1, guidance_scale=0.0,
                           seeds=list(range(images)), on_step=lambda step, total: None, should_stop=lambda: False)

    def _fatal(self, message: str) -> None:
        """The service cannot go on: refuse everything, cancel the waiting jobs, tell the entry point."""
        self.state, self.load_error = "failed", message
        log.error("the service cannot continue: %s", message)
        for waiting in self.queue.close(f"The server is restarting after an error: {message}"):
            waiting.cancel("the service failed")
        if self.on_fatal is not None:
            self.on_fatal(message)

    # --- Saving ------------------------------------------------------------------------------------
    def _save_result(self, job: Job, rendered: _Rendered) -> GenerationResult:
        """Convert and save the images (the GPU is free meanwhile) and assemble the result."""
        request: GenerationRequest = job.request
        images = render.to_pil(rendered.pixels)
        save_started = time.perf_counter()
        seeds = tuple(request.seed + i for i in range(request.num_images))
        metadata = [self._metadata(request, seeds[index], job.id, index, rendered.plan, loras=rendered.loras)
                    for index in range(len(images))]
        # A cancel while the PNGs are written still counts: the written files are removed before any is renamed.
        paths = self.store.save_all(images, job.id, metadata, check=job.raise_if_cancelled)
        finished = time.perf_counter()
        timings = {
            "wait_s": (job.started or job.created) - job.created,
            "generate_s": rendered.generate_s,
            **{f"{name}_s": row["seconds"] for name, row in rendered.stages.items()},
            "save_s": finished - save_started,
            "total_s": time.monotonic() - job.created,
        }
        stage_peaks = {name: {key: int(value) for key, value in row.items() if key.endswith("_bytes")}
                       for name, row in rendered.stages.items() if "peak_allocated_bytes" in row}
        return GenerationResult(request_id=job.id, paths=paths, seeds=seeds, request=request, plan=rendered.plan,
                                timings=timings, warnings=rendered.warnings, recoveries=rendered.recoveries,
                                gpu_peak_bytes=rendered.gpu_peak_bytes, images=tuple(images), loras=rendered.loras,
                                stage_peaks=stage_peaks)

    def _prompt_warnings(self, prompt: str) -> list[str]:
        """Warn (instead of the pipeline's silent cut) when the prompt exceeds the text encoder's limit."""
        count = render.prompt_token_count(self._pipe, prompt)
        if count is None or count <= MAX_PROMPT_TOKENS:
            return []
        return [f"The prompt is {count} tokens long with its chat template; the text encoder reads the first "
                f"{MAX_PROMPT_TOKENS}, so the last {count - MAX_PROMPT_TOKENS} were ignored. Shorten the prompt "
                "to use all of it."]

    def _metadata(self, request: GenerationRequest, seed: int, request_id: str, index: int,
                  plan: MemoryPlan, loras: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "seed": seed,
            "steps": request.steps,
            "width": request.width,
            "height": request.height,
            "guidance_scale": request.guidance_scale,
            "mode": request.mode,
            **({"strength": request.strength} if request.strength is not None else {}),
            **({"controlnet_conditioning_scale": request.controlnet_conditioning_scale, "controlnet":
                self.controlnet_label} if request.controlnet_conditioning_scale is not None else {}),
            **({"negative_prompt": request.negative_prompt}
               if request.negative_prompt and request.guidance_scale > 0 else {}),
            # (name, sha256) or (name, sha256, role): role says which input it was ("image", "mask", "control_image").
            **({"inputs": [{"name": entry[0], "sha256": entry[1], **({"role": entry[2]} if len(entry) > 2 else {})}
                           for entry in request.inputs]} if request.inputs else {}),
            **({"loras": [dict(lora) for lora in loras]} if loras else {}),  # name, weight, sha256 of the file
            "model": self.model_label,
            "profile": plan.describe(),
            "version": __version__,
            "request_id": request_id,
            "index": index,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _log_job(self, request_id: str, request: Any, outcome: str, created: float, *,
                 result: GenerationResult | None = None, error: str | None = None, **extra: Any) -> None:
        """One JSON line per job; the prompt only when the operator turned that on."""
        plan = result.plan if result is not None else self.plan
        record: dict[str, Any] = {
            "event": "generation",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": request_id,
            "outcome": outcome,
            "seed": result.seed if result else _loggable(getattr(request, "seed", None)),
            "width": _loggable(getattr(request, "width", None)),
            "height": _loggable(getattr(request, "height", None)),
            "steps": _loggable(getattr(request, "steps", None)),
            "num_images": _loggable(getattr(request, "num_images", None)),
            "mode": getattr(request, "mode", None),
            "duration_s": round(time.monotonic() - created, 3),
            "profile": plan.describe() if plan else None,
        }
        if result is not None:
            if result.recoveries:
                record["recoveries"] = list(result.recoveries)
            if result.gpu_peak_bytes is not None:
                record["gpu_peak_bytes"] = result.gpu_peak_bytes
        if getattr(request, "loras", ()):
            record["loras"] = _loggable_loras(request.loras)
        if error is not None:
            record["error"] = error
        record.update({key: value for key, value in extra.items() if value not in (None, "")})
        if self.settings.log_prompts and isinstance(getattr(request, "prompt", None), str):
            record["prompt"] = request.prompt
        job_log.info(json.dumps(record, ensure_ascii=False, default=str))


def _loggable(value: Any) -> Any:
    """A request value as strict JSON: whole numbers as they are, anything else (NaN, huge strings) as a short repr."""
    return value if value is None or _is_whole_number(value) else _shown(value, 40)


def _loggable_loras(loras: Any) -> Any:
    """A request's LoRAs as strict JSON: [{"name", "weight"}] when well-formed, else a short repr (a refused value)."""
    import math

    try:
        if len(loras) <= MAX_LORAS and all(isinstance(name, str) and len(name) <= 200 and _is_number(weight)
                                            and math.isfinite(weight) for name, weight in loras):
            return [{"name": name, "weight": weight} for name, weight in loras]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a whole number too large for a float
        pass
    return _shown(loras, 120)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

