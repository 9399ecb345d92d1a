"""LoRA adapters on the demo model: the three key formats, weights, stacking, switching off, refusals, the folder
listing, metadata, the adapter cache, files changed on disk, placements and the command line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from zimage.errors import LoraError, ValidationError
from zimage.lora import (
    CACHE_SIZE,
    AdapterCache,
    CachedAdapter,
    CachePlan,
    detect_format,
    fit_problem,
    foreign_model,
    loras_from_request,
    parse_lora_arg,
    placement_problem,
    write_demo_lora,
)
from zimage.service import GenerationRequest, GenerationService, validate_request
from zimage.settings import Settings
from zimage.storage import read_metadata

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(width=256, height=256, steps=2, seed=3)


def request(*loras: tuple[str, float], **changes) -> GenerationRequest:
    return GenerationRequest(prompt="一只猫 a cat", loras=tuple(loras), **{**SMALL, **changes})


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def save_tensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    from safetensors.numpy import save_file

    save_file({key: np.full(shape, 0.01, dtype=np.float16) for key, shape in shapes.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo LoRAs in the three formats (the same weights), a second LoRA, and files that must be refused."""
    import torch

    folder = tmp_path_factory.mktemp("loras")
    for fmt in ("peft", "comfyui", "kohya"):
        write_demo_lora(folder / f"demo-{fmt}.safetensors", fmt, seed=1)
    write_demo_lora(folder / "second.safetensors", "peft", seed=2)
    save_tensors(folder / "sdxl-style.safetensors", {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight": (4, 640),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight": (640, 4),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.alpha": (),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
    })
    save_tensors(folder / "flux-style.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": (4, 64),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": (64, 4),
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": (4, 64),
    })
    # A LoRA of the full-size Z-Image transformer (dim 3840): right names, wrong shapes for the demo model.
    save_tensors(folder / "full-size.safetensors", {
        "transformer.layers.0.attention.to_q.lora_A.weight": (4, 3840),
        "transformer.layers.0.attention.to_q.lora_B.weight": (3840, 4),
    })
    (folder / "notes.safetensors").write_text("This is a text file with a .safetensors name.\n" * 20)
    whole = write_demo_lora(folder / "truncated.safetensors", "peft", seed=3).read_bytes()
    (folder / "truncated.safetensors").write_bytes(whole[:len(whole) // 2])  # an interrupted download
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, folder / "old-style.ckpt")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, folder / "legacy.pt")
    return folder


def make_service(data_dir: Path, tmp_path_factory, lora_dir: Path, **settings) -> GenerationService:
    service = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path_factory.mktemp("out"),
                                         lora_dir=lora_dir, **settings))
    service.load()
    return service


@pytest.fixture(scope="module")
def service(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, lora_dir: Path):
    service = make_service(data_dir, tmp_path_factory, lora_dir)
    yield service
    service.close()


@pytest.fixture(scope="module")
def base_pixels(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, lora_dir: Path) -> np.ndarray:
    """The request's pixels from a service that never loads a LoRA."""
    plain = make_service(data_dir, tmp_path_factory, lora_dir)
    try:
        return pixels(plain.generate(request()).paths[0])
    finally:
        plain.close()


def generate(service: GenerationService, *loras: tuple[str, float], **changes):
    result = service.generate(request(*loras, **changes))
    return pixels(result.paths[0]), result


# --- Pixels ----------------------------------------------------------------------------------------

def test_each_format_changes_the_pixels_and_all_three_load_the_same_adapter(service, base_pixels) -> None:
    outputs = {}
    for fmt in ("peft", "comfyui", "kohya"):
        outputs[fmt], result = generate(service, (f"demo-{fmt}", 1.0))
        assert result.loras[0]["name"] == f"demo-{fmt}"
        assert np.abs(outputs[fmt] - base_pixels).mean() > 3  # about 10 of 255 levels on average
    # The same numbers under three key formats: diffusers' conversion makes them one adapter.
    assert np.array_equal(outputs["peft"], outputs["comfyui"]) and np.array_equal(outputs["peft"], outputs["kohya"])


def test_weight_zero_gives_the_base_pixels_and_weights_scale(service, base_pixels) -> None:
    zero, _ = generate(service, ("demo-peft", 0.0))
    assert np.array_equal(zero, base_pixels)
    half, _ = generate(service, ("demo-peft", 0.5))
    full, _ = generate(service, ("demo-peft", 1.0))
    assert 0 < np.abs(half - base_pixels).mean() < np.abs(full - base_pixels).mean()


