"""The generation service on the demo model: validation, determinism, jobs, cancel, OOM and NaN recovery."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import WrappedPipeline, oom, wrap_vae
from zimage.errors import (
    GenerationCancelled,
    NaNOutputError,
    OutOfMemoryAfterRetries,
    QueueFull,
    RequestTooLarge,
    ServiceFailed,
    ServiceNotReady,
    ValidationError,
    ZImageError,
)
from zimage.planner import MIB, DeviceFacts, GpuFacts, hypothetical_devices
from zimage.service import (
    DEFAULT_STEPS,
    MAX_PROMPT_TOKENS,
    GenerationRequest,
    GenerationService,
    validate_request,
)
from zimage.storage import read_metadata

SMALL = dict(width=256, height=256, steps=2)


def request(prompt: str = "一只猫 a cat", **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, **{**SMALL, **kw})


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


# --- Validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": 123}, "prompt=123 must be text"),
        ({"prompt": None}, "prompt=None must be text"),
        ({"prompt": "\ud800 cat"}, "prompt has a character that is not valid text at position 0"),
        ({"prompt": 7 * 10**80}, "... ("),  # a huge value is cut in the message, never echoed whole
        ({"prompt": "x" * 4001}, "prompt is 4001 characters long: the limit is 4000"),
        ({"width": 1000}, "width=1000 is not a multiple of 16: use 992 or 1008"),
        ({"height": 100}, "height=100 is out of range: use 256 to 2048 pixels"),
        ({"width": 4096}, "width=4096 is out of range: use 256 to 2048 pixels"),
        ({"width": 512.0}, "width=512.0 must be a whole number of pixels"),
        ({"width": 256.5}, "width=256.5 must be a whole number of pixels"),
        ({"height": "512"}, "height='512' must be a whole number of pixels"),
        ({"width": True}, "width=True must be a whole number of pixels"),
        ({"steps": 0}, "steps=0 is out of range: use a whole number from 1 to 50 (Turbo's default is 8)"),
        ({"steps": 51}, "steps=51 is out of range"),
        ({"steps": True}, "steps=True must be a whole number from 1 to 50"),
        ({"steps": 8.5}, "steps=8.5 must be a whole number"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0 is out of range: use 0 to 10"),
        ({"guidance_scale": 11}, "guidance_scale=11 is out of range"),
        ({"guidance_scale": False}, "guidance_scale=False must be a number"),
        ({"num_images": 0}, "num_images=0 is out of range: use a whole number from 1 to 4"),
        ({"num_images": 5}, "num_images=5 is out of range"),
        ({"num_images": True}, "num_images=True must be a whole number"),
        ({"seed": -1}, "seed=-1 is out of range: use a whole number from 0 to 4294967295"),
        ({"seed": 2**32}, "seed=4294967296 is out of range"),
        ({"seed": 1.5}, "seed=1.5 must be a whole number"),
        ({"seed": 2**32 - 1, "num_images": 2}, "runs past 4294967295"),
    ],
)
def test_every_rule_names_the_value_and_the_range(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_request(replace(GenerationRequest(prompt="a cat"), **changes))
    assert message in str(info.value)


def test_validation_trims_and_fills_defaults() -> None:
    checked = validate_request(GenerationRequest(prompt="  a cat \n"), draw_seed=lambda: 1234)
    assert checked.prompt == "a cat" and checked.seed == 1234
    assert (checked.width, checked.height, checked.steps, checked.guidance_scale) == (1024, 1024, DEFAULT_STEPS, 0.0)
    assert DEFAULT_STEPS == 8
    drawn = {validate_request(GenerationRequest(prompt="a")).seed for _ in range(5)}
    assert len(drawn) > 1 and all(0 <= s < 2**32 for s in drawn)


def test_invalid_requests_are_counted_and_never_queued(shared_service: GenerationService) -> None:
    before = shared_service.stats().outcomes["invalid"]
    with pytest.raises(ValidationError):
        shared_service.submit(request(width=256.5))
    assert shared_service.stats().outcomes["invalid"] == before + 1 and len(shared_service.queue) == 0


# --- Generation on the demo model ---------------------------------------------------------------

def test_generates_pngs_of_the_requested_size_with_metadata(shared_service: GenerationService) -> None:
    result = shared_service.generate(request(width=320, height=256, seed=7))
    (path,) = result.paths
    assert path.parent == shared_service.settings.outputs_dir and path.suffix == ".png"
    assert "cat" not in path.name and "猫" not in path.name
    assert pixels(path).shape == (256, 320, 3)
    meta = read_metadata(path)
    assert meta["prompt"] == "一只猫 a cat"  # UTF-8 survives the round trip
    assert {k: meta[k] for k in ("seed", "steps", "width", "height", "guidance_scale")} == \
        {"seed": 7, "steps": 2, "width": 320, "height": 256, "guidance_scale": 0.0}
    assert meta["model"] == "demo (random weights)" and meta["profile"] == shared_service.plan.describe()
    assert meta["version"] and meta["request_id"] == result.request_id
    assert result.info()["seed"] == 7 and result.timings["generate_s"] > 0


def test_same_seed_same_pixels_different_seed_different(shared_service: GenerationService) -> None:
    first = shared_service.generate(request(seed=42))
    second = shared_service.generate(request(seed=42))
    third = shared_service.generate(request(seed=43))
    assert np.array_equal(pixels(first.paths[0]), pixels(second.paths[0]))
    assert not np.array_equal(pixels(first.paths[0]), pixels(third.paths[0]))
    assert first.paths[0] != second.paths[0]  # never overwrites


def test_several_images_each_reproducible_from_its_own_seed(shared_service: GenerationService) -> None:
    batch = shared_service.generate(request(seed=100, num_images=2))
    assert batch.seeds == (100, 101) and len(batch.paths) == 2
    assert [read_metadata(p)["seed"] for p in batch.paths] == [100, 101]
    alone = pixels(shared_service.generate(request(seed=101)).paths[0]).astype(int)
    other = pixels(shared_service.generate(request(seed=102)).paths[0]).astype(int)
    second = pixels(batch.paths[1]).astype(int)
    # Same starting noise; batching changes bf16 rounding by a few levels at most.
    assert np.abs(second - alone).max() <= 8 and np.abs(second - alone).mean() < 1
    assert np.abs(second - other).mean() > 10


def test_random_seed_is_returned_and_reproduces(shared_service: GenerationService) -> None:
    result = shared_service.generate(request())
    again = shared_service.generate(request(seed=result.seed))
    assert np.array_equal(pixels(result.paths[0]), pixels(again.paths[0]))


def test_progress_goes_through_every_stage_in_order(shared_service: GenerationService) -> None:
    seen: list[str] = []
    shared_service.generate(request(steps=3), on_progress=lambda p: seen.append(p.describe()))
    distinct = [text for i, text in enumerate(seen) if i == 0 or seen[i - 1] != text]
    assert distinct == ["Queued: position 1 of 1", "Encoding the prompt", "Denoising step 0/3", "Denoising step 1/3", "Denoising step 2/3",
                        "Denoising step 3/3", "Decoding the image", "Saving", "Done"]


def test_long_prompt_is_truncated_with_a_warning(shared_service: GenerationService) -> None:
    long_prompt = " ".join(["cat"] * 700)
    result = shared_service.generate(request(long_prompt))
    (warning,) = result.warnings
    assert f"the text encoder reads the first {MAX_PROMPT_TOKENS}" in warning
    assert shared_service.generate(request("a short prompt")).warnings == ()


# --- Jobs: queue, cancel -----------------------------------------------------------------------------

def hold_the_gpu(service: GenerationService):
    """Start a long job and wait until it denoises; returns the job (cancel it to free the GPU)."""
    job = service.submit(request("a long job", width=1024, height=1024, steps=50, seed=1))
    wait_for(lambda: job.progress.step >= 1)
    return job


def test_cancel_stops_within_a_step_and_never_decodes(shared_service: GenerationService, monkeypatch) -> None:
    decodes = []
    real_decode = shared_service._pipe.vae.decode
    monkeypatch.setattr(shared_service._pipe.vae, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    before = shared_service.stats().outcomes["cancelled"]
    job = hold_the_gpu(shared_service)
    step_at_cancel = job.progress.step
    job.cancel()
    with pytest.raises(GenerationCancelled):
        job.result(60)
    wait_for(lambda: not shared_service.busy, 60)
    assert job.progress.state == "cancelled" and job.progress.step <= step_at_cancel + 1
    assert decodes == []  # no VAE decode after a cancel
    assert shared_service.stats().outcomes["cancelled"] == before + 1
    assert shared_service.generate(request(seed=1)).paths and decodes == [1]


def test_a_cancel_during_the_decode_saves_nothing_and_counts_as_cancelled(demo_settings) -> None:
    service, _ = make_service(demo_settings, Behaviour(failures=0))
    jobs = []
    wrap_vae(service._pipe, lambda vae: jobs[0].cancel())  # the user cancels while the image is decoded
    jobs.append(service.submit(request(seed=4)))
    with pytest.raises(GenerationCancelled):
        jobs[0].result(60)
    assert jobs[0].progress.stage == "decoding" and service.stats().outcomes == {**service.stats().outcomes,
                                                                                 "cancelled": 1, "ok": 0}
    outputs = demo_settings.outputs_dir
    assert not outputs.exists() or not any(outputs.iterdir())


def test_a_cancel_while_the_pngs_are_written_saves_nothing_and_counts_as_cancelled(demo_settings,
                                                                                  monkeypatch) -> None:
    from zimage import storage

    service, _ = make_service(demo_settings, Behaviour(failures=0))
    jobs = []
    write_png = storage._write_png

    def written_then_cancelled(path, image, metadata):
        write_png(path, image, metadata)
        jobs[0].cancel()  # the user cancels while the second PNG is encoded

    monkeypatch.setattr(storage, "_write_png", written_then_cancelled)
    jobs.append(service.submit(request(seed=4, num_images=2)))
    with pytest.raises(GenerationCancelled):
        jobs[0].result(60)
    assert jobs[0].progress.state == "cancelled" and service.stats().outcomes["cancelled"] == 1
    assert service.stats().outcomes["ok"] == 0
    outputs = demo_settings.outputs_dir
    assert not outputs.exists() or not any(outputs.iterdir())  # no PNG and no partial file


def test_a_queued_job_that_is_cancelled_never_starts(shared_service: GenerationService) -> None:
    running = hold_the_gpu(shared_service)
    cancelled_before = shared_service.stats().outcomes["cancelled"]
    queued = shared_service.submit(request("waits", seed=2))
    states: list[str] = []
    queued.add_listener(lambda j: states.append(j.progress.state))
    assert queued.progress.position == 1 and queued.progress.describe() == "Queued: position 1 of 1"
    assert shared_service.queue_depth() == 2
    queued.cancel()
    assert queued.done and queued.progress.state == "cancelled"  # at once, while the other job still runs
    assert running.progress.state == "running"
    assert shared_service.stats().outcomes["cancelled"] == cancelled_before + 1  # counted and logged at once
    running.cancel()
    wait_for(lambda: not shared_service.busy)
    assert "running" not in states and len(shared_service.queue) == 0


def test_cancelling_one_job_leaves_the_others_alone(shared_service: GenerationService) -> None:
    first = shared_service.submit(request("first", width=512, height=512, steps=8, seed=11))
    second = shared_service.submit(request("second", width=512, height=512, steps=8, seed=12))
    second.cancel()
    assert first.result(120).seed == 11 and second.progress.state == "cancelled"


def test_the_queue_bound_refuses_with_retry_after(demo_settings) -> None:
    service = GenerationService(replace(demo_settings, queue_size=1))
    service.load()
    running = hold_the_gpu(service)
    waiting = service.submit(request(seed=2))
    with pytest.raises(QueueFull) as info:
        service.submit(request(seed=3))
    assert "queue is full" in str(info.value).lower() and info.value.retry_after_s > 0
    assert service.stats().outcomes["busy"] == 1
    running.cancel()
    assert waiting.result(60).seed == 2  # accepted jobs are never lost


def test_one_job_at_a_time(shared_service: GenerationService) -> None:
    running: list[str] = []
    overlap: list[str] = []

    def progress(p) -> None:
        if p.stage == "denoising" and p.step:
            running.append(threading.current_thread().name + str(p.total))
            if not shared_service.busy:
                overlap.append("not marked busy")

    holder = hold_the_gpu(shared_service)  # the three jobs below wait, with their listeners in place
    jobs = [shared_service.submit(request(seed=i, steps=2 + i), on_progress=progress) for i in range(3)]
    holder.cancel()
    for job in jobs:
        job.result(60)
    # All steps ran on the one GPU worker, job after job: 2 steps of the first, then 3, then 4.
    assert running == ["zimage-gpu2"] * 2 + ["zimage-gpu3"] * 3 + ["zimage-gpu4"] * 4
    assert not overlap


def test_saving_happens_off_the_gpu_so_the_next_job_starts(demo_settings) -> None:
    from zimage.storage import OutputStore

    events: list[str] = []

    class SlowStore(OutputStore):
        def save_all(self, images, request_id, metadata, check=None):
            events.append(f"save start {metadata[0]['seed']}")
            time.sleep(0.5)
            paths = super().save_all(images, request_id, metadata, check)
            events.append(f"save end {metadata[0]['seed']}")
            return paths

    service = GenerationService(demo_settings, store=SlowStore(demo_settings.outputs_dir))
    service.load()
    holder = hold_the_gpu(service)
    jobs = [service.submit(request(seed=seed, steps=2),
                           on_progress=lambda p, s=seed: events.append(f"step {s}") if p.step == 1 and
                           f"step {s}" not in events else None) for seed in (1, 2)]
    holder.cancel()
    for job in jobs:
        job.result(60)
    # The second job denoised while the first was still being written.
    assert events.index("step 2") < events.index("save end 1"), events
    assert service.wait_idle(1) and not service.busy


def test_a_full_disk_fails_the_job_with_a_readable_error_and_leaves_no_file(demo_settings, monkeypatch) -> None:
    import errno

    service = GenerationService(demo_settings)
    service.load()
    real_fsync = __import__("os").fsync
    written = []

    def full_after_one(fd: int) -> None:
        written.append(fd)
        if len(written) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("os.fsync", full_after_one)
    with pytest.raises(ZImageError) as info:
        service.generate(request(seed=3, num_images=2))
    assert "full" in str(info.value) and str(demo_settings.outputs_dir) in str(info.value)
    assert "Traceback" not in str(info.value) and service.stats().outcomes["failed"] == 1
    assert not any(demo_settings.outputs_dir.iterdir())  # all images of a request or none
    monkeypatch.setattr("os.fsync", real_fsync)
    assert len(service.generate(request(seed=3, num_images=2)).paths) == 2


def test_not_ready_and_shutdown_refuse_jobs(demo_settings) -> None:
    service = GenerationService(demo_settings)
    with pytest.raises(ServiceNotReady, match="still loading"):
        service.submit(request())
    service.load()
    service.begin_shutdown()
    with pytest.raises(ServiceNotReady, match="shutting down"):
        service.submit(request())
    assert service.stats().outcomes["not_ready"] == 2


def test_shutdown_cancels_waiting_jobs_and_bounds_the_running_one(demo_settings) -> None:
    service = GenerationService(demo_settings)
    service.load()
    running = hold_the_gpu(service)
    waiting = service.submit(request(seed=2))
    service.begin_shutdown()
    assert waiting.progress.state == "cancelled"  # never starts
    assert service.wait_idle(0.2)  # 50 steps at 1024x1024 outlast 0.2 s: cancelled, then idle
    assert running.progress.state == "cancelled" and running.cancel_reason == "shutdown"
    service._worker.join(5)
    assert not service._worker.is_alive()  # the worker ends with the queue, it does not spin on a closed one


def test_failed_load_is_reported(tmp_path: Path) -> None:
    from zimage.errors import ModelNotFoundError
    from zimage.settings import Settings

    service = GenerationService(Settings(model=str(tmp_path / "missing"), outputs_dir=tmp_path))
    with pytest.raises(ModelNotFoundError):
        service.load()
    assert service.state == "failed"
    with pytest.raises(ServiceNotReady, match="failed to load: Model"):
        service.submit(request())


# --- Out-of-memory recovery ---------------------------------------------------------------------

class Behaviour:
    """Fail the next ``failures`` denoising calls with ``error``, then run the real pipeline."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.error = error

    def __call__(self, wrapper: WrappedPipeline, kwargs: dict):
        if self.failures > 0:
            self.failures -= 1
            raise self.error if self.error is not None else oom()
        return wrapper._pipe(**kwargs)


