"""The speed options on the CPU with the demo model: regional compilation (the default on CUDA), its fallbacks, the
step cache, and the per-stage timings the planner's time model is checked against."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage import render
from zimage.service import GenerationRequest, GenerationService
from zimage.settings import Settings


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        return np.asarray(png.convert("RGB")).astype(np.int16)


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "width": 256, "height": 256, "steps": 4, "seed": 3, **kw})


def test_timings_and_stages_come_with_every_result(shared_service: GenerationService) -> None:
    result = shared_service.generate(request())
    assert {"encode_s", "denoise_s", "decode_s"} <= set(result.timings)
    assert result.timings["denoise_s"] > 0 and result.timings["decode_s"] > 0
    stages = result.timings["encode_s"] + result.timings["denoise_s"] + result.timings["decode_s"]
    assert stages <= result.timings["generate_s"] + 1e-6
    assert result.stage_peaks == {}  # no GPU figures on the CPU
    assert set(result.info()["timings"]) >= {"encode_s", "denoise_s", "decode_s", "generate_s"}


def test_the_compiled_transformer_generates_close_to_eager_at_any_size(demo_settings: Settings) -> None:
    eager = GenerationService(replace(demo_settings, compile="off"))
    eager.load()
    try:
        reference = pixels(eager.generate(request()).paths[0])
    finally:
        eager.unload()
    service = GenerationService(replace(demo_settings, compile="on"))  # auto compiles on CUDA only
    service.load()
    try:
        assert service.plan.compiled and "compiled" in service.plan.describe()
        compiled = pixels(service.generate(request()).paths[0])
        other = service.generate(request(width=384, height=256, num_images=2))  # not among the warm-up shapes
    finally:
        service.unload()
    # Compiled kernels round differently: about half a level of 255 on average here.
    assert np.abs(compiled - reference).mean() < 2.0
    assert [image.size for image in other.images] == [(384, 256)] * 2


def test_a_compile_that_fails_at_load_leaves_the_service_eager(demo_settings: Settings, monkeypatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import zimage.service as service_module

    def broken(pipe, warm_up):
        raise RuntimeError("inductor: no C++ compiler")

    monkeypatch.setattr(service_module, "compile_transformer", broken)
    service = GenerationService(replace(demo_settings, compile="on"))
    with caplog.at_level(logging.WARNING, logger="zimage.service"):
        service.load()
    try:
        assert not service.plan.compiled and not service.base_plan.compiled
        assert "compiling the transformer failed (RuntimeError: inductor: no C++ compiler): it runs eagerly" in \
            caplog.text
        assert service.generate(request()).paths
    finally:
        service.unload()


def test_a_compiled_denoise_that_fails_runs_again_eagerly(demo_settings: Settings, monkeypatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """torch's compiler can fail on a request (a recompile limit, a shape it cannot build): that request and the
    next run eagerly; an eager failure is the request's error as before."""
    import zimage.service as service_module

    monkeypatch.setattr(service_module, "compile_transformer", lambda pipe, warm_up: 0.0)  # compiled, in name
    stances: list[bool] = []
    real_stance = service_module.compiled_or_eager

    def stance(compiled: bool):
        stances.append(compiled)
        return real_stance(compiled)

    monkeypatch.setattr(service_module, "compiled_or_eager", stance)
    real_denoise = render.denoise
    failures = {"left": 1}

    def denoise(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("FailOnRecompileLimitHit: Hard failure due to fullgraph=True")
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(render, "denoise", denoise)
    service = GenerationService(replace(demo_settings, compile="on"))
    service.load()
    try:
        assert service.plan.compiled
        with caplog.at_level(logging.WARNING, logger="zimage.service"):
            first = service.generate(request())
        second = service.generate(request())
    finally:
        service.unload()
    assert first.paths and second.paths and np.array_equal(pixels(first.paths[0]), pixels(second.paths[0]))
    assert stances == [True, False, False]  # failed compiled, then eager for the retry and the next request
    assert "the compiled transformer failed (RuntimeError: FailOnRecompileLimitHit" in caplog.text
    assert not service.plan.compiled and not service.base_plan.compiled


def test_a_lora_request_runs_eagerly_and_the_next_plain_one_compiled_again(demo_settings: Settings, monkeypatch,
                                                                             tmp_path: Path) -> None:
    """peft's layers change the compiled graph: compiling again would stall a request for tens of seconds on a GPU,
    so a LoRA request runs eagerly, and a request without LoRAs takes the adapters out so that it (and those after
    it) run compiled again; the next LoRA request loads its file again and gives the same image."""
    import zimage.service as service_module
    from zimage.lora import write_demo_lora

    (tmp_path / "loras").mkdir()
    write_demo_lora(tmp_path / "loras" / "style.safetensors", "peft")
    monkeypatch.setattr(service_module, "compile_transformer", lambda pipe, warm_up: 0.0)
    stances: list[bool] = []
    real_stance = service_module.compiled_or_eager
    monkeypatch.setattr(service_module, "compiled_or_eager", lambda compiled: stances.append(compiled)
                        or real_stance(compiled))
    service = GenerationService(replace(demo_settings, compile="on", lora_dir=tmp_path / "loras"))
    service.load()
    try:
        plain = pixels(service.generate(request()).paths[0])
        styled = pixels(service.generate(request(loras=(("style", 0.8),))).paths[0])
        again = pixels(service.generate(request()).paths[0])
        assert service.loaded_loras() == []  # taken out for the compiled graph
        styled_again = pixels(service.generate(request(loras=(("style", 0.8),))).paths[0])
    finally:
        service.unload()
    assert stances == [True, False, True, False]
    assert np.array_equal(plain, again) and np.array_equal(styled, styled_again) and not np.array_equal(plain, styled)


def test_the_step_cache_generates_on_the_cpu_and_changes_the_image(demo_settings: Settings,
                                                                   shared_service: GenerationService) -> None:
    plain = pixels(shared_service.generate(request(steps=8)).paths[0])
    service = GenerationService(replace(demo_settings, memory_options=("step-cache",)))
    service.load()
    try:
        assert service.plan.options == ("step-cache",) and not service.plan.compiled
        cached = service.generate(request(steps=8))
        odd = service.generate(request(steps=3, seed=5))
        # The cache starts empty for every request: the same request gives the same image whatever ran before it
        # (an odd step count left the broadcast's counter mid-cycle before loader.reset_step_cache).
        after_odd = service.generate(request(steps=3, seed=5))
        cached_again = service.generate(request(steps=8))
    finally:
        service.unload()
    assert np.array_equal(pixels(odd.paths[0]), pixels(after_odd.paths[0]))
    assert np.array_equal(pixels(cached.paths[0]), pixels(cached_again.paths[0]))
    # Pyramid attention broadcast reuses the attention output of every second step: lossy, so the pixels move.
    assert pixels(cached.paths[0]).shape == plain.shape and not np.array_equal(pixels(cached.paths[0]), plain)
    assert "step-cache" in cached.info()["profile"]
