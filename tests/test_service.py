"""The generation service on the demo model: validation, determinism, progress, OOM and NaN recovery."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fakes import WrappedPipeline, nan_output, oom
from zimage.errors import (
    GenerationCancelled,
    NaNOutputError,
    OutOfMemoryAfterRetries,
    ServiceNotReady,
    ValidationError,
)
from zimage.planner import hypothetical_devices
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


# --- Validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"prompt": "x" * 4001}, "prompt is 4001 characters long: the limit is 4000"),
        ({"width": 1000}, "width=1000 is not a multiple of 16: use 992 or 1008"),
        ({"height": 100}, "height=100 is out of range: use 256 to 2048 pixels"),
        ({"width": 4096}, "width=4096 is out of range: use 256 to 2048 pixels"),
        ({"width": 512.0}, "width=512.0 must be a whole number of pixels"),
        ({"steps": 0}, "steps=0 is out of range: use 1 to 50 (Turbo's default is 8)"),
        ({"steps": 51}, "steps=51 is out of range"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0 is out of range: use 0 to 10"),
        ({"guidance_scale": 11}, "guidance_scale=11 is out of range"),
        ({"num_images": 0}, "num_images=0 is out of range: use 1 to 4"),
        ({"num_images": 5}, "num_images=5 is out of range: use 1 to 4"),
        ({"seed": -1}, "seed=-1 is out of range: use 0 to 4294967295"),
        ({"seed": 2**32}, "seed=4294967296 is out of range"),
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
    assert meta["model"] == "demo (random weights)" and meta["profile"] == "cpu (bf16)"
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


def test_progress_is_reported_per_step(shared_service: GenerationService) -> None:
    seen: list[tuple[int, int]] = []
    shared_service.generate(request(steps=5), on_progress=lambda step, total: seen.append((step, total)))
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]


def test_long_prompt_is_truncated_with_a_warning(shared_service: GenerationService) -> None:
    long_prompt = " ".join(["cat"] * 700)
    result = shared_service.generate(request(long_prompt))
    (warning,) = result.warnings
    assert f"the text encoder reads the first {MAX_PROMPT_TOKENS}" in warning
    assert shared_service.generate(request("a short prompt")).warnings == ()


def test_cancel_stops_the_job_and_the_next_one_runs(shared_service: GenerationService) -> None:
    cancel = threading.Event()
    steps: list[int] = []

    def progress(step: int, total: int) -> None:
        steps.append(step)
        cancel.set()

    before = shared_service.stats().jobs_cancelled
    with pytest.raises(GenerationCancelled):
        shared_service.generate(request(steps=8), on_progress=progress, cancel=cancel)
    assert steps == [1]  # the pipeline skipped the remaining steps
    assert shared_service.stats().jobs_cancelled == before + 1
    assert shared_service.generate(request(seed=1)).paths


def test_one_job_at_a_time(shared_service: GenerationService) -> None:
    running = []
    overlap = []

    def progress(step: int, total: int) -> None:
        running.append(threading.get_ident())
        if shared_service.busy is False:
            overlap.append("not marked busy")

    threads = [threading.Thread(target=shared_service.generate, args=(request(seed=i),),
                                kwargs={"on_progress": progress}) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Steps of one job are never interleaved with another's: the thread ids come in runs of 2.
    runs = [running[i:i + 2] for i in range(0, len(running), 2)]
    assert len(runs) == 3 and all(len(set(r)) == 1 for r in runs)
    assert not overlap


def test_saving_happens_outside_the_lock_so_the_next_job_starts(demo_settings) -> None:
    from zimage.storage import OutputStore

    events: list[str] = []

    class SlowStore(OutputStore):
        def save(self, image, request_id, index, metadata):
            events.append(f"save start {metadata['seed']}")
            time.sleep(0.5)
            path = super().save(image, request_id, index, metadata)
            events.append(f"save end {metadata['seed']}")
            return path

    service = GenerationService(demo_settings, store=SlowStore(demo_settings.outputs_dir))
    service.load()

    def job(seed: int) -> None:
        service.generate(request(seed=seed, steps=2),
                         on_progress=lambda step, total: events.append(f"step {seed}") if step == 1 else None)

    first = threading.Thread(target=job, args=(1,))
    first.start()
    while "step 1" not in events:
        time.sleep(0.01)
    second = threading.Thread(target=job, args=(2,))
    second.start()
    first.join(60)
    second.join(60)
    # The second job denoised while the first was still being written.
    assert events.index("step 2") < events.index("save end 1"), events
    assert service.wait_idle(1) and not service.busy


def test_not_ready_and_shutdown_refuse_jobs(demo_settings) -> None:
    service = GenerationService(demo_settings)
    with pytest.raises(ServiceNotReady, match="still loading"):
        service.generate(request())
    service.load()
    service.begin_shutdown()
    with pytest.raises(ServiceNotReady, match="shutting down"):
        service.generate(request())


def test_a_job_waiting_for_the_gpu_when_shutdown_begins_is_refused(demo_settings) -> None:
    service = GenerationService(demo_settings)
    service.load()
    started, outcome = threading.Event(), []

    def first_progress(step: int, total: int) -> None:
        started.set()
        time.sleep(0.2)

    def second() -> None:
        try:
            service.generate(request(seed=2))
            outcome.append("ran")
        except ServiceNotReady as exc:
            outcome.append(str(exc))

    first = threading.Thread(target=service.generate, args=(request(seed=1, steps=4),),
                             kwargs={"on_progress": first_progress})
    first.start()
    started.wait(30)
    waiting = threading.Thread(target=second)
    waiting.start()
    time.sleep(0.1)  # the second job is now blocked on the GPU lock
    service.begin_shutdown()
    first.join(60)
    waiting.join(60)
    assert outcome == ["The service is shutting down: try again in a moment."]
    assert service.wait_idle(1)


def test_failed_load_is_reported(tmp_path: Path) -> None:
    from zimage.errors import ModelNotFoundError
    from zimage.settings import Settings

    service = GenerationService(Settings(model=str(tmp_path / "missing"), outputs_dir=tmp_path))
    with pytest.raises(ModelNotFoundError):
        service.load()
    assert service.state == "failed"
    with pytest.raises(ServiceNotReady, match="failed to load: Model"):
        service.generate(request())


# --- Out-of-memory recovery ---------------------------------------------------------------------

class Behaviour:
    """Fail the first ``failures`` calls with an OOM, then run the real pipeline."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self, wrapper: WrappedPipeline, kwargs: dict):
        if self.failures > 0:
            self.failures -= 1
            raise oom()
        return wrapper._pipe(**kwargs)