def make_service(settings, behaviour, devices=None, fail_loads=()) -> tuple[GenerationService, list]:
    """A service whose pipeline is the real tiny one on the CPU, pretending to be placed as planned.

    ``fail_loads``: profiles whose (re)load raises MemoryError, as a failed reload would.
    """
    from diffusers import ZImagePipeline

    from zimage.hardware import probe_devices
    from zimage.loader import torch_dtype
    from zimage.planner import choose_dtype

    plans: list = []
    fatal: list[str] = []
    # The pretended GPU plans bf16; on this CPU the pipeline runs in what the CPU computes natively (bf16 is
    # emulated, and many times slower, on CPUs without bf16 instructions).
    host_dtype = torch_dtype(choose_dtype("auto", "cpu", probe_devices()))

    def factory(source, plan):
        plans.append(plan)
        if plan.profile in fail_loads and len(plans) > 1:
            raise MemoryError("cannot allocate 12 GiB for the weights")
        return WrappedPipeline(ZImagePipeline.from_pretrained(source.pretrained, dtype=host_dtype), behaviour)

    service = GenerationService(settings, devices=devices, pipeline_factory=factory, on_fatal=fatal.append)
    service.load()
    service.fatal = fatal
    return service, plans


BIG = dict(width=768, height=768, num_images=2, steps=2)  # more pixels than the 1024x1024 x1 the base was planned for


