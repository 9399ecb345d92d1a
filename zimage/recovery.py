"""Out-of-memory policy as pure decisions: what to run a request on, and what to do after an error.

Nothing here touches a GPU or the pipeline; the service asks and acts. Two questions:

* :func:`plan_request`: before a job runs, does it fit the base placement? If not, which per-request
  measure makes it fit (VAE tiling for this request, a leaner placement for this request), or is it
  refused with the largest size that fits?
* :func:`next_action`: after an error in a stage (``encode``, ``denoise``, ``decode``), what next?
  Out of memory in the decode turns on tiling and decodes again (the latents are kept); elsewhere it
  steps down to the next leaner placement, for this request only. Only an OOM on the base placement at
  or below the size the base was planned for re-plans the base (the card has less room than predicted).
  fp8 weight storage changes pixels: the ladder enters it only when the operator allowed it.

Every form of out-of-memory is recognised by :func:`classify_error`; CUDA errors that leave the
context unusable are ``"fatal"`` (the process must restart).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .planner import ComponentSizes, MemoryPlan, RequestSize, with_placement

OOM = "oom"
FATAL = "fatal"

#: Messages of out-of-memory errors that are not ``torch.OutOfMemoryError``: CUDA's own error string,
#: cuBLAS and cuDNN workspace allocations, and host RAM under offload (torch's CPU allocator).
_OOM_MARKERS = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_alloc_failed",
    "cudnn_status_not_enough_workspace",
    "unable to find a valid cudnn algorithm",  # cuDNN's message when every algorithm's workspace failed
    "can't allocate memory",  # DefaultCPUAllocator
    "failed to allocate",
)
#: CUDA errors after which the context is unusable: every later call fails until the process restarts.
_FATAL_MARKERS = (
    "device-side assert triggered",
    "illegal memory access",
    "an illegal instruction was encountered",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ecc error",
    "cuda error: unknown error",
)
#: Stages of one render, in order. Errors carry the stage they happened in.
ENCODE, DENOISE, DECODE = "encode", "denoise", "decode"


def classify_error(exc: BaseException) -> str | None:
    """``"oom"`` for every form of out-of-memory, ``"fatal"`` for a CUDA error that broke the context, else None."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return OOM
    text = str(exc).lower()
    if any(marker in text for marker in _FATAL_MARKERS):
        return FATAL
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _OOM_MARKERS):
        return OOM
    return None


# --- Ladder --------------------------------------------------------------------------------------

#: Options applied at load that cannot be undone in place: a change of them needs a reload.
HEAVY_OPTIONS = ("fp8-storage", "te-fp8-storage", "fp8-compute", "step-cache")
#: Placements leaner than each profile, in the order the ladder tries them.
_LEANER = ("model-offload", "group-offload", "sequential-offload")


def _leaner_plans(plan: MemoryPlan, sizes: ComponentSizes, request: RequestSize, allow_fp8: bool) -> list[tuple[MemoryPlan, str]]:
    """Placements below ``plan``, leanest last, each keeping ``plan``'s options; fp8 steps only if allowed."""
    if plan.profile == "cpu":
        return []
    # From model-offload itself the next rung is its fp8 variant, so the walk starts at the plan's own profile.
    order = _LEANER[_LEANER.index(plan.profile):] if plan.profile in _LEANER else _LEANER
    steps: list[tuple[MemoryPlan, str]] = []
    # Never for a GGUF transformer (already quantized: the planner refuses fp8-storage with it) nor in fp32.
    fp8_possible = (allow_fp8 and "fp8-storage" not in plan.options and plan.dtype != "fp32"
                    and sizes.transformer.stored_bytes is None)
    for profile in order:
        if request.controlnet and profile == "sequential-offload":
            continue  # cannot run a ControlNet (zimage.loader.place_mode_pipeline): not a rung for its requests
        streams = profile == "group-offload"
        if profile != plan.profile:
            steps.append((with_placement(plan, profile, plan.options, streams, sizes, request),
                          f"stepped down to {profile}"))
        if profile == "model-offload" and fp8_possible:
            steps.append((with_placement(plan, profile, plan.options + ("fp8-storage",), False, sizes, request),
                          "stepped down to model-offload with fp8-storage"))
    return steps


def leanest_plan(base: MemoryPlan, sizes: ComponentSizes, *, allow_fp8: bool) -> MemoryPlan | None:
    """The last rung of the ladder below ``base`` (what a failed reload falls back to); None on the CPU."""
    steps = _leaner_plans(base, sizes, RequestSize(), allow_fp8)
    return steps[-1][0] if steps else None


def _with_tiling(plan: MemoryPlan, sizes: ComponentSizes, request: RequestSize) -> MemoryPlan:
    return with_placement(plan, plan.profile, plan.options + ("vae-tiling",), plan.use_streams, sizes, request)


def same_placement(a: MemoryPlan, b: MemoryPlan) -> bool:
    """True when two plans need the same loaded pipeline (they may differ in options applied in place)."""
    # fp8 storage of either model cannot be undone in place: a change needs a reload.
    # fp8 compute (quantized in place) and step-cache (hooks) neither: both are applied at load.
    heavy = lambda p: tuple(o for o in p.options if o in HEAVY_OPTIONS)  # noqa: E731
    return (a.profile, a.dtype, a.device, a.use_streams, heavy(a)) == (b.profile, b.dtype, b.device, b.use_streams,
                                                                       heavy(b))


# --- Before a job ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestPlan:
    """What one request runs on. ``refusal`` is set (and ``plan`` is None) when nothing fits."""

    plan: MemoryPlan | None
    notes: tuple[str, ...] = ()
    refusal: str | None = None