def test_a_request_without_loras_after_one_is_identical_to_a_service_that_never_loaded_one(service,
                                                                                              base_pixels) -> None:
    with_lora, _ = generate(service, ("demo-kohya", 1.5), ("second", -0.5))
    assert not np.array_equal(with_lora, base_pixels)
    after, result = generate(service)
    assert np.array_equal(after, base_pixels) and result.loras == ()
    assert np.array_equal(np.asarray(result.images[0]).astype(int), base_pixels)  # the returned pixels too
    assert "demo-kohya" in service.loaded_loras()  # still cached, only switched off


def test_image_to_image_and_inpainting_see_the_adapter_of_the_shared_transformer(service) -> None:
    from PIL import Image

    image = Image.new("RGB", (256, 256), (200, 40, 40))
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 128, 256))
    for inputs in ({"image": image, "strength": 0.9}, {"image": image, "mask": mask}):
        plain, _ = generate(service, **inputs)
        styled, result = generate(service, ("demo-peft", 1.0), **inputs)
        assert result.request.mode in ("img2img", "inpaint") and not np.array_equal(plain, styled)
        assert np.array_equal(generate(service, **inputs)[0], plain)


def test_two_loras_stacked_differ_from_each_alone(service) -> None:
    first, _ = generate(service, ("demo-peft", 1.0))
    second, _ = generate(service, ("second", 1.0))
    both, result = generate(service, ("demo-peft", 1.0), ("second", 1.0))
    assert not np.array_equal(both, first) and not np.array_equal(both, second)
    assert [lora["name"] for lora in result.loras] == ["demo-peft", "second"]


# --- Refusals ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("sdxl-style", "'sdxl-style' (sdxl-style.safetensors) cannot be used: it was made for SDXL"),
        ("flux-style", "'flux-style' (flux-style.safetensors) cannot be used: it was made for Flux"),
        ("full-size", "made for a Z-Image transformer of another size ('layers.0.attention.to_q' takes 32 features "
                      "here and 3840 in the file"),
        ("notes", "'notes' (notes.safetensors) cannot be used: it is not a safetensors file"),
        ("truncated", "'truncated' (truncated.safetensors) cannot be used: it is truncated: tensor"),
        ("old-style", "'old-style' (old-style.ckpt) cannot be used: it is a pickle file (.ckpt)"),
        ("legacy", "'legacy' (legacy.pt) cannot be used: it is a pickle file (.pt)"),
    ],
)
def test_foreign_broken_and_pickle_files_are_refused_at_once_naming_the_file(service, name: str,
                                                                             message: str) -> None:
    invalid = service.stats().outcomes["invalid"]
    with pytest.raises(LoraError) as info:
        service.submit(request((name, 1.0)))
    assert message in str(info.value)
    assert service.stats().outcomes["invalid"] == invalid + 1 and len(service.queue) == 0