def test_oom_in_the_denoise_steps_down_for_that_request_only(demo_settings) -> None:
    behaviour = Behaviour(failures=0)
    service, plans = make_service(demo_settings, behaviour, devices=hypothetical_devices(80))
    assert service.base_plan.profile == "full"
    before = service.generate(request(seed=3, **BIG))
    behaviour.failures = 1
    recovered = service.generate(request(seed=3, **BIG))
    assert recovered.recoveries == ("out of memory in the denoise: stepped down to model-offload "
                                    "(model-offload on cuda:0 (bf16))",)
    assert read_metadata(recovered.paths[0])["profile"] == "model-offload on cuda:0 (bf16)"
    after = service.generate(request(seed=3, **BIG))
    assert [p.profile for p in plans] == ["full", "model-offload", "full"]  # back to the base placement
    assert service.base_plan.profile == "full" and after.plan.profile == "full" and after.recoveries == ()
    assert np.array_equal(pixels(before.paths[0]), pixels(after.paths[0]))  # the same seed, the same image
    assert service.stats().oom_recoveries == 1


def test_oom_at_the_planned_size_on_the_base_replans_the_base(demo_settings, caplog) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=1), devices=hypothetical_devices(80))
    with caplog.at_level(logging.WARNING, logger="zimage.service"):
        service.generate(request(seed=3))
    assert service.base_plan.profile == "model-offload"
    assert "re-planning the base placement to model-offload" in caplog.text
    service.generate(request(seed=4))
    assert [p.profile for p in plans] == ["full", "model-offload"]  # no reload back: the card has less room