def _fits(plan: MemoryPlan) -> bool:
    return plan.predicted_peak_bytes <= plan.budget_bytes


def plan_request(base: MemoryPlan, sizes: ComponentSizes, request: RequestSize, *, allow_fp8: bool) -> RequestPlan:
    """Check a request against the base placement; choose per-request measures or refuse it.

    The CPU has no planned budget: every request runs on the base plan there.
    """
    if base.profile == "cpu" or base.budget_bytes <= 0:
        return RequestPlan(base)
    sized = with_placement(base, base.profile, base.options, base.use_streams, sizes, request)
    if _fits(sized):
        return RequestPlan(replace_reason(sized, base.reason))
    candidates = [] if "vae-tiling" in sized.options else [(_with_tiling(sized, sizes, request), "VAE tiling")]
    for plan, what in _leaner_plans(sized, sizes, request, allow_fp8):
        candidates.append((plan, what.replace("stepped down to ", "")))
        if "vae-tiling" not in plan.options:
            candidates.append((_with_tiling(plan, sizes, request), what.replace("stepped down to ", "") + " with VAE tiling"))
    for plan, what in candidates:
        if _fits(plan):
            note = (f"{request.width}x{request.height} x{request.num_images} does not fit {base.describe()} "
                    f"(predicted {_gib(sized.predicted_peak_bytes)} of {_gib(base.budget_bytes)} usable): this "
                    f"request runs with {what}; later requests return to the base placement.")
            return RequestPlan(plan, (note,))
    leanest = candidates[-1][0] if candidates else sized
    largest = largest_fitting_size(leanest, sizes, request)
    hint = (f"The largest that fits is {largest[0]}x{largest[1]} with {request.num_images} image(s)"
            if largest else "No size fits with this many images")
    if request.num_images > 1 and (largest is None or largest < (request.width, request.height)):
        single = replace(request, num_images=1)
        if _fits(with_placement(leanest, leanest.profile, leanest.options, leanest.use_streams, sizes, single)):
            hint += f"; {request.width}x{request.height} fits with 1 image"
    refusal = (f"{request.width}x{request.height} with {request.num_images} image(s) does not fit this GPU: predicted "
               f"{_gib(leanest.predicted_peak_bytes)} even with the leanest placement ({leanest.describe()}), and "
               f"{_gib(base.budget_bytes)} is usable. {hint}.")
    return RequestPlan(None, refusal=refusal)


def largest_fitting_size(plan: MemoryPlan, sizes: ComponentSizes, request: RequestSize, *,
                         min_side_px: int = 256, multiple_px: int = 16) -> tuple[int, int] | None:
    """The largest (width, height) with the request's aspect ratio, in multiples of ``multiple_px`` and no side
    under ``min_side_px``, predicted to fit ``plan``; None when even the smallest does not."""
    width = request.width - request.width % multiple_px
    while width >= min_side_px:
        height = round(width * request.height / request.width / multiple_px) * multiple_px
        if height < min_side_px:
            return None
        candidate = replace(request, width=width, height=height)  # same mode: same encode/ControlNet
        if _fits(with_placement(plan, plan.profile, plan.options, plan.use_streams, sizes, candidate)):
            return width, height
        width -= multiple_px
    return None


def replace_reason(plan: MemoryPlan, reason: str) -> MemoryPlan:
    return replace(plan, reason=reason, fits=True)


# --- After an error -------------------------------------------------------------------------------

RETRY, RETRY_DECODE, FAIL, EXIT, RAISE = "retry", "retry_decode", "fail", "exit", "raise"


@dataclass(frozen=True)
class Action:
    """What the service does next. ``rebase``: the new plan also becomes the base for later requests."""

    kind: str
    plan: MemoryPlan | None = None
    what: str = ""
    rebase: bool = False
    message: str = ""


def _at_or_below(request: RequestSize, planned: RequestSize) -> bool:
    load = lambda r: r.pixels * r.num_images * (2 if r.guidance else 1)  # noqa: E731
    # A ControlNet or an encoded input adds memory the planned request did not have: an OOM there says nothing
    # about the base placement's own size.
    extra = (request.controlnet and not planned.controlnet) or (request.encode and not planned.encode)
    return load(request) <= load(planned) and not extra


def next_action(kind: str | None, stage: str, attempt: MemoryPlan, base: MemoryPlan, request: RequestSize,
                sizes: ComponentSizes, *, allow_fp8: bool, error_text: str,
                base_request: RequestSize = RequestSize()) -> Action:
    """Decide what follows an error of ``kind`` (from :func:`classify_error`) raised in ``stage``.

    ``attempt`` is the plan the request ran on, ``base`` the service's base plan, ``base_request`` the
    request size the base was planned for.
    """
    if kind is None:
        return Action(RAISE)
    if kind == FATAL:
        return Action(EXIT, message=f"The GPU reported an error that leaves it unusable until the process restarts "
                                    f"({error_text}). The server restarts itself.")
    on_base = same_placement(attempt, base) and _at_or_below(request, base_request)
    if stage == DECODE and "vae-tiling" not in attempt.options:
        plan = _with_tiling(attempt, sizes, request)
        return Action(RETRY_DECODE, plan, "turned on VAE tiling", rebase=on_base)
    steps = _leaner_plans(attempt, sizes, request, allow_fp8)
    if not steps:
        where = "host memory" if attempt.profile == "cpu" else "GPU memory"
        return Action(FAIL, message=(
            f"Out of {where} even with the leanest placement ({attempt.describe()}): {error_text}. Try a smaller "
            "size or fewer images, or free memory used by other processes (nvidia-smi). The service is still "
            "running."))
    plan, what = steps[0]
    return Action(RETRY, plan, what, rebase=on_base)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.1f} GiB"