def test_an_unknown_name_lists_the_usable_ones(service) -> None:
    with pytest.raises(LoraError) as info:
        service.submit(request(("nope", 1.0)))
    text = str(info.value)
    assert "LoRA 'nope' is not in the LoRA folder: available are demo-comfyui, demo-kohya, demo-peft" in text
    assert "sdxl-style" not in text and "old-style" not in text  # only the ones that can be used
    with pytest.raises(LoraError, match=r"give the name without \.safetensors"):
        service.submit(request(("demo-peft.safetensors", 1.0)))


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ((("a", 1.0),) * 2, "LoRA 'a' is listed twice"),
        (tuple((f"l{i}", 1.0) for i in range(5)), "loras has 5 adapters: at most 4 per request"),
        ((("a", 2.5),), "LoRA weight 2.5 for 'a' is out of range: use a number from -2 to 2"),
        ((("a", -2.01),), "LoRA weight -2.01 for 'a' is out of range"),
        ((("a", float("nan")),), "LoRA weight nan for 'a' is out of range"),
        ((("a", 10**400),), "LoRA weight 1000000000"),  # a 401-digit JSON integer: no float overflow, a clear 400
        ((("a", -10**400),), "is out of range: use a number from -2 to 2"),
        ((("a", True),), "LoRA weight True for 'a' must be a number from -2 to 2"),
        ((("a", "1"),), "LoRA weight '1' for 'a' must be a number"),
        ((("a", None),), "LoRA weight None for 'a' must be a number"),
        (((1, 1.0),), "LoRA name 1 must be text"),
        ((("../x", 1.0),), "LoRA name '../x' is not a plain file name"),
        ((("", 1.0),), "LoRA name '' is empty"),
        ((("a",),), "loras[0]=('a',) must be a (name, weight) pair"),
        ("a:1", "loras='a:1' must be a list of (name, weight) pairs"),
    ],
)
def test_lora_values_are_refused_never_coerced(loras, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_request(replace(GenerationRequest(prompt="a cat"), loras=loras))
    assert message in str(info.value)


@pytest.mark.parametrize(("value", "parsed"), [
    (None, ()), ("", ()), ([], ()),
    ([{"name": "a"}], (("a", 1.0),)),
    ([{"name": "a", "weight": 0.5}, ["b", -1]], (("a", 0.5), ("b", -1))),
    ([{"name": 7, "weight": "x"}], ((7, "x"),)),  # the shape is right: validate_loras refuses the values
])
def test_the_loras_field_of_both_apis_becomes_pairs(value, parsed) -> None:
    assert loras_from_request(value) == parsed


@pytest.mark.parametrize(("value", "message"), [
    ("style", "loras='style' is not valid: send a list, e.g."),
    ({"name": "a"}, "loras={'name': 'a'} is not valid"),
    ([{"name": "a", "scale": 1}], "loras[0]={'name': 'a', 'scale': 1} is not valid"),
    ([{"weight": 1}], "loras[0]={'weight': 1} is not valid"),
    (["a", 1], "loras[0]='a' is not valid"),
    ([["a", 1, 2]], "loras[0]=['a', 1, 2] is not valid"),
])
def test_a_loras_field_of_another_shape_is_refused_naming_the_entry(value, message: str) -> None:
    with pytest.raises(LoraError) as info:
        loras_from_request(value)
    assert message in str(info.value) and info.value.param == "loras"


def test_valid_loras_pass_as_tuples_of_floats() -> None:
    checked = validate_request(GenerationRequest(prompt="a cat", loras=[["a", 1], ("b", -2)]), draw_seed=lambda: 1)
    assert checked.loras == (("a", 1.0), ("b", -2.0)) and all(type(w) is float for _, w in checked.loras)


def test_fp8_storage_refuses_loras_at_submit_with_the_fix(data_dir, tmp_path_factory, lora_dir) -> None:
    fp8 = make_service(data_dir, tmp_path_factory, lora_dir, dtype="bf16", memory_options=("fp8-storage",))
    try:
        assert "fp8" in (fp8.lora_problem() or "")
        with pytest.raises(LoraError) as info:
            fp8.submit(request(("demo-peft", 1.0)))
        assert "cpu + fp8-storage (bf16)" in str(info.value) and "--no-auto-fp8" in str(info.value)
        assert fp8.stats().outcomes["invalid"] == 1
    finally:
        fp8.close()


def test_a_failing_load_is_a_clear_error_and_the_service_goes_on(service, base_pixels, monkeypatch,
                                                                 lora_dir) -> None:
    write_demo_lora(lora_dir / "fails.safetensors", "peft", seed=9)

    def broken(*args, **kwargs):
        raise RuntimeError("size mismatch for lora_A\nlong details")

    monkeypatch.setattr(service._pipe, "load_lora_weights", broken)
    with pytest.raises(LoraError) as info:
        service.generate(request(("fails", 1.0)))
    assert str(info.value) == ("LoRA 'fails' (fails.safetensors) could not be loaded: RuntimeError: size mismatch for "
                               "lora_A")
    assert "fails" not in service.loaded_loras()
    monkeypatch.undo()
    assert np.array_equal(generate(service)[0], base_pixels)
    assert not np.array_equal(generate(service, ("fails", 1.0))[0], base_pixels)


@pytest.mark.parametrize(("profile", "reloads"), [("model-offload", 1), ("sequential-offload", 1),
                                                  ("group-offload", 0), ("full", 0)])
def test_a_failed_load_under_model_or_sequential_offload_reloads_the_pipeline(service, monkeypatch, lora_dir,
                                                                               profile: str, reloads: int) -> None:
    from zimage.jobs import Job

    # diffusers takes accelerate's offload hooks off for a load and puts them back only after a success.
    write_demo_lora(lora_dir / f"never-{profile}.safetensors", "peft", seed=5)
    reloaded = []
    monkeypatch.setattr(service._pipe, "load_lora_weights", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    monkeypatch.setattr(service, "_reload", reloaded.append)
    plan = replace(service.plan, profile=profile, device="cuda:0")
    lora = validate_request(request((f"never-{profile}", 1.0)))
    with pytest.raises(LoraError, match="could not be loaded"):
        service._activate_loras(Job("t", lora), lora, plan)
    assert reloaded == [plan] * reloads


# --- Listing, metadata, cache, changed files ------------------------------------------------------------

def test_listing_shows_size_format_and_fit_before_and_after_loading(service, lora_dir, data_dir, tmp_path) -> None:
    unloaded = GenerationService(Settings(demo=True, data_dir=data_dir, outputs_dir=tmp_path, lora_dir=lora_dir))
    for listing in (unloaded.list_loras(), service.list_loras()):
        info = {item.name: item.info() for item in listing if item.name != "fails"}
        assert info["demo-kohya"] == {"name": "demo-kohya", "size_bytes": (lora_dir / "demo-kohya.safetensors")
                                      .stat().st_size, "fits": True, "problem": None, "format": "kohya"}
        assert [info[f"demo-{fmt}"]["format"] for fmt in ("peft", "comfyui")] == ["peft", "comfyui"]
        assert info["sdxl-style"]["fits"] is False and "SDXL" in info["sdxl-style"]["problem"]
        assert info["old-style"]["format"] == "pickle" and info["notes"]["format"] == "invalid"
        assert json.loads(json.dumps(list(info.values()))) == list(info.values())


def test_metadata_result_and_log_carry_names_weights_and_hashes(service, lora_dir, caplog) -> None:
    digests = {name: hashlib.sha256((lora_dir / f"{name}.safetensors").read_bytes()).hexdigest()
               for name in ("demo-comfyui", "second")}
    with caplog.at_level(logging.INFO, logger="zimage.jobs"):
        result = service.generate(request(("demo-comfyui", 0.75), ("second", -1)))
    expected = [{"name": "demo-comfyui", "weight": 0.75, "sha256": digests["demo-comfyui"]},
                {"name": "second", "weight": -1.0, "sha256": digests["second"]}]
    assert read_metadata(result.paths[0])["loras"] == expected
    assert result.info()["loras"] == expected
    line = json.loads(next(r.getMessage() for r in caplog.records if result.request_id in r.getMessage()))
    assert line["loras"] == [{"name": "demo-comfyui", "weight": 0.75}, {"name": "second", "weight": -1.0}]
    assert "loras" not in read_metadata(service.generate(request()).paths[0])


def test_the_cache_keeps_at_most_eight_and_evicts_the_least_recently_used(service, lora_dir) -> None:
    names = [f"cached-{i}" for i in range(CACHE_SIZE + 1)]
    for index, name in enumerate(names):
        write_demo_lora(lora_dir / f"{name}.safetensors", "peft", seed=100 + index)
    generate(service, *((name, 0.1) for name in names[:4]), steps=1)
    generate(service, *((name, 0.1) for name in names[4:8]), steps=1)
    assert service.loaded_loras() == names[:8]
    generate(service, (names[0], 0.1), steps=1)  # cached-0 becomes the most recently used
    generate(service, (names[8], 0.1), steps=1)
    loaded = service.loaded_loras()
    assert loaded == names[2:8] + [names[0], names[8]]  # cached-1, the least recently used, was evicted
    adapters = service._pipe.get_list_adapters()["transformer"]
    assert len(adapters) == CACHE_SIZE  # deleted from the pipeline too, not only forgotten


def test_adapter_cache_policy() -> None:
    cache = AdapterCache(capacity=4)
    for index, name in enumerate("abcd"):
        cache.add(CachedAdapter(name, f"x{index}", (1, 10), "h"))
    assert cache.plan([("a", (1, 10))]) == CachePlan(evict=(), load=())
    plan = cache.plan([("b", (2, 10)), ("e", (1, 5))])
    assert plan.evict == ("b", "a") and plan.load == ("b", "e")  # b changed on disk; a is the oldest unused
    cache.touch(["a"])
    assert cache.plan([("e", (1, 5))]).evict == ("b",)
    with pytest.raises(ValueError, match="at least 4"):
        AdapterCache(capacity=3)


def test_a_file_changed_on_disk_is_loaded_again(service, lora_dir) -> None:
    path = lora_dir / "changing.safetensors"
    write_demo_lora(path, "peft", seed=11)
    first, result = generate(service, ("changing", 1.0))
    write_demo_lora(path, "peft", seed=12)  # same size; a new mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    second, changed = generate(service, ("changing", 1.0))
    assert not np.array_equal(first, second)
    assert changed.loras[0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() != result.loras[0]["sha256"]
    write_demo_lora(lora_dir / "same-as-changed.safetensors", "peft", seed=12)
    assert np.array_equal(generate(service, ("same-as-changed", 1.0))[0], second)


def test_a_reload_of_the_pipeline_drops_the_cache(service) -> None:
    generate(service, ("demo-peft", 1.0))
    assert service.loaded_loras()
    service._reload(service.plan)  # what a per-request placement or an out-of-memory step does
    assert service.loaded_loras() == []
    again, result = generate(service, ("demo-peft", 1.0))
    assert service.loaded_loras() == ["demo-peft"] and result.loras[0]["name"] == "demo-peft"


# --- Pure parts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "Stable Diffusion 1.x/2.x (a UNet)"),
        (["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight"], "SDXL"),
        (["unet.mid_block.attentions.0.proj_in.lora_A.weight"], "Stable Diffusion 1.x/2.x or SDXL"),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "Flux"),
        (["diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
          "diffusion_model.txt_in.individual_token_refiner.blocks.0.mlp.fc1.lora_A.weight"], "HunyuanVideo"),
        (["transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"], "Qwen-Image"),
        (["diffusion_model.blocks.0.cross_attn.k.lora_A.weight"], "Wan"),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "Stable Diffusion 3"),
        (["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"], "a language model"),
        (["diffusion_model.layers.0.attention.to_q.lora_A.weight"], None),
        (["lora_unet_noise_refiner_0_feed_forward_w1.lora_down.weight"], None),
    ],
)
def test_foreign_models_are_recognised_from_their_keys(keys: list[str], family: str | None) -> None:
    found = foreign_model(keys)
    assert (found is None) if family is None else (found is not None and found.startswith(family))


