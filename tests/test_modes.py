"""Image-to-image and inpainting on the one loaded demo model: shared weights, inputs, steps, metadata, the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zimage.errors import ValidationError
from zimage.render import mode_pipeline, steps_run
from zimage.service import GenerationRequest, GenerationService, validate_request
from zimage.storage import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def picture(size=(256, 256), colour=(200, 40, 40)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.paste((30, 30, 220), (0, 0, size[0] // 2, size[1] // 2))
    return image


def half_mask(size=(256, 256)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


def request(**kw) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a cat", "width": 256, "height": 256, "steps": 8, "seed": 5, **kw})


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def test_mode_pipelines_share_the_loaded_weights_and_keep_their_dtype(shared_service: GenerationService) -> None:
    base = shared_service._pipe
    dtype = base.transformer.dtype
    for mode in ("img2img", "inpaint"):
        pipe = mode_pipeline(base, mode)
        for name in ("transformer", "text_encoder", "vae"):
            assert getattr(pipe, name) is getattr(base, name)
        weight = next(pipe.transformer.parameters())
        assert weight.data_ptr() == next(base.transformer.parameters()).data_ptr()  # the same storage
        assert base.transformer.dtype == dtype and base.vae.dtype == dtype  # nothing was cast


@pytest.mark.parametrize(("steps", "strength", "run"), [(8, None, 8), (8, 1.0, 8), (8, 0.6, 5), (8, 0.5, 4),
                                                         (10, 0.25, 3), (8, 0.01, 1)])
def test_steps_run_follow_diffusers(steps: int, strength: float | None, run: int) -> None:
    assert steps_run(steps, strength) == run


def test_image_to_image_runs_fewer_steps_and_reproduces(shared_service: GenerationService) -> None:
    seen: list[tuple[int, int]] = []
    image = picture()
    first = shared_service.generate(request(image=image, strength=0.5, inputs=(("in.png", "ab" * 32),)),
                                    on_progress=lambda p: seen.append((p.step, p.total)) if p.stage == "denoising"
                                    else None)
    assert seen[-1] == (4, 4)  # 8 steps at strength 0.5: the last 4 of the schedule
    again = shared_service.generate(request(image=image, strength=0.5))
    text = shared_service.generate(request())
    assert np.array_equal(pixels(first.paths[0]), pixels(again.paths[0]))
    assert not np.array_equal(pixels(first.paths[0]), pixels(text.paths[0]))
    meta = read_metadata(first.paths[0])
    assert meta["mode"] == "img2img" and meta["strength"] == 0.5
    assert meta["inputs"] == [{"name": "in.png", "sha256": "ab" * 32}]
    assert read_metadata(text.paths[0])["mode"] == "text" and "strength" not in read_metadata(text.paths[0])


def test_a_lower_strength_stays_closer_to_the_input(shared_service: GenerationService) -> None:
    image = picture()
    source = np.asarray(image).astype(int)
    distance = {s: np.abs(pixels(shared_service.generate(request(image=image, strength=s)).paths[0]) - source).mean()
                for s in (0.2, 1.0)}
    assert distance[0.2] < distance[1.0]


def test_inpainting_runs_with_its_defaults(shared_service: GenerationService) -> None:
    result = shared_service.generate(request(image=picture(), mask=half_mask()))
    meta = read_metadata(result.paths[0])
    assert meta["mode"] == "inpaint" and meta["strength"] == 1.0 and result.info()["mode"] == "inpaint"
    assert pixels(result.paths[0]).shape == (256, 256, 3)


def test_text_to_image_after_the_image_modes_is_unchanged(demo_settings) -> None:
    service = GenerationService(demo_settings)
    service.load()
    before = service.generate(request(seed=9))
    service.generate(request(image=picture(), strength=0.7))
    service.generate(request(image=picture(), mask=half_mask()))
    after = service.generate(request(seed=9))
    assert np.array_equal(pixels(before.paths[0]), pixels(after.paths[0]))


@pytest.mark.parametrize(("changes", "message"), [
    ({"mask": half_mask()}, "a mask needs an image to repaint"),
    ({"strength": 0.5}, "strength=0.5 applies to image-to-image and inpainting"),
    ({"image": picture((320, 256))}, "the image is (320, 256) but the request is 256x256"),
    ({"image": picture(), "mask": half_mask((128, 128))}, "the mask is (128, 128) but the request is 256x256"),
    ({"image": picture(), "strength": 0}, "strength=0 is out of range: use more than 0 and at most 1"),
    ({"image": picture(), "strength": 1.5}, "strength=1.5 is out of range"),
    ({"image": picture(), "strength": True}, "strength=True must be a number"),
])
def test_image_mode_inputs_are_checked(changes: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_request(replace(request(), **changes))


def test_the_cli_runs_both_modes_and_records_the_input_hash(data_dir: Path, tmp_path: Path) -> None:
    source, mask = tmp_path / "in.jpg", tmp_path / "mask.png"
    picture((300, 200)).save(source)
    half_mask((300, 200)).save(mask)
    env = {"ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    common = [sys.executable, "-m", "zimage", "generate", "a cat", "--demo", "--width", "256", "--height", "256",
              "--seed", "3", "--out-dir", str(tmp_path / "out"), "--image", str(source)]
    done = subprocess.run(common + ["--strength", "0.5"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "in.jpg is 300x200: it was resized to 256x256" in done.stderr and "step  4/4" in done.stderr
    meta = read_metadata(Path(done.stdout.strip()))
    assert meta["mode"] == "img2img" and meta["inputs"][0] == {
        "name": "in.jpg", "sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "role": "image"}
    done = subprocess.run(common + ["--mask", str(mask)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    meta = read_metadata(Path(done.stdout.strip()))
    assert meta["mode"] == "inpaint" and [entry["role"] for entry in meta["inputs"]] == ["image", "mask"]
    bad = subprocess.run(common[:-2] + ["--mask", str(mask)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and "--mask needs --image" in bad.stderr and "Traceback" not in bad.stderr


def test_a_strength_too_small_to_run_a_step_is_refused_with_the_minimum() -> None:
    with pytest.raises(ValidationError, match=r"strength=1e-300 with steps=8 runs no denoising step: use a strength "
                                              r"of at least 0.125"):
        validate_request(request(image=picture(), strength=1e-300))
    with pytest.raises(ValidationError, match="strength='0.5' must be a number"):
        validate_request(request(image=picture(), strength="0.5"))
    assert validate_request(request(image=picture(), strength=0.125)).strength == 0.125


def test_a_mask_of_another_size_is_resized_and_said() -> None:
    import io

    from zimage.uploads import prepare_inputs

    def png(picture_: Image.Image) -> bytes:
        buffer = io.BytesIO()
        picture_.save(buffer, format="PNG")
        return buffer.getvalue()

    read = prepare_inputs(256, 256, max_bytes=2**20, image=(png(picture()), "in.png"),
                          mask=(png(half_mask((100, 50))), "mask.png"))
    assert read.fields["mask"].size == (256, 256) and read.notes == (
        "mask.png is 100x50: it was resized to 256x256, the requested size.",)