def test_oom_in_the_decode_retries_the_decode_with_tiling_for_that_request(demo_settings) -> None:
    service, _ = make_service(demo_settings, Behaviour(failures=0), devices=hypothetical_devices(80))
    failures = {"left": 0}

    def decode_fails_once(vae) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    vae = wrap_vae(service._pipe, decode_fails_once)
    before = service.generate(request(seed=5, **BIG))
    failures["left"] = 1
    recovered = service.generate(request(seed=5, **BIG))
    assert recovered.recoveries == ("out of memory in the decode: turned on VAE tiling "
                                    "(full + vae-tiling, compiled on cuda:0 (bf16))",)
    assert service._pipe.calls == 2 and vae.decodes == 3  # denoised once per request, decoded again
    after = service.generate(request(seed=5, **BIG))
    assert not vae.use_tiling and after.plan.options == () and service.base_plan.options == ()
    assert np.array_equal(pixels(before.paths[0]), pixels(after.paths[0]))


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
], ids=["torch-oom", "cuda-error", "cublas", "cudnn", "host-ram", "memoryerror"])
def test_every_form_of_out_of_memory_enters_the_ladder(demo_settings, error) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=1, error=error), devices=hypothetical_devices(80))
    result = service.generate(request(seed=3, **BIG))
    assert [p.profile for p in plans] == ["full", "model-offload"]
    assert result.recoveries[0].startswith("out of memory in the denoise: stepped down to model-offload")