def test_formats_and_fit() -> None:
    assert detect_format(["transformer.layers.0.attention.to_q.lora_A.weight"]) == "peft"
    assert detect_format(["diffusion_model.layers.0.attention.to_q.lora_down.weight"]) == "comfyui"
    assert detect_format(["lora_unet_layers_0_attention_to_q.alpha"]) == "kohya"
    assert detect_format(["layers.0.attention.to_q.lokr_w1"]) == "lokr"
    modules = {"layers.0.attention.to_q": (32, 32), "layers.0.attention": None}
    good = {"transformer.layers.0.attention.to_q.lora_A.weight": (4, 32),
            "transformer.layers.0.attention.to_q.lora_B.weight": (32, 4)}
    assert fit_problem(good, modules) is None
    assert "another size" in fit_problem({**good, "transformer.layers.0.attention.to_q.lora_B.weight": (64, 4)},
                                         modules)
    assert "1 layer(s) it changes do not exist here, e.g. 'layers.7.attention.to_q'" in fit_problem(
        {**good, "transformer.layers.7.attention.to_q.lora_A.weight": (4, 32)}, modules)
    assert "not for the transformer" in fit_problem({**good, "text_encoder.x.lora_A.weight": (4, 4)}, modules)
    assert "is not a LoRA" in fit_problem({"transformer.layers.0.attention.to_q.weight": (32, 32)}, modules)
    assert fit_problem({}, modules) == "it has no LoRA weights"


