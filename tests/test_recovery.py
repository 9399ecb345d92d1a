"""The out-of-memory policy as tables: error classification, per-request plans, the next action after an error."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from zimage.planner import GIB, PUBLISHED_SIZES, RequestSize, hypothetical_devices, plan_memory, with_placement
from zimage.recovery import (
    EXIT,
    FAIL,
    FATAL,
    OOM,
    RAISE,
    RETRY,
    RETRY_DECODE,
    classify_error,
    largest_fitting_size,
    leanest_plan,
    next_action,
    plan_request,
    same_placement,
)


@pytest.mark.parametrize(("error", "kind"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), OOM),
    (MemoryError(), OOM),
    (RuntimeError("CUDA error: out of memory"), OOM),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), OOM),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), OOM),
    (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"), OOM),
    (RuntimeError("Unable to find a valid cuDNN algorithm to run convolution"), OOM),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 4294967296 bytes."), OOM),
    (RuntimeError("CUDA error: device-side assert triggered"), FATAL),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), FATAL),
    (RuntimeError("CUDA error: unspecified launch failure"), FATAL),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), None),
    (ValueError("out of memory"), None),  # only runtime errors carry allocator messages
    (KeyError("vae"), None),
])
def test_every_form_of_out_of_memory_is_recognised(error: BaseException, kind: str | None) -> None:
    assert classify_error(error) == kind


def gpu_plan(vram_gb: float, **kw):
    return plan_memory(hypothetical_devices(vram_gb), PUBLISHED_SIZES, **kw)


def test_a_request_that_fits_runs_on_the_base_as_it_is() -> None:
    base = gpu_plan(80)
    decision = plan_request(base, PUBLISHED_SIZES, RequestSize(1024, 1024), allow_fp8=False)
    assert decision.refusal is None and same_placement(decision.plan, base) and decision.plan.options == ()


def test_a_big_request_gets_tiling_for_itself_then_a_leaner_placement_then_a_refusal() -> None:
    base = gpu_plan(24)  # everything resident at 1024x1024 on a 24 GB card
    assert base.profile == "full" and base.options == ()
    tiled = plan_request(base, PUBLISHED_SIZES, RequestSize(2048, 2048, 1), allow_fp8=False)
    assert tiled.plan.options == ("vae-tiling",) and tiled.plan.profile == "full"
    assert "runs with VAE tiling" in tiled.notes[0] and "later requests return to the base" in tiled.notes[0]
    leaner = plan_request(base, PUBLISHED_SIZES, RequestSize(2048, 2048, 2), allow_fp8=False)
    assert leaner.plan.profile == "model-offload" and "runs with model-offload" in leaner.notes[0]
    # An 8 GB card: the base is group offload; four 2048x2048 images fit nowhere.
    small = gpu_plan(8)
    refused = plan_request(small, PUBLISHED_SIZES, RequestSize(2048, 2048, 4), allow_fp8=False)
    assert refused.plan is None
    assert "2048x2048 with 4 image(s) does not fit this GPU" in refused.refusal
    assert "The largest that fits is" in refused.refusal and "fits with 1 image" in refused.refusal


def test_the_largest_fitting_size_keeps_the_aspect_ratio_and_really_fits() -> None:
    plan = gpu_plan(8)
    width, height = largest_fitting_size(plan, PUBLISHED_SIZES, RequestSize(2048, 1024, 4))
    assert width % 16 == 0 and height % 16 == 0 and abs(width / height - 2) < 0.1

    def fits(w: int, h: int) -> bool:
        sized = with_placement(plan, plan.profile, plan.options, plan.use_streams, PUBLISHED_SIZES,
                               RequestSize(w, h, 4))
        return sized.predicted_peak_bytes <= plan.budget_bytes

    assert fits(width, height) and not fits(width + 16, round((width + 16) / 2 / 16) * 16)


def test_the_cpu_has_no_budget_and_never_refuses() -> None:
    cpu = plan_memory(hypothetical_devices(0), PUBLISHED_SIZES)
    decision = plan_request(cpu, PUBLISHED_SIZES, RequestSize(2048, 2048, 4), allow_fp8=False)
    assert decision.plan is cpu and decision.refusal is None


# --- next_action ------------------------------------------------------------------------------------

BASE_REQUEST = RequestSize(1024, 1024)
BIG_REQUEST = RequestSize(1024, 1024, 2)


def act(kind, stage, attempt, base=None, request=BIG_REQUEST, allow_fp8=False):
    return next_action(kind, stage, attempt, base or attempt, request, PUBLISHED_SIZES, allow_fp8=allow_fp8,
                       error_text="CUDA out of memory")


def test_decode_oom_turns_on_tiling_and_keeps_the_latents() -> None:
    base = gpu_plan(80)
    action = act(OOM, "decode", base)
    assert action.kind == RETRY_DECODE and action.plan.options == ("vae-tiling",) and not action.rebase
    # With tiling already on, the decode steps down like the other stages.
    assert act(OOM, "decode", action.plan).kind == RETRY


@pytest.mark.parametrize("stage", ["encode", "denoise"])
def test_oom_elsewhere_steps_down_without_tiling(stage: str) -> None:
    action = act(OOM, stage, gpu_plan(80))
    assert action.kind == RETRY and action.plan.profile == "model-offload" and action.plan.options == ()
    assert action.what == "stepped down to model-offload"


def test_the_ladder_order_and_fp8_only_when_allowed() -> None:
    def walk(allow_fp8: bool) -> list[tuple[str, tuple]]:
        plan, seen = gpu_plan(80), []
        while True:
            action = act(OOM, "denoise", plan, allow_fp8=allow_fp8)
            if action.kind == FAIL:
                return seen
            plan = action.plan
            seen.append((plan.profile, plan.options))

    assert walk(False) == [("model-offload", ()), ("group-offload", ()), ("sequential-offload", ())]
    peaks, plan = [], gpu_plan(80)
    while (action := act(OOM, "denoise", plan)).kind == RETRY:
        plan = action.plan
        peaks.append(plan.predicted_peak_bytes)
    assert peaks == sorted(peaks, reverse=True)  # each rung needs less memory than the one before
    assert walk(True) == [("model-offload", ()), ("model-offload", ("fp8-storage",)),
                          ("group-offload", ("fp8-storage",)), ("sequential-offload", ("fp8-storage",))]


def test_a_gguf_transformer_never_steps_down_to_fp8_storage() -> None:
    """Found by a user: with --recovery-fp8 the ladder offered fp8 storage to a GGUF transformer, which the planner
    refuses (its weights are already quantized) and which would change its pixels."""
    from dataclasses import replace

    gguf = replace(PUBLISHED_SIZES, transformer=replace(PUBLISHED_SIZES.transformer,
                                                        stored_bytes=PUBLISHED_SIZES.transformer.params * 17 // 16))
    plan, seen = gpu_plan(80), []
    while (action := next_action(OOM, "denoise", plan, plan, BIG_REQUEST, gguf, allow_fp8=True,
                                 error_text="CUDA out of memory")).kind == RETRY:
        plan = action.plan
        seen.append((plan.profile, plan.options))
    assert seen == [("model-offload", ()), ("group-offload", ()), ("sequential-offload", ())]


def test_the_last_rung_fails_with_a_readable_message() -> None:
    leanest = leanest_plan(gpu_plan(80), PUBLISHED_SIZES, allow_fp8=False)
    assert leanest.profile == "sequential-offload"
    action = act(OOM, "denoise", leanest)
    assert action.kind == FAIL and "leanest placement (sequential-offload" in action.message
    assert "still running" in action.message
    cpu = plan_memory(hypothetical_devices(0), PUBLISHED_SIZES)
    assert "Out of host memory" in act(OOM, "denoise", cpu).message


def test_only_an_oom_at_the_planned_size_on_the_base_replans_the_base() -> None:
    base = gpu_plan(80)
    assert act(OOM, "denoise", base, request=BASE_REQUEST).rebase  # the card has less room than predicted
    assert act(OOM, "denoise", base, request=RequestSize(512, 512)).rebase
    assert not act(OOM, "denoise", base, request=BIG_REQUEST).rebase  # a bigger request: this request only
    assert not act(OOM, "denoise", base, request=RequestSize(1024, 1024, 1, guidance=True)).rebase
    leaner = act(OOM, "denoise", base).plan
    assert not act(OOM, "denoise", leaner, base=base, request=BASE_REQUEST).rebase  # not on the base placement


def test_fatal_errors_exit_and_unknown_errors_are_raised() -> None:
    base = gpu_plan(80)
    fatal = act(FATAL, "denoise", base)
    assert fatal.kind == EXIT and "restarts" in fatal.message
    assert act(None, "denoise", base).kind == RAISE


def test_placements_differ_by_profile_dtype_and_fp8_but_not_by_tiling() -> None:
    base = gpu_plan(80)
    tiled = act(OOM, "decode", base).plan
    assert same_placement(base, tiled)
    assert not same_placement(base, act(OOM, "denoise", base).plan)
    assert 10 * GIB < base.budget_bytes
    # Only options applied in place keep the loaded pipeline; everything else needs a reload.
    assert same_placement(base, replace(base, options=("vae-tiling",)))
    assert same_placement(base, replace(base, options=("attention-slicing",)))
    assert not same_placement(base, replace(base, profile="model-offload"))
    assert not same_placement(base, replace(base, options=("fp8-storage",)))
    assert not same_placement(base, replace(base, dtype="fp32"))