def make_service(settings, behaviour, devices=None) -> tuple[GenerationService, list]:
    from diffusers import ZImagePipeline

    plans: list = []

    def factory(source, plan):
        plans.append(plan)
        # The real tiny pipeline on the CPU; only the GPU it was planned for is pretended.
        return WrappedPipeline(ZImagePipeline.from_pretrained(source.pretrained, dtype=torch.bfloat16), behaviour)

    service = GenerationService(settings, devices=devices, pipeline_factory=factory)
    service.load()
    return service, plans


def test_oom_once_recovers_with_vae_tiling_on_cpu(demo_settings) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=1))
    result = service.generate(request(seed=3))
    assert result.recoveries == ("out of memory: turned on VAE tiling (cpu + vae-tiling (bf16))",)
    assert service.plan.options == ("vae-tiling",) and len(plans) == 1  # switched in place
    assert service._pipe.vae.use_tiling
    assert service.stats().oom_recoveries == 1 and service.stats().jobs_succeeded == 1


def test_oom_steps_down_gpu_profiles_by_reloading(demo_settings) -> None:
    service, plans = make_service(demo_settings, Behaviour(failures=2), devices=hypothetical_devices(80))
    assert plans[0].profile == "full"
    result = service.generate(request(seed=3))
    assert [r.split(" (")[0] for r in result.recoveries] == [
        "out of memory: turned on VAE tiling", "out of memory: stepped down to model-offload"]
    assert [p.profile for p in plans] == ["full", "model-offload"]
    assert plans[1].options == ("vae-tiling",)
    assert result.plan.profile == "model-offload" and read_metadata(result.paths[0])["profile"].startswith(
        "model-offload + vae-tiling")


def test_oom_every_time_ends_in_a_clear_error_and_the_service_survives(demo_settings) -> None:
    behaviour = Behaviour(failures=10**6)
    service, _ = make_service(demo_settings, behaviour, devices=hypothetical_devices(80))
    with pytest.raises(OutOfMemoryAfterRetries) as info:
        service.generate(request())
    message = str(info.value)
    assert "Out of GPU memory even with the leanest placement (sequential-offload" in message
    assert "smaller size" in message and "still running" in message
    assert service.stats().jobs_failed == 1 and service.stats().oom_recoveries == 5
    behaviour.failures = 0
    assert service.generate(request(seed=5)).paths  # the next request succeeds
    assert service.state == "ready"


def test_non_oom_errors_are_not_retried(demo_settings) -> None:
    def broken(wrapper, kwargs):
        raise RuntimeError("something else")

    service, plans = make_service(demo_settings, broken)
    with pytest.raises(RuntimeError, match="something else"):
        service.generate(request())
    assert len(plans) == 1 and service.stats().oom_recoveries == 0


# --- NaN (black image) detection -----------------------------------------------------------------

def test_nan_in_fp16_is_retried_in_a_safe_dtype(demo_settings) -> None:
    def nan_in_fp16(wrapper, kwargs):
        if wrapper._pipe.transformer.dtype == torch.float16:
            return nan_output(kwargs)
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


def test_nan_without_a_safer_dtype_is_an_error_not_a_black_image(demo_settings) -> None:
    service, _ = make_service(demo_settings, lambda wrapper, kwargs: nan_output(kwargs))
    outputs = demo_settings.outputs_dir
    with pytest.raises(NaNOutputError, match="NaN \\(black\\) in bf16"):
        service.generate(request())
    assert not outputs.exists() or not any(outputs.iterdir())