def test_placement_table() -> None:
    from zimage.planner import MemoryPlan

    def plan(profile: str, options: tuple[str, ...] = (), device: str = "cuda:0") -> MemoryPlan:
        return MemoryPlan(profile, options, device, "bf16", 0, 0, "test")

    for ok in (plan("full"), plan("balanced"), plan("model-offload"), plan("group-offload"),
               plan("sequential-offload"), plan("cpu", device="cpu"), plan("full", ("vae-tiling",))):
        assert placement_problem(ok) is None, ok
    assert "fp8 weight storage" in placement_problem(plan("model-offload", ("fp8-storage",)))
    assert "torchao float8 tensors" in placement_problem(plan("transformer-resident", ("fp8-compute",)))
    assert "on the CPU" in placement_problem(plan("model-offload", device="cpu"))


@pytest.mark.parametrize(("text", "parsed"), [("style", ("style", 1.0)), ("style:0.5", ("style", 0.5)),
                                              ("a b:-2", ("a b", -2.0)), ("x:3", ("x", 3.0))])
def test_parse_lora_arg(text: str, parsed: tuple[str, float]) -> None:
    assert parse_lora_arg(text) == parsed


@pytest.mark.parametrize(("text", "message"), [(":1", "has no LoRA name"), ("a:", "must be a number"),
                                               ("a:x", "must be a number"), ("a:inf", "finite")])
