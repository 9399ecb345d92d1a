"""ControlNet modes on the demo model's tiny ControlNet, the mode pipelines' shared weights and placements, and the
model family's request defaults (Turbo vs Z-Image base)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage import render
from zimage.errors import ModelNotFoundError, ValidationError
from zimage.loader import (
    ControlNetSource,
    apply_plan,
    choose_controlnet_file,
    denoise_placement,
    enable_group_offload,
    load_controlnet,
    place_mode_pipeline,
    resolve_controlnet_source,
)
from zimage.model_family import BASE, TURBO, detect_family
from zimage.planner import PUBLISHED_SIZES, MemoryPlan, hypothetical_devices, plan_memory
from zimage.service import GenerationRequest, GenerationService, validate_request
from zimage.settings import Settings, SettingsError
from zimage.storage import read_metadata

ROOT = Path(__file__).resolve().parents[1]
ALL_MODES = ("text", "img2img", "inpaint", "controlnet", "controlnet_inpaint")


def control_picture(size=(256, 256)) -> Image.Image:
    """A black-and-white edge map: the left half black."""
    image = Image.new("RGB", size, (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def photo(size=(256, 256)) -> Image.Image:
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((30, 30, 220), (0, 0, size[0] // 2, size[1] // 2))
    return image


def top_mask(size=(256, 256)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0], size[1] // 2))
    return mask


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "width": 256, "height": 256, "seed": 5, **kw})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


# --- Through the service --------------------------------------------------------------------------------------

def test_the_control_image_steers_the_image_and_is_recorded(shared_service: GenerationService) -> None:
    assert shared_service.has_controlnet and shared_service.controlnet_label == "demo ControlNet (random weights)"
    seen: list[tuple[int, int]] = []
    text = shared_service.generate(request())
    steered = shared_service.generate(
        request(control_image=control_picture(), inputs=(("edges.png", "cd" * 32, "control_image"),)),
        on_progress=lambda p: seen.append((p.step, p.total)) if p.stage == "denoising" and p.step else None)
    off = shared_service.generate(request(control_image=control_picture(), controlnet_conditioning_scale=0.0))
    other = shared_service.generate(request(control_image=control_picture().transpose(Image.Transpose.ROTATE_90),
                                            controlnet_conditioning_scale=1.0))
    assert not np.array_equal(pixels(steered.paths[0]), pixels(text.paths[0]))
    # Scale 0 multiplies the ControlNet's hints by 0: the same pixels as text-to-image with that seed.
    assert np.array_equal(pixels(off.paths[0]), pixels(text.paths[0]))
    assert not np.array_equal(pixels(other.paths[0]), pixels(steered.paths[0]))
    assert [step for step, _ in seen] == list(range(1, 9)) and {total for _, total in seen} == {8}
    meta = read_metadata(steered.paths[0])
    assert meta["mode"] == "controlnet" and meta["controlnet_conditioning_scale"] == 0.75
    assert meta["controlnet"] == "demo ControlNet (random weights)" and "strength" not in meta
    assert meta["inputs"] == [{"name": "edges.png", "sha256": "cd" * 32, "role": "control_image"}]
    assert "controlnet_conditioning_scale" not in read_metadata(text.paths[0])


def test_controlnet_inpainting_runs_every_step_without_strength(shared_service: GenerationService) -> None:
    seen: list[tuple[int, int]] = []
    result = shared_service.generate(request(image=photo(), mask=top_mask(), control_image=control_picture(),
                                             controlnet_conditioning_scale=1.5),
                                     on_progress=lambda p: seen.append((p.step, p.total))
                                     if p.stage == "denoising" and p.step else None)
    plain = shared_service.generate(request(image=photo(), mask=top_mask()))
    assert result.request.mode == "controlnet_inpaint" and result.request.strength is None
    assert seen[-1] == (8, 8) and len(seen) == 8  # no strength: the whole schedule runs
    meta = read_metadata(result.paths[0])
    assert meta["mode"] == "controlnet_inpaint" and meta["controlnet_conditioning_scale"] == 1.5
    assert "strength" not in meta
    assert not np.array_equal(pixels(result.paths[0]), pixels(plain.paths[0]))


def test_controlnet_inpainting_makes_several_images_at_once(shared_service: GenerationService) -> None:
    # diffusers 0.42.1 does not repeat the mask for num_images_per_prompt; render.denoise passes one per image.
    result = shared_service.generate(request(image=photo(), mask=top_mask(), control_image=control_picture(),
                                             num_images=2, steps=2))
    assert len(result.paths) == 2 and result.seeds == (5, 6)
    assert not np.array_equal(pixels(result.paths[0]), pixels(result.paths[1]))


@pytest.mark.parametrize("mode", ["controlnet", "controlnet_inpaint"])
def test_denoise_calls_back_once_per_step(shared_service: GenerationService, mode: str) -> None:
    base = shared_service._pipe
    pipe = render.mode_pipeline(base, mode, controlnet=shared_service._controlnet)
    calls: list[tuple[int, int]] = []
    embeds = render.encode(base, "a cat", 0.0)
    extra = {"image": photo(), "mask": top_mask()} if mode == "controlnet_inpaint" else {}
    latents = render.denoise(pipe, embeds, width=256, height=256, steps=5, guidance_scale=0.0, seeds=[1],
                             on_step=lambda step, total: calls.append((step, total)), should_stop=lambda: False,
                             control_image=control_picture(), **extra)
    assert calls == [(step, 5) for step in range(1, 6)] and latents is not None


def test_a_controlnet_request_without_a_controlnet_is_refused(data_dir: Path, tmp_path: Path) -> None:
    service = GenerationService(Settings(demo=True, controlnet="none", data_dir=data_dir, outputs_dir=tmp_path))
    assert not service.has_controlnet
    with pytest.raises(ValidationError, match=r"a control image needs a ControlNet and this server runs without "
                                              r"one: start it with --controlnet ID_OR_PATH"):
        service.submit(request(control_image=control_picture()))
    assert service.stats().outcomes["invalid"] == 1


@pytest.mark.parametrize(("changes", "message"), [
    ({"control_image": control_picture(), "image": photo()},
     "a control image with an input image but no mask: diffusers has no ControlNet image-to-image"),
    ({"control_image": control_picture(), "image": photo(), "mask": top_mask(), "strength": 0.5},
     "strength=0.5 does not apply to ControlNet inpainting"),
    ({"control_image": control_picture(), "strength": 0.5}, "strength=0.5 applies to image-to-image and inpainting"),
    ({"control_image": control_picture((320, 256))}, "the control image is (320, 256) but the request is 256x256"),
    ({"control_image": control_picture(), "controlnet_conditioning_scale": 2.5},
     "controlnet_conditioning_scale=2.5 is out of range: use 0 to 2"),
    ({"control_image": control_picture(), "controlnet_conditioning_scale": -0.1},
     "controlnet_conditioning_scale=-0.1 is out of range"),
    ({"control_image": control_picture(), "controlnet_conditioning_scale": True},
     "controlnet_conditioning_scale=True is out of range"),
    ({"control_image": control_picture(), "controlnet_conditioning_scale": "1"},
     "controlnet_conditioning_scale='1' is out of range"),
    ({"control_image": control_picture(), "controlnet_conditioning_scale": float("nan")},
     "controlnet_conditioning_scale=nan is out of range"),
    ({"controlnet_conditioning_scale": 0.5}, "controlnet_conditioning_scale=0.5 applies only with a control image"),
    ({"negative_prompt": 3}, "negative_prompt=3 must be text"),
    ({"negative_prompt": "x" * 4001}, "negative_prompt is 4001 characters long: the limit is 4000"),
])
def test_controlnet_inputs_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_request(replace(request(), **changes))


def test_validated_controlnet_requests_get_the_default_scale_and_no_strength() -> None:
    checked = validate_request(request(control_image=control_picture()))
    assert (checked.controlnet_conditioning_scale, checked.strength, checked.mode) == (0.75, None, "controlnet")
    assert validate_request(request(control_image=control_picture(), controlnet_conditioning_scale=2)
                            ).controlnet_conditioning_scale == 2.0
    sized = checked.size
    assert sized.controlnet and sized.encode and not request().size.encode


# --- Shared weights and placements, for every mode ------------------------------------------------------------

def _storages(module: torch.nn.Module) -> set[int]:
    return {parameter.data_ptr() for parameter in module.parameters()}


def test_every_mode_pipeline_shares_the_loaded_weights(shared_service: GenerationService) -> None:
    base, controlnet = shared_service._pipe, shared_service._controlnet
    dtype = base.transformer.dtype
    for mode in ALL_MODES:
        pipe = render.mode_pipeline(base, mode, controlnet=controlnet)
        for name in ("transformer", "text_encoder", "vae"):
            assert _storages(getattr(pipe, name)) == _storages(getattr(base, name)), (mode, name)
        if mode.startswith("controlnet"):
            assert pipe.controlnet is controlnet
            # The modules it borrows are the transformer's own (diffusers' from_transformer): no second copy.
            assert pipe.controlnet.t_embedder is base.transformer.t_embedder
            assert _storages(pipe.controlnet.noise_refiner) <= _storages(base.transformer)
    assert base.transformer.dtype == dtype and base.vae.dtype == dtype  # building the pipelines cast nothing


def _demo_pipe(data_dir: Path):
    from diffusers import ZImagePipeline

    from zimage.demo_model import demo_model_path

    return ZImagePipeline.from_pretrained(demo_model_path(data_dir), dtype=torch.bfloat16)


def _controlnet_source(data_dir: Path) -> ControlNetSource:
    settings = Settings(demo=True, data_dir=data_dir)
    source = resolve_controlnet_source(settings)
    assert source is not None and source.is_demo
    return source


def _cpu_plan(profile: str = "cpu", options: tuple[str, ...] = ()) -> MemoryPlan:
    plan = plan_memory(hypothetical_devices(0, cpu_bf16=True), PUBLISHED_SIZES)  # bf16 on the CPU
    return replace(plan, profile=profile, options=options)


def _controlnet_images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a cat", width=256, height=256, num_inference_steps=2, guidance_scale=0.0,
                control_image=control_picture(), generator=torch.Generator().manual_seed(1), output_type="np").images


def _has_offload_hook(module: torch.nn.Module) -> bool:
    # accelerate keeps its hook in this attribute; diffusers itself checks it the same way (no public query).
    return hasattr(module, "_hf_hook")


def _has_diffusers_hook(module: torch.nn.Module, name: str) -> bool:
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(module).get_hook(name) is not None


@pytest.fixture(scope="module")
def controlnet_reference(data_dir: Path) -> np.ndarray:
    base = _demo_pipe(data_dir)
    controlnet = load_controlnet(_controlnet_source(data_dir), _cpu_plan(), base)
    return _controlnet_images(render.mode_pipeline(base, "controlnet", controlnet))


def test_model_offload_places_the_denoiser_as_one_around_a_controlnet_denoise(
        data_dir: Path, controlnet_reference: np.ndarray) -> None:
    base = _demo_pipe(data_dir)
    base.enable_model_cpu_offload(device="cpu")  # the real call; on a CPU it needs the device given
    plan = _cpu_plan("model-offload")
    controlnet = load_controlnet(_controlnet_source(data_dir), plan, base)
    pipes = {mode: render.mode_pipeline(base, mode, controlnet) for mode in ALL_MODES}
    for mode, pipe in pipes.items():
        assert all(_has_offload_hook(getattr(pipe, name)) for name in ("text_encoder", "transformer", "vae")), mode
    place_mode_pipeline(pipes["controlnet"], plan)  # nothing at load: diffusers' hooks cannot carry it (loader)
    assert not _has_offload_hook(controlnet)
    # Around the denoise: no hooks (the ControlNet borrows the transformer's first parameter, which makes
    # accelerate's hook skip moving the transformer), the denoiser on the device as one, the text encoder in RAM.
    # "meta" stands in for the GPU: it shows what moved where (and cannot be copied back: the exit fails here).
    placement = denoise_placement(pipes["controlnet"], base, replace(plan, device="meta"))
    placement.__enter__()
    assert not any(_has_offload_hook(getattr(base, name)) for name in ("text_encoder", "transformer", "vae"))
    for module in (base.transformer, controlnet, base.vae):
        assert {p.device.type for p in module.parameters()} == {"meta"}
    assert {p.device.type for p in base.text_encoder.parameters()} == {"cpu"}
    with pytest.raises(NotImplementedError, match="meta"):
        placement.__exit__(None, None, None)


def test_model_offload_controlnet_denoise_gives_the_same_image_and_restores_the_hooks(
        data_dir: Path, controlnet_reference: np.ndarray) -> None:
    base = _demo_pipe(data_dir)
    base.enable_model_cpu_offload(device="cpu")
    plan = _cpu_plan("model-offload")
    controlnet = load_controlnet(_controlnet_source(data_dir), plan, base)
    pipe = render.mode_pipeline(base, "controlnet", controlnet)
    place_mode_pipeline(pipe, plan)
    with denoise_placement(pipe, base, plan):
        images = _controlnet_images(pipe)
    assert np.array_equal(images, controlnet_reference)  # placement moves weights, it does not change them
    assert all(_has_offload_hook(getattr(base, name)) for name in ("text_encoder", "transformer", "vae"))
    assert not _has_offload_hook(controlnet)
    # A text-to-image request after it still runs on the base pipeline's hooks.
    base.set_progress_bar_config(disable=True)
    assert base(prompt="a cat", width=256, height=256, num_inference_steps=2, guidance_scale=0.0,
                output_type="np").images.shape == (1, 256, 256, 3)


def test_group_offload_survives_and_the_controlnet_is_group_offloaded(
        data_dir: Path, controlnet_reference: np.ndarray) -> None:
    base = _demo_pipe(data_dir)
    enable_group_offload(base, "cpu", use_streams=False)  # the real call, onloading to the CPU
    plan = _cpu_plan("group-offload")
    controlnet = load_controlnet(_controlnet_source(data_dir), plan, base)
    pipes = {mode: render.mode_pipeline(base, mode, controlnet) for mode in ALL_MODES}
    for pipe in pipes.values():
        assert _has_diffusers_hook(pipe.transformer.layers[0], "group_offloading")
        assert _has_diffusers_hook(pipe.text_encoder.layers[0].mlp.up_proj, "group_offloading")  # leaf level
    assert not _has_diffusers_hook(controlnet.control_layers[0], "group_offloading")
    for mode in ("controlnet", "controlnet_inpaint"):  # both ControlNet pipelines place the one ControlNet
        place_mode_pipeline(pipes[mode], plan)
    assert _has_diffusers_hook(controlnet.control_layers[0], "group_offloading")
    # Its own top-level group: the embedders it borrows are on the onload device when it runs.
    assert _has_diffusers_hook(controlnet, "group_offloading")
    assert np.array_equal(_controlnet_images(pipes["controlnet"]), controlnet_reference)


def test_fp8_storage_survives_and_covers_the_controlnet(data_dir: Path) -> None:
    base = _demo_pipe(data_dir)
    plan = _cpu_plan(options=("fp8-storage",))
    apply_plan(base, plan)
    controlnet = load_controlnet(_controlnet_source(data_dir), plan, base)
    assert controlnet.control_layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    for mode in ALL_MODES:
        render.mode_pipeline(base, mode, controlnet)
    assert base.transformer.layers[0].attention.to_q.weight.dtype == torch.float8_e4m3fn
    images = _controlnet_images(render.mode_pipeline(base, "controlnet", controlnet))
    assert images.shape == (1, 256, 256, 3) and not np.isnan(images).any()


def test_sequential_offload_cannot_carry_a_controlnet_so_its_requests_are_refused(
        data_dir: Path, tmp_path: Path, shared_service: GenerationService) -> None:
    # diffusers' own call fails on a fresh ControlNet pipeline: the transformer's offload moves the modules the
    # ControlNet borrows to the meta device first. If a diffusers upgrade fixes this, this test says so.
    base = _demo_pipe(data_dir)
    controlnet = load_controlnet(_controlnet_source(data_dir), _cpu_plan(), base)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        render.mode_pipeline(base, "controlnet", controlnet).enable_sequential_cpu_offload(device="cpu")
    from zimage.planner import PlanError

    pipe = render.mode_pipeline(shared_service._pipe, "controlnet", shared_service._controlnet)
    with pytest.raises(PlanError, match="cannot run on the sequential-offload placement"):
        place_mode_pipeline(pipe, _cpu_plan("sequential-offload"))
    service = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path))
    service.base_plan = replace(_cpu_plan("sequential-offload"), device="cuda:0")
    with pytest.raises(ValidationError, match="This server runs on sequential offload, and the ControlNet cannot"):
        service.submit(request(control_image=control_picture()))


def test_the_out_of_memory_ladder_skips_sequential_offload_for_controlnet_requests() -> None:
    from zimage.planner import PUBLISHED_CONTROLNET, RequestSize, with_controlnet
    from zimage.recovery import FAIL, OOM, RETRY, next_action

    sizes = with_controlnet(PUBLISHED_SIZES, PUBLISHED_CONTROLNET, 15)
    base = plan_memory(hypothetical_devices(8), sizes, requested_profile="group-offload")
    text = next_action(OOM, "denoise", base, base, RequestSize(), sizes, allow_fp8=False, error_text="oom")
    control = next_action(OOM, "denoise", base, base, RequestSize(encode=True, controlnet=True), sizes,
                          allow_fp8=False, error_text="oom")
    assert (text.kind, text.plan.profile) == (RETRY, "sequential-offload")
    assert control.kind == FAIL and "leanest placement" in control.message


# --- ControlNet sources ---------------------------------------------------------------------------------------

def test_the_demo_model_has_a_controlnet_of_the_real_class(data_dir: Path) -> None:
    from diffusers import ZImageControlNetModel

    from zimage.demo_model import DEMO_MODEL_VERSION, demo_model_path
    from zimage.model_files import controlnet_stats

    folder = demo_model_path(data_dir)
    assert DEMO_MODEL_VERSION >= 2 and folder.name == f"demo-model-v{DEMO_MODEL_VERSION}"
    controlnet = ZImageControlNetModel.from_pretrained(folder / "controlnet")
    stats, hints = controlnet_stats(folder / "controlnet")
    assert stats.params == sum(p.numel() for p in controlnet.parameters())  # its own weights only
    assert hints == len(controlnet.config.control_layers_places) and stats.hidden_size == 32
    assert controlnet.config.control_in_dim == 33  # also fits ControlNet inpainting


def test_the_planner_gets_the_controlnets_real_size(data_dir: Path) -> None:
    from zimage.loader import component_sizes, resolve_model_source

    settings = Settings(demo=True, data_dir=data_dir)
    model = resolve_model_source(settings)
    sizes = component_sizes(model, resolve_controlnet_source(settings, model))
    assert sizes.controlnet is not None and sizes.controlnet.params == 59_456 and sizes.controlnet_hints == 2
    assert component_sizes(model).controlnet is None
    assert "ControlNet: safetensors headers" in sizes.source


@pytest.mark.parametrize(("files", "chosen"), [
    (["config.json", "diffusion_pytorch_model.safetensors"], None),
    (["README.md", "Z-Image-Turbo-Fun-Controlnet-Union.safetensors", "asset/pose.jpg"],
     "Z-Image-Turbo-Fun-Controlnet-Union.safetensors"),
])
def test_a_hub_controlnet_is_a_folder_or_its_one_checkpoint(files: list[str], chosen: str | None) -> None:
    assert choose_controlnet_file(files, "owner/repo") == chosen


def test_a_hub_repository_with_several_checkpoints_asks_for_one() -> None:
    files = ["Z-Image-Turbo-Fun-Controlnet-Union-2.1-2601-8steps.safetensors",
             "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2601-8steps.safetensors"]
    with pytest.raises(ModelNotFoundError, match=r"holds several checkpoints .* pick one with --controlnet "
                                                  r"alibaba-pai/Union/<file>"):
        choose_controlnet_file(files, "alibaba-pai/Union")
    with pytest.raises(ModelNotFoundError, match="neither a config.json nor a .safetensors checkpoint"):
        choose_controlnet_file(["README.md"], "owner/repo")


def test_controlnet_settings_and_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="controlnet='demo' is the demo model's ControlNet"):
        Settings(controlnet="demo")
    with pytest.raises(SettingsError, match="cannot be combined with --demo"):
        Settings(demo=True, controlnet="alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1")
    assert Settings(demo=True).controlnet_choice == "demo" and Settings().controlnet_choice == ""
    with pytest.raises(ModelNotFoundError, match="no such file or folder"):
        resolve_controlnet_source(Settings(controlnet=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="neither a config.json nor a .safetensors file"):
        resolve_controlnet_source(Settings(controlnet=str(tmp_path / "empty")))
    (tmp_path / "cn.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="must be a .safetensors file"):
        resolve_controlnet_source(Settings(controlnet=str(tmp_path / "cn.bin")))
    hub = resolve_controlnet_source(Settings(controlnet="alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"))
    assert hub is not None and hub.pretrained == "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1"
    one_file = ("alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.0/"
                "Z-Image-Turbo-Fun-Controlnet-Union-2.1.safetensors")  # a hub file, not a missing local path
    hub_file = resolve_controlnet_source(Settings(controlnet=one_file))
    assert hub_file is not None and hub_file.pretrained == one_file and hub_file.local is None
    from zimage.loader import ModelSource, component_sizes
    from zimage.planner import PUBLISHED_CONTROLNET

    sizes = component_sizes(ModelSource("Tongyi-MAI/Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", None), hub_file)
    assert sizes.controlnet == PUBLISHED_CONTROLNET and sizes.controlnet_hints == 15  # not on disk: published


# --- Model family: Turbo and Z-Image base -----------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "name", "shift", "family"), [
    ("auto", "Tongyi-MAI/Z-Image-Turbo", None, "turbo"),
    ("auto", "Tongyi-MAI/Z-Image", None, "base"),
    ("auto", "/models/Z-Image", 3.0, "turbo"),  # the files win over the name
    ("auto", "/models/my-finetune", 6.0, "base"),
    ("auto", "/models/my-finetune", None, "turbo"),
    ("auto", "/models/z_image_base", None, "base"),
    ("base", "Tongyi-MAI/Z-Image-Turbo", 3.0, "base"),  # the setting wins over everything
    ("turbo", "Tongyi-MAI/Z-Image", 6.0, "turbo"),
])
def test_the_model_family_comes_from_the_setting_then_the_scheduler_then_the_name(
        setting: str, name: str, shift: float | None, family: str) -> None:
    assert detect_family(setting, name, shift)[0] == family


def test_the_defaults_follow_the_family() -> None:
    assert (TURBO.steps, TURBO.guidance_scale, TURBO.uses_guidance) == (8, 0.0, False)
    assert (BASE.steps, BASE.guidance_scale, BASE.supports_negative_prompt) == (28, 4.0, True)
    base = validate_request(request(), defaults=BASE)
    assert (base.steps, base.guidance_scale) == (28, 4.0)
    assert (validate_request(request()).steps, validate_request(request()).guidance_scale) == (8, 0.0)
    assert validate_request(request(steps=50), defaults=BASE).steps == 50  # the limits stay
    with pytest.raises(ValidationError, match=r"steps=51 is out of range.*\(Z-Image base's default is 28\)"):
        validate_request(request(steps=51), defaults=BASE)


@pytest.fixture(scope="module")
def base_model_folder(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo model named and configured like Tongyi-MAI/Z-Image (its scheduler's shift is 6)."""
    from zimage.demo_model import demo_model_path

    folder = tmp_path_factory.mktemp("models") / "Z-Image"
    shutil.copytree(demo_model_path(data_dir), folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "shift": 6.0}))
    return folder


