"""The attention backend choice (pure) and its adapter, and regional compilation, on the CPU."""

from __future__ import annotations

import pytest

from zimage.attention import AttentionBackendError, apply, choose_backend, compile_transformer

HOPPER, AMPERE = (9, 0), (8, 6)


def installed(*modules: str):
    return lambda name: name in modules


@pytest.mark.parametrize(("requested", "cuda", "capability", "modules", "candidates"), [
    ("auto", False, None, ("flash_attn",), ("native",)),  # a CPU runs torch's SDPA only
    ("auto", True, HOPPER, ("flash_attn_interface", "flash_attn"), ("_flash_3", "flash", "_native_cudnn", "native")),
    ("auto", True, AMPERE, ("flash_attn_interface", "flash_attn"), ("flash", "_native_cudnn", "native")),
    ("auto", True, AMPERE, (), ("_native_cudnn", "native")),
    ("auto", True, AMPERE, ("sageattention",), ("sage", "_native_cudnn", "native")),
    ("native", False, None, (), ("native",)),
    ("flash", True, AMPERE, ("flash_attn",), ("flash",)),
    ("_flash_3", True, None, ("flash_attn_interface",), ("_flash_3",)),  # capability unknown at start-up
])
def test_choose_backend(requested, cuda, capability, modules, candidates) -> None:
    assert choose_backend(requested, cuda=cuda, compute_capability=capability,
                          installed=installed(*modules)).candidates == candidates


@pytest.mark.parametrize(("requested", "cuda", "capability", "message"), [
    ("flash", True, AMPERE, r"needs the package flash-attn \(module flash_attn\)"),
    ("sage", True, AMPERE, "needs the package sageattention"),
    ("_flash_3", True, AMPERE, "runs on Hopper GPUs only"),
    ("flash", False, None, "needs a CUDA GPU"),
    ("xformers", True, AMPERE, "is not valid"),
])
def test_a_backend_that_cannot_run_is_refused_naming_the_fix(requested, cuda, capability, message) -> None:
    with pytest.raises(AttentionBackendError, match=message):
        choose_backend(requested, cuda=cuda, compute_capability=capability,
                       installed=installed("flash_attn_interface") if requested == "_flash_3" else installed())


class Transformer:
    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse, self.calls = refuse, []

    def set_attention_backend(self, name: str) -> None:
        self.calls.append(name)
        if name in self.refuse:
            raise RuntimeError(f"{name} is not usable")

    def compile_repeated_blocks(self, fullgraph: bool) -> None:
        self.calls.append(("compile", fullgraph))


class Pipe:
    def __init__(self, transformer: Transformer) -> None:
        self.transformer = transformer


def test_apply_on_a_cpu_keeps_diffusers_default() -> None:
    pipe = Pipe(Transformer())
    assert apply(pipe, "auto", "cpu") == "native" and pipe.transformer.calls == []


def test_compile_compiles_the_repeated_blocks_then_warms_up() -> None:
    pipe, warmed = Pipe(Transformer()), []
    seconds = compile_transformer(pipe, lambda: warmed.append(pipe.transformer.calls[:]))
    assert warmed == [[("compile", True)]] and seconds >= 0  # the warm-up runs on the compiled blocks


def test_the_demo_model_generates_with_the_native_backend_named(demo_settings) -> None:
    from dataclasses import replace

    from zimage.service import GenerationRequest, GenerationService

    service = GenerationService(replace(demo_settings, attention_backend="native"))
    service.load()
    try:
        assert service.attention_backend == "native"
        assert service.generate(GenerationRequest(prompt="a cat", width=256, height=256, steps=1, seed=1)).paths
    finally:
        service.close()


def test_app_start_up_refuses_a_missing_kernel_package(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    from servers import free_port

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "app.py", "--demo", "--device", "cpu", "--attention-backend", "flash",
                           "--outputs-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
                           "--port", str(free_port())], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