def test_fp8_is_never_entered_unless_the_operator_allowed_it(demo_settings) -> None:
    behaviour = Behaviour(failures=10**6)
    service, plans = make_service(demo_settings, behaviour, devices=hypothetical_devices(80))
    with pytest.raises(OutOfMemoryAfterRetries) as info:
        service.generate(request(**BIG))
    message = str(info.value)
    assert "Out of GPU memory even with the leanest placement (sequential-offload" in message
    assert "smaller size" in message and "still running" in message
    assert [p.profile for p in plans] == ["full", "model-offload", "group-offload", "sequential-offload"]
    assert not any("fp8-storage" in p.options for p in plans)
    assert service.stats().outcomes["failed"] == 1 and service.stats().oom_recoveries == 3
    behaviour.failures = 0
    assert service.generate(request(seed=5, **BIG)).plan.profile == "full"  # the next request: base again
    assert service.state == "ready"

    allowed, plans = make_service(replace(demo_settings, recovery_fp8=True), Behaviour(failures=2),
                                  devices=hypothetical_devices(80))
    assert allowed.generate(request(**BIG)).plan.options == ("fp8-storage",)
    assert [(p.profile, p.options) for p in plans][-1] == ("model-offload", ("fp8-storage",))


def test_a_request_that_fits_no_placement_is_refused_before_it_runs(demo_settings) -> None:
    # A GPU with 600 MiB usable: the demo model at 1024x1024 fits on "full"; 2048x2048 x4 fits nothing.
    reserve = demo_settings.reserve_mb * MIB
    small_gpu = DeviceFacts(gpus=(GpuFacts(0, "small GPU", 2048 * MIB, 600 * MIB + reserve),),
                            ram_total_bytes=64 * 1024 * MIB, ram_available_bytes=64 * 1024 * MIB)
    service, plans = make_service(demo_settings, Behaviour(failures=0), devices=small_gpu)
    before = service.generate(request(seed=9, width=1024, height=1024))
    with pytest.raises(RequestTooLarge) as info:
        service.submit(request(seed=9, width=2048, height=2048, num_images=4))
    message = str(info.value)
    assert "2048x2048 with 4 image(s) does not fit this GPU" in message and "The largest that fits is" in message
    assert service._pipe.calls == 1  # it never ran
    after = service.generate(request(seed=9, width=1024, height=1024))
    assert [p.profile for p in plans] == ["full"] and after.plan == before.plan
    assert np.array_equal(pixels(before.paths[0]), pixels(after.paths[0]))
    # One that fits only with tiling gets tiling for that request alone.
    tiled = service.generate(request(seed=9, width=1536, height=1536, steps=1))
    assert tiled.plan.options == ("vae-tiling",) and "runs with VAE tiling" in tiled.warnings[0]
    untiled = service.generate(request(seed=9))
    assert untiled.plan.options == () and not service._pipe.vae.use_tiling and service.base_plan.options == ()


