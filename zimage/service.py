"""The generation service: owns the pipeline, runs one job at a time, survives out-of-memory errors.

This is the only place that calls the pipeline. A job:

1. is validated (:func:`validate_request`) before it waits for the GPU;
2. takes the service lock (one job at a time: the GPU never runs two pipelines at once);
3. runs the pipeline with ``callback_on_step_end`` reporting each denoising step and checking for
   cancellation (``pipe._interrupt``, the pipeline's own early stop);
4. on ``torch.OutOfMemoryError`` frees memory and walks the ladder from
   :func:`zimage.planner.leaner_plans` (VAE tiling, then leaner profiles), retrying after each step;
5. checks the pixels for NaN (fp16 black images) and retries once in a safe dtype;
6. releases the lock, then saves the PNGs with their parameters (so the next job's denoising overlaps
   this job's encoding and disk write) and returns a :class:`GenerationResult`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import __version__
from .errors import (
    GenerationCancelled,
    NaNOutputError,
    OutOfMemoryAfterRetries,
    ServiceNotReady,
    ValidationError,
    ZImageError,
)
from .planner import DeviceFacts, MemoryPlan, PlanError, RequestSize, leaner_plans, safe_dtype_after_nan
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
MIN_SIDE_PX, MAX_SIDE_PX = 256, 2048
SIDE_MULTIPLE_PX = 16  # VAE factor 8 x patch size 2
MAX_IMAGES = 4
MAX_PROMPT_CHARS = 4000
MAX_SEED = 2**32 - 1
#: What the text encoder reads; longer prompts are cut by the pipeline (we warn).
MAX_PROMPT_TOKENS = 512

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationRequest:
    """What a caller asks for. ``seed=None`` draws a random seed (returned in the result)."""

    prompt: str
    width: int = DEFAULT_SIDE_PX
    height: int = DEFAULT_SIDE_PX
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int | None = None
    num_images: int = 1


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
    images: tuple[Any, ...] = field(default=(), repr=False)  # PIL images

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
            "profile": self.plan.describe(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.warnings),
            "recoveries": list(self.recoveries),
            "files": [p.name for p in self.paths],
        }


@dataclass(frozen=True)
class _Rendered:
    """What the GPU produced for a job, handed from the locked stage to the saving stage."""

    pixels: Any
    plan: MemoryPlan
    wait_s: float
    generate_s: float
    warnings: tuple[str, ...]
    recoveries: tuple[str, ...]


@dataclass
class ServiceStats:
    """Counters for metrics; read with :meth:`GenerationService.stats`."""

    jobs_succeeded: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0
    jobs_rejected: int = 0  # validation errors
    oom_recoveries: int = 0
    nan_retries: int = 0
    images_generated: int = 0
    generation_seconds_total: float = 0.0


def _nearest_multiples(value: int) -> str:
    low = max(MIN_SIDE_PX, value - value % SIDE_MULTIPLE_PX)
    high = min(MAX_SIDE_PX, low + SIDE_MULTIPLE_PX)
    return f"{low} or {high}" if low != high else str(low)


def validate_request(request: GenerationRequest, *, draw_seed: Callable[[], int] | None = None) -> GenerationRequest:
    """Check every parameter; return the request with the prompt trimmed and a seed filled in.

    Raises :class:`ValidationError` naming the value and the allowed range.
    """
    if not isinstance(request.prompt, str):
        raise ValidationError("prompt must be text.")
    prompt = request.prompt.strip()
    if not prompt:
        raise ValidationError("prompt is empty: describe the image you want.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationError(f"prompt is {len(prompt)} characters long: the limit is {MAX_PROMPT_CHARS} "
                              f"(and the text encoder reads only its first {MAX_PROMPT_TOKENS} tokens).")
    for name in ("width", "height"):
        value = getattr(request, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValidationError(f"{name}={value!r} must be a whole number of pixels.")
        if not MIN_SIDE_PX <= value <= MAX_SIDE_PX:
            raise ValidationError(f"{name}={value} is out of range: use {MIN_SIDE_PX} to {MAX_SIDE_PX} pixels.")
        if value % SIDE_MULTIPLE_PX:
            raise ValidationError(f"{name}={value} is not a multiple of {SIDE_MULTIPLE_PX}: use "
                                  f"{_nearest_multiples(value)}.")
    if not isinstance(request.steps, int) or not MIN_STEPS <= request.steps <= MAX_STEPS:
        raise ValidationError(f"steps={request.steps!r} is out of range: use {MIN_STEPS} to {MAX_STEPS} "
                              f"(Turbo's default is {DEFAULT_STEPS}).")
    guidance = request.guidance_scale
    if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValidationError(f"guidance_scale={guidance!r} is out of range: use 0 to {MAX_GUIDANCE:g} "
                              f"(Turbo's default is {DEFAULT_GUIDANCE:g}).")
    if not isinstance(request.num_images, int) or not 1 <= request.num_images <= MAX_IMAGES:
        raise ValidationError(f"num_images={request.num_images!r} is out of range: use 1 to {MAX_IMAGES}.")
    seed = request.seed
    if seed is None:
        seed = (draw_seed or (lambda: secrets.randbelow(MAX_SEED + 1 - MAX_IMAGES)))()
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValidationError(f"seed={seed!r} is out of range: use 0 to {MAX_SEED}, or leave it empty for a "
                              "random seed.")
    if seed + request.num_images - 1 > MAX_SEED:
        raise ValidationError(f"seed={seed} with num_images={request.num_images} runs past {MAX_SEED} "
                              "(image i uses seed + i): use a smaller seed.")
    return replace(request, prompt=prompt, seed=seed, guidance_scale=float(guidance))


PipelineFactory = Callable[[Any, MemoryPlan], Any]


class GenerationService:
    """Owns one pipeline; :meth:`generate` runs one job at a time and is safe to call from threads."""

    def __init__(self, settings: Settings, *, devices: DeviceFacts | None = None,
                 pipeline_factory: PipelineFactory | None = None, store: OutputStore | None = None) -> None:
        self.settings = settings
        self.store = store or OutputStore(settings.outputs_dir)
        self._devices = devices
        self._factory = pipeline_factory
        self._lock = threading.Lock()  # held while a job runs
        self._stats_lock = threading.Lock()
        self._stats = ServiceStats()
        self._pipe: Any = None
        self._source: Any = None
        self._sizes: Any = None
        self.plan: MemoryPlan | None = None
        self.state = "starting"  # starting -> loading -> ready | failed; stopping at shutdown
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self._busy_since: float | None = None
        self._jobs_after_lock = 0  # jobs holding the lock or saving after it: wait_idle waits for both
        self._stopping = threading.Event()
        self._cancel_current = threading.Event()

    # --- Loading ---------------------------------------------------------------------------
    def load(self) -> None:
        """Probe the hardware, resolve the model, plan memory and load the pipeline.

        Raises the :class:`ZImageError` (model not found, plan impossible) after recording it.
        """
        from .loader import component_sizes, load_pipeline, plan_for, resolve_model_source

        self.state = "loading"
        started = time.perf_counter()
        try:
            if self._devices is None:
                from .hardware import probe_devices

                self._devices = probe_devices()
            self._source = resolve_model_source(self.settings)
            self._sizes = component_sizes(self._source)
            self.plan = plan_for(self.settings, self._devices, self._sizes)
            for warning in self.plan.warnings:
                log.warning("%s", warning)
            log.info("memory plan: %s: %s", self.plan.describe(), self.plan.reason)
            self._factory = self._factory or load_pipeline
            self._pipe = self._factory(self._source, self.plan)
        except (ZImageError, PlanError) as exc:
            self.state, self.load_error = "failed", str(exc)
            raise
        except Exception as exc:
            self.state, self.load_error = "failed", f"{type(exc).__name__}: {exc}"
            raise
        self.load_seconds = time.perf_counter() - started
        self.state = "ready"
        log.info("model %s ready in %.1f s", self.model_label, self.load_seconds)

    @property
    def model_label(self) -> str:
        return self._source.label if self._source is not None else self.settings.model_source

    @property
    def is_demo(self) -> bool:
        return bool(self._source is not None and self._source.is_demo)

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def stats(self) -> ServiceStats:
        """A copy of the counters."""
        with self._stats_lock:
            return replace(self._stats)

    def _count(self, **increments: float) -> None:
        with self._stats_lock:
            for name, amount in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + amount)

    def unload(self) -> None:
        """Drop the pipeline and give its memory back (waits for a running job). The service is then not ready."""
        from .hardware import release_memory

        with self._lock:
            self._pipe = None
            self.state = "starting"
        release_memory()

    # --- Shutdown ----------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """Refuse new jobs from now on; the running one continues."""
        self._stopping.set()
        if self.state == "ready":
            self.state = "stopping"

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait for the running job (and its saving); cancel it if it outlasts ``timeout_s``. True when idle."""
        deadline = time.monotonic() + timeout_s
        if not self._wait_jobs_done(deadline):
            log.warning("the running job outlasted the %.0f s shutdown bound: cancelling it", timeout_s)
            self._cancel_current.set()
            return self._wait_jobs_done(time.monotonic() + 30)
        return True

    def _wait_jobs_done(self, deadline: float) -> bool:
        while True:
            with self._stats_lock:
                if self._jobs_after_lock == 0 and not self._lock.locked():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # --- Generation --------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, request_id: str | None = None) -> GenerationResult:
        """Validate, wait for the GPU, generate, save. Raises a :class:`ZImageError` subclass on failure."""
        request_id = request_id or uuid.uuid4().hex[:12]
        started = time.perf_counter()
        try:
            request = validate_request(request)
        except ValidationError as exc:
            self._count(jobs_rejected=1)
            self._log_job(request_id, request, "rejected", started, error=str(exc))
            raise
        if self._stopping.is_set():
            raise ServiceNotReady("The service is shutting down: try again in a moment.")
        if self.state != "ready":
            raise ServiceNotReady(self._not_ready_message())
        with self._lock:
            if self._stopping.is_set():  # this job waited for the GPU while the shutdown began
                raise ServiceNotReady("The service is shutting down: try again in a moment.")
            if self._pipe is None:  # unloaded while this job waited
                raise ServiceNotReady(self._not_ready_message())
            self._cancel_current.clear()
            self._busy_since = time.time()
            self._track_in_flight(+1)
            try:
                rendered = self._logging_outcome(request_id, request, started, lambda: self._render_locked(
                    request, on_progress, cancel, started))
            except BaseException:
                self._track_in_flight(-1)
                raise
            finally:
                self._busy_since = None
        # Outside the lock: the next job's denoising overlaps this job's PNG encoding and disk write.
        try:
            result = self._logging_outcome(request_id, request, started, lambda: self._save_result(
                request, request_id, rendered, started))
        finally:
            self._track_in_flight(-1)
        self._count(jobs_succeeded=1, images_generated=len(result.paths),
                    generation_seconds_total=result.timings["generate_s"])
        self._log_job(request_id, request, "ok", started, result=result)
        return result

    def _logging_outcome(self, request_id: str, request: GenerationRequest, started: float,
                         step: Callable[[], Any]) -> Any:
        """Run one stage of a job; a failure is counted and logged (one JSON line) before it propagates."""
        try:
            return step()
        except GenerationCancelled as exc:
            self._count(jobs_cancelled=1)
            self._log_job(request_id, request, "cancelled", started, error=str(exc))
            raise
        except ZImageError as exc:
            self._count(jobs_failed=1)
            self._log_job(request_id, request, "failed", started, error=str(exc))
            raise
        except Exception as exc:
            self._count(jobs_failed=1)
            self._log_job(request_id, request, "error", started, error=f"{type(exc).__name__}: {exc}")
            raise

    def _track_in_flight(self, delta: int) -> None:
        with self._stats_lock:
            self._jobs_after_lock += delta

    def _not_ready_message(self) -> str:
        if self.state == "failed":
            return f"The model failed to load: {self.load_error}"
        return "The model is still loading: try again in a moment."

    def _render_locked(self, request: GenerationRequest, on_progress: ProgressCallback | None,
                       cancel: threading.Event | None, started: float) -> _Rendered:
        """Run the pipeline under the lock, with the OOM ladder and the NaN retry; returns the pixels."""
        import numpy as np

        lock_acquired = time.perf_counter()
        if cancel is not None and cancel.is_set():  # cancelled while it waited for the GPU
            raise GenerationCancelled("The generation was cancelled.")
        warnings = self._prompt_warnings(request.prompt)
        recoveries: list[str] = []
        request_size = RequestSize(request.width, request.height, request.num_images, request.guidance_scale > 0)
        ladder: list[tuple[MemoryPlan, str]] | None = None
        nan_retried = False
        generate_s = 0.0
        while True:
            oom_message = None
            run_started = time.perf_counter()
            try:
                pixels = self._run_pipeline(request, on_progress, cancel)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled here, the rest re-raised
                if not _is_out_of_memory(exc):
                    raise
                oom_message = _first_line(exc)
            generate_s += time.perf_counter() - run_started
            if oom_message is not None:
                # Outside the except block: the exception and its frames (holding the failed job's
                # tensors) are gone now, so emptying the cache can actually free memory.
                from .hardware import release_memory

                release_memory()
                if ladder is None:
                    ladder = leaner_plans(self.plan, self._sizes, request_size, auto_fp8=self.settings.auto_fp8)
                if not ladder:
                    raise OutOfMemoryAfterRetries(
                        f"Out of GPU memory even with the leanest placement ({self.plan.describe()}): "
                        f"{oom_message}. Try a smaller size or fewer images, or free GPU memory used by other "
                        "processes (nvidia-smi). The service is still running.")
                next_plan, what = ladder.pop(0)
                log.warning("out of memory with %s: %s; retrying", self.plan.describe(), what)
                self._switch_plan(next_plan)
                recoveries.append(f"out of memory: {what} ({next_plan.describe()})")
                self._count(oom_recoveries=1)
                continue
            if np.isnan(pixels).any():
                safe = safe_dtype_after_nan(self.plan.dtype, self.plan.device, self._devices)
                if nan_retried or safe is None:
                    raise NaNOutputError(
                        f"The image came out as NaN (black) in {self.plan.dtype}. This model is known to "
                        "overflow in fp16 on some GPUs: run with --dtype bf16 (or fp32) if your GPU can.")
                nan_retried = True
                self._count(nan_retries=1)
                safe_plan = self._replan(dtype=safe, request_size=request_size)
                if not safe_plan.fits:
                    raise NaNOutputError(
                        f"The image came out as NaN (black) in {self.plan.dtype}, and {safe} does not fit this "
                        f"GPU ({safe_plan.reason}). Try --dtype {safe} with a smaller image size.")
                warnings.append(f"{self.plan.dtype} produced NaN (a black image): switched to {safe} and retried.")
                self._switch_plan(safe_plan)
                continue
            break
        return _Rendered(pixels=pixels, plan=self.plan, wait_s=lock_acquired - started, generate_s=generate_s,
                         warnings=tuple(warnings), recoveries=tuple(recoveries))

    def _save_result(self, request: GenerationRequest, request_id: str, rendered: _Rendered,
                     started: float) -> GenerationResult:
        """Convert and save the images (no lock held) and assemble the result."""
        images = _to_pil(rendered.pixels)
        save_started = time.perf_counter()
        seeds = tuple(request.seed + i for i in range(request.num_images))
        paths = tuple(
            self.store.save(image, request_id, index,
                            self._metadata(request, seeds[index], request_id, index, rendered.plan))
            for index, image in enumerate(images)
        )
        finished = time.perf_counter()
        timings = {
            "wait_s": rendered.wait_s,
            "generate_s": rendered.generate_s,
            "save_s": finished - save_started,
            "total_s": finished - started,
        }
        return GenerationResult(request_id=request_id, paths=paths, seeds=seeds, request=request, plan=rendered.plan,
                                timings=timings, warnings=rendered.warnings, recoveries=rendered.recoveries,
                                images=tuple(images))

    def _run_pipeline(self, request: GenerationRequest, on_progress: ProgressCallback | None,
                      cancel: threading.Event | None) -> Any:
        """The one call of the pipeline. Returns float pixels (N, H, W, 3) in [0, 1]."""
        import torch

        # One CPU generator per image, seeded seed + i: image i can be reproduced on its own, on any
        # device (diffusers draws the noise on the generator's device and moves it).
        generators = [torch.Generator(device="cpu").manual_seed(request.seed + i)
                      for i in range(request.num_images)]
        total = request.steps

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if on_progress is not None:
                on_progress(step + 1, total)
            if self._cancel_current.is_set() or (cancel is not None and cancel.is_set()):
                pipe._interrupt = True  # the pipeline's own early stop: remaining steps are skipped
            return callback_kwargs

        output = self._pipe(
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.num_images,
            generator=generators,
            output_type="np",  # floats: NaN is still visible here, unlike in a uint8 PIL image
            callback_on_step_end=on_step_end,
            max_sequence_length=MAX_PROMPT_TOKENS,
        )
        if getattr(self._pipe, "interrupt", False) or self._cancel_current.is_set() or (cancel and cancel.is_set()):
            raise GenerationCancelled("The generation was cancelled.")
        return output.images

    def _prompt_warnings(self, prompt: str) -> list[str]:
        """Warn (instead of the pipeline's silent cut) when the prompt exceeds the text encoder's limit."""
        tokenizer = getattr(self._pipe, "tokenizer", None)
        if tokenizer is None:
            return []
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)
        count = len(tokenizer(text).input_ids)
        if count <= MAX_PROMPT_TOKENS:
            return []
        return [f"The prompt is {count} tokens long with its chat template; the text encoder reads the first "
                f"{MAX_PROMPT_TOKENS}, so the last {count - MAX_PROMPT_TOKENS} were ignored. Shorten the prompt "
                "to use all of it."]

    def _replan(self, *, dtype: str, request_size: RequestSize) -> MemoryPlan:
        from .loader import plan_for

        return plan_for(replace(self.settings, dtype=dtype), self._devices, self._sizes, request_size)

    def _switch_plan(self, new_plan: MemoryPlan) -> None:
        """Apply ``new_plan``: in place when only cheap options change, else by reloading the pipeline."""
        from .hardware import release_memory
        from .loader import apply_in_place_options, can_switch_in_place

        if can_switch_in_place(self.plan, new_plan):
            apply_in_place_options(self._pipe, new_plan.options)
        else:
            # Placements (offload hooks, dtype) are not undone reliably in place: reload from disk
            # (the OS page cache makes this quick after the first load).
            self._pipe = None
            release_memory()
            self._pipe = self._factory(self._source, new_plan)
        self.plan = new_plan

    def _metadata(self, request: GenerationRequest, seed: int, request_id: str, index: int,
                  plan: MemoryPlan) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "seed": seed,
            "steps": request.steps,
            "width": request.width,
            "height": request.height,
            "guidance_scale": request.guidance_scale,
            "model": self.model_label,
            "profile": plan.describe(),
            "version": __version__,
            "request_id": request_id,
            "index": index,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _log_job(self, request_id: str, request: GenerationRequest, outcome: str, started: float, *,
                 result: GenerationResult | None = None, error: str | None = None) -> None:
        """One JSON line per job; the prompt only when the operator turned that on."""
        plan = result.plan if result is not None else self.plan
        record: dict[str, Any] = {
            "event": "generation",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": request_id,
            "outcome": outcome,
            "seed": result.seed if result else request.seed,
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "num_images": request.num_images,
            "duration_s": round(time.perf_counter() - started, 3),
            "profile": plan.describe() if plan else None,
        }
        if result is not None and result.recoveries:
            record["recoveries"] = list(result.recoveries)
        if error is not None:
            record["error"] = error
        if self.settings.log_prompts:
            record["prompt"] = request.prompt
        job_log.info(json.dumps(record, ensure_ascii=False))


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _to_pil(pixels: Any) -> list[Any]:
    from diffusers.image_processor import VaeImageProcessor

    return VaeImageProcessor.numpy_to_pil(pixels)