def test_a_base_model_folder_gets_base_defaults_and_uses_the_negative_prompt(
        base_model_folder: Path, data_dir: Path, tmp_path: Path) -> None:
    service = GenerationService(Settings(model=str(base_model_folder), data_dir=data_dir, outputs_dir=tmp_path))
    assert service.defaults.family == "base"  # before loading: read from the folder
    service.load()
    try:
        assert service.defaults.family == "base" and "shift 6" in service.defaults.reason
        seen: list[tuple[int, int]] = []
        plain = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, seed=2),
                                 on_progress=lambda p: seen.append((p.step, p.total)) if p.stage == "denoising"
                                 else None)
        negative = service.generate(GenerationRequest(prompt="a cat", width=256, height=256, seed=2,
                                                      negative_prompt="blurry, low quality"))
    finally:
        service.close()
    assert (plain.request.steps, plain.request.guidance_scale) == (28, 4.0) and seen[-1] == (28, 28)
    assert not np.array_equal(pixels(plain.paths[0]), pixels(negative.paths[0]))
    meta = read_metadata(negative.paths[0])
    assert meta["negative_prompt"] == "blurry, low quality" and meta["steps"] == 28
    assert "negative_prompt" not in read_metadata(plain.paths[0])


def test_the_negative_prompt_reaches_encode_prompt_only_with_guidance(shared_service: GenerationService,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    real = type(shared_service._pipe).encode_prompt

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("negative_prompt"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(shared_service._pipe), "encode_prompt", spy)
    # A prompt no other test uses: the prompt cache would answer a repeated one without the text encoder.
    guided = shared_service.generate(request(prompt="a harbour at dawn", steps=2, guidance_scale=3.0,
                                             negative_prompt="fog"))
    unguided = shared_service.generate(request(prompt="a harbour at dawn", steps=2, negative_prompt="fog"))
    assert seen == ["fog", None]
    assert guided.warnings == () and unguided.warnings == (
        "The negative prompt was not used: it takes effect only with guidance (guidance_scale > 0).",)


def test_the_model_family_setting_overrides(data_dir: Path, tmp_path: Path) -> None:
    service = GenerationService(Settings(demo=True, model_family="base", data_dir=data_dir, outputs_dir=tmp_path))
    assert service.defaults.family == "base" and service.defaults.reason == "--model-family base"
    assert GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path)).defaults.family == "turbo"


# --- The command line ---------------------------------------------------------------------------------------

def test_the_cli_runs_controlnet_and_records_the_control_image(data_dir: Path, tmp_path: Path) -> None:
    control = tmp_path / "edges.png"
    control_picture((300, 200)).save(control)
    env = {"ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "zimage", "generate", "a cat", "--demo", "--width", "256", "--height", "256",
               "--seed", "3", "--out-dir", str(tmp_path / "out"), "--control-image", str(control),
               "--controlnet-scale", "1.25"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "step  8/8" in done.stderr and "edges.png is 300x200: it was resized to 256x256" in done.stderr
    meta = read_metadata(Path(done.stdout.strip()))
    assert meta["mode"] == "controlnet" and meta["controlnet_conditioning_scale"] == 1.25 and meta["steps"] == 8
    assert meta["inputs"] == [{"name": "edges.png", "sha256": hashlib.sha256(control.read_bytes()).hexdigest(),
                               "role": "control_image"}]
    refused = subprocess.run(command + ["--controlnet", "none"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "--control-image needs a ControlNet" in refused.stderr
    assert "Traceback" not in refused.stderr and "loading" not in refused.stderr  # refused before the model loads
