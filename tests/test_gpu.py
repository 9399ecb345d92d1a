"""GPU tier (opt-in: ZIMAGE_TEST_GPU=1 on a CUDA machine): the real diffusers placement calls on the demo model.

On CPU machines these are skipped; there the same plans are checked with recording fakes
(tests/test_loader.py) because enable_model_cpu_offload and friends need an accelerator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.gpu

PROFILES = [("full", ()), ("full", ("vae-tiling", "fp8-storage")), ("model-offload", ()),
            ("model-offload", ("fp8-storage",)), ("group-offload", ()), ("sequential-offload", ()),
            ("transformer-resident", ()), ("transformer-resident", ("fp8-storage", "te-fp8-storage")),
            ("full", ("te-fp8-storage",)), ("group-offload", ("fp8-storage",)),
            ("sequential-offload", ("fp8-storage",)),  # the recovery ladder's last rung below an fp8 plan
            ("full", ("fp8-compute",)), ("transformer-resident", ("fp8-compute", "te-fp8-storage")),
            ("full", ("step-cache",))]
LOSSY = {"fp8-storage", "te-fp8-storage", "fp8-compute", "step-cache"}


def _needs(options: tuple[str, ...]) -> None:
    """Skip what this GPU cannot run: fp8 compute needs fp8 tensor cores (8.9+) and torchao."""
    import importlib.util

    import torch

    if "fp8-compute" in options and (torch.cuda.get_device_capability(0) < (8, 9)
                                     or importlib.util.find_spec("torchao") is None):
        pytest.skip("fp8-compute needs compute capability 8.9+ and torchao")


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return _generate(data_dir, tmp_path_factory.mktemp("ref"), "full", ())


def _generate(data_dir: Path, out: Path, profile: str, options: tuple[str, ...], compile: str = "off",
              size: tuple[int, int] = (256, 256)) -> np.ndarray:
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    # Eager unless asked: compiling the demo transformer for every placement would take most of the tier's time.
    settings = Settings(demo=True, data_dir=data_dir, outputs_dir=out, device="cuda:0", memory_profile=profile,
                        memory_options=options, compile=compile)
    service = GenerationService(settings)
    service.load()
    assert service.plan.profile == profile and service.plan.device == "cuda:0"
    assert service.plan.compiled == (compile != "off")
    result = service.generate(GenerationRequest(prompt="a cat", width=size[0], height=size[1], steps=4, seed=3))
    assert set(result.stage_peaks) == {"encode", "denoise", "decode"}  # measured per stage on CUDA
    service.unload()
    with Image.open(result.paths[0]) as png:
        return np.asarray(png.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("profile, options", PROFILES)
def test_each_placement_generates_on_the_gpu(data_dir: Path, tmp_path: Path, reference: np.ndarray,
                                             profile: str, options: tuple[str, ...]) -> None:
    _needs(options)
    pixels = _generate(data_dir, tmp_path, profile, options)
    assert pixels.shape == (256, 256, 3)
    if not LOSSY & set(options):
        # Offloading moves weights, it does not change the arithmetic: (nearly) the same image.
        assert np.abs(pixels - reference).mean() < 2.0


@pytest.mark.parametrize("profile, options", PROFILES)
def test_each_placement_runs_the_controlnet_modes_on_the_gpu(data_dir: Path, tmp_path: Path, profile: str,
                                                             options: tuple[str, ...]) -> None:
    """The demo ControlNet under every placement (zimage.loader.place_mode_pipeline): on a GPU a module left on the
    CPU fails with a device mismatch, which the CPU tier cannot show."""
    from zimage.errors import ValidationError
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    _needs(options)
    control = Image.new("RGB", (256, 256), (255, 255, 255))
    control.paste((0, 0, 0), (0, 0, 128, 256))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 256, 128))
    settings = Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path, device="cuda:0", memory_profile=profile,
                        memory_options=options, compile="off")
    service = GenerationService(settings)
    service.load()
    try:
        if profile == "sequential-offload":  # diffusers 0.42.1 cannot (zimage.loader.SEQUENTIAL_CONTROLNET)
            with pytest.raises(ValidationError, match="cannot run on the sequential-offload placement"):
                service.submit(GenerationRequest(prompt="a cat", width=256, height=256, control_image=control))
            return
        for extra in ({}, {"image": control, "mask": mask}):
            result = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, steps=4, seed=3,
                                                        control_image=control, **extra))
            assert result.request.mode == ("controlnet_inpaint" if extra else "controlnet")
        text = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, steps=4, seed=3))
        assert text.request.mode == "text"  # the base pipeline still works after the ControlNet pipelines
    finally:
        service.unload()


@pytest.mark.parametrize("profile", ["full", "transformer-resident", "model-offload", "group-offload"])
def test_a_gguf_transformer_generates_under_each_placement_on_the_gpu(data_dir: Path, tmp_path: Path,
                                                                      reference: np.ndarray, profile: str) -> None:
    """The demo transformer as GGUF Q8_0 (--transformer-file) on CUDA: diffusers dequantizes on the GPU, and the
    offload hooks move the quantized parameters; the image stays close to the bf16 one."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage.demo_model import build_demo_model
    from zimage.gguf_files import write_transformer_gguf
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    folder = tmp_path / "demo"
    build_demo_model(folder)
    transformer = ZImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    write_transformer_gguf(transformer, folder / "transformer.gguf", "Q8_0")
    service = GenerationService(Settings(model=str(folder), data_dir=data_dir, outputs_dir=tmp_path / "out",
                                         device="cuda:0", memory_profile=profile, compile="off",
                                         transformer_file=folder / "transformer.gguf"))
    service.load()
    try:
        result = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, steps=4, seed=3))
    finally:
        service.unload()
    with Image.open(result.paths[0]) as png:
        pixels = np.asarray(png.convert("RGB")).astype(np.int16)
    # The demo folder is the same seeded model as the reference's; Q8_0 stayed within 1.5 levels of bf16 on the CPU
    # (tests/test_gguf.py), GPU kernels add their own rounding.
    assert pixels.shape == (256, 256, 3) and np.abs(pixels - reference).mean() < 3.0


def test_the_compiled_transformer_generates_at_any_size_on_the_gpu(data_dir: Path, tmp_path: Path,
                                                                    reference: np.ndarray) -> None:
    """--compile auto (the default) on CUDA: the blocks are compiled and warmed up at load; the image stays close to
    the eager one, and a size the warm-up did not see generates."""
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    service = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path, device="cuda:0",
                                         memory_profile="full"))
    service.load()
    try:
        assert service.plan.compiled
        first = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, steps=4, seed=3))
        other = service.generate(GenerationRequest(prompt="a cat", width=384, height=256, steps=4, seed=3))
    finally:
        service.unload()
    with Image.open(first.paths[0]) as png:
        pixels = np.asarray(png.convert("RGB")).astype(np.int16)
    # Compiled kernels round differently from eager ones (about 0.5 of 255 levels on the CPU).
    assert np.abs(pixels - reference).mean() < 3.0
    assert other.images[0].size == (384, 256)