def test_parse_lora_arg_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lora_arg(text)


# --- Command line --------------------------------------------------------------------------------------

def run(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "zimage", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_make_demo_lora_in_each_format_is_reproducible_and_fits(tmp_path: Path, data_dir: Path, capsys) -> None:
    from zimage.cli import main
    from zimage.lora import inspect_file, transformer_modules
    from zimage.architecture import TINY

    modules = transformer_modules(TINY.transformer)
    for fmt in ("peft", "comfyui", "kohya"):
        target = tmp_path / f"{fmt}.safetensors"
        assert main(["make-demo-lora", str(target), "--format", fmt, "--seed", "5"]) == 0
        assert capsys.readouterr().out.strip() == str(target)
        info = inspect_file(target, modules).info()
        assert info["fits"] and info["format"] == fmt
        again = write_demo_lora(tmp_path / f"again-{fmt}.safetensors", fmt, seed=5)
        assert again.read_bytes() == target.read_bytes()
        assert write_demo_lora(tmp_path / f"other-{fmt}.safetensors", fmt, seed=6).read_bytes() != target.read_bytes()
    assert main(["make-demo-lora", str(tmp_path / "peft.safetensors"), "--format", "peft"]) == 2
    assert main(["make-demo-lora", str(tmp_path / "x.pt"), "--format", "peft"]) == 2
    assert "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["make-demo-lora", str(tmp_path / "y.safetensors"), "--format", "pickle"])
    assert exit_info.value.code == 2


def test_cli_loras_lists_the_folder(lora_dir: Path, data_dir: Path, capsys) -> None:
    from zimage.cli import main

    assert main(["loras", "--demo", "--json", "--lora-dir", str(lora_dir), "--data-dir", str(data_dir)]) == 0
    listed = {item["name"]: item for item in json.loads(capsys.readouterr().out)}
    assert listed["demo-peft"]["fits"] is True and listed["flux-style"]["fits"] is False
    assert listed["full-size"]["problem"].startswith("it was made for a Z-Image transformer of another size")
    text = run(["loras", "--demo"], data_dir, ZIMAGE_LORA_DIR=str(lora_dir))
    assert text.returncode == 0, text.stderr
    size_kib = f"{(lora_dir / 'demo-kohya.safetensors').stat().st_size / 1024:.1f}"
    assert any(line.split()[:5] == ["demo-kohya", size_kib, "KiB", "kohya", "yes"] for line in text.stdout.splitlines())
    assert "no: it was made for Flux" in text.stdout


def test_cli_loras_names_a_missing_folder_and_refuses_a_file(data_dir: Path, tmp_path: Path, capsys) -> None:
    from zimage.cli import main

    assert main(["loras", "--demo", "--lora-dir", str(tmp_path / "nowhere"), "--data-dir", str(data_dir)]) == 0
    assert "nowhere does not exist yet" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["loras", "--demo", "--lora-dir", str(tmp_path / "a-file"), "--data-dir", str(data_dir)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_cli_generate_with_loras_end_to_end(lora_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    done = run(["generate", "a cat", "--demo", "--seed", "3", "--width", "256", "--height", "256", "--steps", "2",
                "--lora", "demo-peft:0.5", "--lora", "second", "--lora-dir", str(lora_dir), "--out-dir",
                str(tmp_path), "--quiet"], data_dir)
    assert done.returncode == 0, done.stderr
    meta = read_metadata(Path(done.stdout.strip()))
    assert [(lora["name"], lora["weight"]) for lora in meta["loras"]] == [("demo-peft", 0.5), ("second", 1.0)]
    for args, code, message in ((["--lora", "demo-peft:x"], 2, "argument --lora: 'demo-peft:x': the weight"),
                                (["--lora", "flux-style"], 2, "it was made for Flux")):
        refused = run(["generate", "a cat", "--demo", "--width", "256", "--height", "256", "--lora-dir",
                       str(lora_dir), "--out-dir", str(tmp_path), *args], data_dir)
        assert refused.returncode == code and message in refused.stderr and "Traceback" not in refused.stderr