def test_non_oom_errors_are_not_retried_and_say_internal_error(demo_settings) -> None:
    def broken(wrapper, kwargs):
        raise RuntimeError("something else")

    service, plans = make_service(demo_settings, broken)
    with pytest.raises(ZImageError, match=r"Internal error \(request [0-9a-f]+\)"):
        service.generate(request())
    assert len(plans) == 1 and service.stats().oom_recoveries == 0 and service.state == "ready"


def test_a_failed_reload_falls_back_to_the_leanest_placement_once(demo_settings) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=1), devices=hypothetical_devices(80),
                                  fail_loads=("model-offload",))
    with pytest.raises(ServiceFailed, match="now runs on sequential-offload"):
        service.generate(request(**BIG))
    assert [p.profile for p in plans] == ["full", "model-offload", "sequential-offload"]
    assert service.state == "ready" and service.base_plan.profile == "sequential-offload" and not service.fatal
    assert service.generate(request(seed=2)).paths


def test_a_reload_that_cannot_recover_fails_the_service_for_a_restart(demo_settings) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=1), devices=hypothetical_devices(80),
                                  fail_loads=("model-offload", "sequential-offload"))
    with pytest.raises(ServiceFailed, match="restarts itself"):
        service.generate(request(**BIG))
    assert service.state == "failed" and "MemoryError" in service.load_error
    assert len(service.fatal) == 1 and "reloading the pipeline for model-offload" in service.fatal[0]
    with pytest.raises(ServiceNotReady):
        service.submit(request())


def test_a_cuda_error_that_breaks_the_context_asks_for_a_restart(demo_settings) -> None:
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    service, _ = make_service(demo_settings, Behaviour(failures=1, error=error), devices=hypothetical_devices(80))
    with pytest.raises(ServiceFailed, match="unusable until the process restarts"):
        service.generate(request())
    assert service.state == "failed" and service.fatal


# --- NaN (black image) detection -----------------------------------------------------------------

def test_nan_in_fp16_is_retried_in_a_safe_dtype(demo_settings) -> None:
    def nan_in_fp16(wrapper, kwargs):
        if wrapper._pipe.transformer.dtype == torch.float16:
            return nan_latents(wrapper, kwargs)
        return wrapper._pipe(**kwargs)

    from diffusers import ZImagePipeline

    plans = []

    def factory(source, plan):
        plans.append(plan)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[plan.dtype]
        return WrappedPipeline(ZImagePipeline.from_pretrained(source.pretrained, dtype=dtype), nan_in_fp16)

    turing = hypothetical_devices(80)
    turing = replace(turing, gpus=tuple(replace(g, supports_bf16=False) for g in turing.gpus))
    service = GenerationService(demo_settings, devices=turing, pipeline_factory=factory)
    service.load()
    assert service.plan.dtype == "fp16"
    result = service.generate(request(seed=9))
    assert [p.dtype for p in plans] == ["fp16", "fp32"]
    assert "fp16 produced NaN (a black image): switched to fp32 and retried." in result.warnings
    assert not (pixels(result.paths[0]) == 0).all()
    assert service.stats().nan_retries == 1


def nan_latents(wrapper, kwargs):
    """The pipeline's latent output, all NaN (what fp16 overflow gives)."""
    output = wrapper._pipe(**kwargs)
    output.images = torch.full_like(output.images, float("nan"))
    return output


def test_nan_without_a_safer_dtype_is_an_error_not_a_black_image(demo_settings) -> None:
    service, _ = make_service(replace(demo_settings, dtype="bf16"), nan_latents)
    outputs = demo_settings.outputs_dir
    with pytest.raises(NaNOutputError, match=r"NaN \(black\) in bf16"):
        service.generate(request())
    assert not outputs.exists() or not any(outputs.iterdir())
