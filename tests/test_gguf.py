"""GGUF transformers (--transformer-file): header sizes, the planner, loading through diffusers' from_single_file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zimage.errors import ModelNotFoundError
from zimage.planner import PUBLISHED_SIZES, PlanError, hypothetical_devices, plan_memory
from zimage.service import GenerationRequest, GenerationService
from zimage.settings import Settings, SettingsError

#: Mean absolute difference from the bf16 image, in 8-bit levels (0-255), at 256x256, 4 steps, seed 3, on the demo
#: model: measured 0.51 (max 7) for Q8_0 and 2.12 (max 26) for Q4_0 on this project's 2-core CPU machine (bf16),
#: 2026-11-29; the bounds leave room for other CPUs' bf16 arithmetic.
TOLERANCE_LEVELS = {"Q8_0": 1.5, "Q4_0": 5.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage.demo_model import build_demo_model
    from zimage.gguf_files import write_transformer_gguf

    folder = tmp_path_factory.mktemp("gguf") / "demo"
    build_demo_model(folder)
    transformer = ZImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    for quant in TOLERANCE_LEVELS:
        write_transformer_gguf(transformer, folder / f"transformer-{quant}.gguf", quant)
    return folder


def pixels(service: GenerationService) -> np.ndarray:
    from PIL import Image

    result = service.generate(GenerationRequest(prompt="a lighthouse", width=256, height=256, steps=4, seed=3))
    with Image.open(result.paths[0]) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def test_the_key_layout_is_the_original_checkpoints() -> None:
    from zimage.gguf_files import to_original_state_dict

    q, k, v = (np.full((4, 8), i, dtype=np.float32) for i in range(3))
    out = to_original_state_dict({"layers.0.attention.to_q.weight": q, "layers.0.attention.to_k.weight": k,
                                  "layers.0.attention.to_v.weight": v, "layers.0.attention.to_out.0.weight": q,
                                  "layers.0.attention.norm_q.weight": q, "all_x_embedder.2-1.weight": q,
                                  "all_final_layer.2-1.linear.weight": q, "cap_embedder.1.weight": q})
    assert sorted(out) == ["cap_embedder.1.weight", "final_layer.linear.weight", "layers.0.attention.out.weight",
                           "layers.0.attention.q_norm.weight", "layers.0.attention.qkv.weight", "x_embedder.weight"]
    assert out["layers.0.attention.qkv.weight"].shape == (12, 8)
    assert (out["layers.0.attention.qkv.weight"][4:8] == 1).all()  # q, k, v stacked along the output dimension


def test_sizes_come_from_the_header_and_the_planner_counts_them(model_dir: Path) -> None:
    import gguf

    from zimage.loader import component_sizes, resolve_model_source

    path = model_dir / "transformer-Q4_0.gguf"
    source = resolve_model_source(Settings(model=str(model_dir), transformer_file=path))
    sizes = component_sizes(source)
    plain = component_sizes(resolve_model_source(Settings(model=str(model_dir))))
    stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    assert sizes.transformer.stored_bytes == stored
    assert sizes.transformer.params == plain.transformer.params  # the same weights, fused q/k/v or not
    assert stored < plain.transformer.params * 2  # smaller than bf16
    assert "GGUF header of transformer-Q4_0.gguf" in sizes.source
    # A real-size Q8_0 transformer (8.5 bits per weight): the planner counts its bytes, and never adds fp8 storage.
    q8 = PUBLISHED_SIZES.transformer.params * 17 // 16
    from dataclasses import replace

    real = replace(PUBLISHED_SIZES, transformer=replace(PUBLISHED_SIZES.transformer, stored_bytes=q8))
    assert plan_memory(hypothetical_devices(24), real).predicted_peak_bytes < plan_memory(
        hypothetical_devices(24), PUBLISHED_SIZES).predicted_peak_bytes
    assert "fp8-storage" not in plan_memory(hypothetical_devices(8), real).options
    with pytest.raises(PlanError, match="fp8-storage cannot be combined with a GGUF transformer"):
        plan_memory(hypothetical_devices(8), real, forced_options=("fp8-storage",))


@pytest.mark.parametrize("quant", list(TOLERANCE_LEVELS))
def test_a_gguf_transformer_gives_an_image_close_to_the_bf16_one(model_dir: Path, tmp_path: Path, quant: str) -> None:
    base = Settings(model=str(model_dir), outputs_dir=tmp_path, dtype="bf16", device="cpu")
    plain = GenerationService(base)
    plain.load()
    reference = pixels(plain)
    plain.close()
    quantized = GenerationService(Settings(model=str(model_dir), outputs_dir=tmp_path, dtype="bf16", device="cpu",
                                           transformer_file=model_dir / f"transformer-{quant}.gguf"))
    quantized.load()
    try:
        weight = quantized._pipe.transformer.layers[0].attention.to_q.weight
        assert type(weight).__name__ == "GGUFParameter"  # still quantized in memory
        image = pixels(quantized)
    finally:
        quantized.close()
    difference = np.abs(image - reference).mean()
    print(f"{quant}: mean |difference| {difference:.2f} levels, max {np.abs(image - reference).max()}")
    assert 0 < difference < TOLERANCE_LEVELS[quant]


def test_bad_transformer_files_are_clear_errors(model_dir: Path, tmp_path: Path) -> None:
    from zimage.loader import component_sizes, resolve_model_source

    with pytest.raises(SettingsError, match="is not a .gguf file"):
        Settings(transformer_file=tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_source(Settings(model=str(model_dir), transformer_file=tmp_path / "missing.gguf"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")
    with pytest.raises(ModelNotFoundError, match="fake.gguf is not a readable GGUF file"):
        component_sizes(resolve_model_source(Settings(model=str(model_dir), transformer_file=fake)))


def _rewrite(source: Path, target: Path, keep=lambda index, name: True, rename=lambda name: name) -> Path:
    """``source``'s tensors, some left out or renamed, written to ``target`` as GGUF."""
    import gguf

    writer = gguf.GGUFWriter(str(target), arch="z_image")
    for index, tensor in enumerate(gguf.GGUFReader(str(source)).tensors):
        if keep(index, tensor.name):
            data = np.array(tensor.data)
            writer.add_tensor(rename(tensor.name), data, raw_shape=data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_every_unusable_transformer_file_is_one_line_naming_it(model_dir: Path, tmp_path: Path) -> None:
    """Found by a user: a 4-byte 'GGUF' file, a GGUF without tensors, a folder, tensors that do not make the model's
    transformer, or another model's file gave tracebacks or 'does not exist'."""
    from zimage.gguf_files import gguf_file_problem, load_gguf_transformer, mismatch_problem
    from zimage.loader import component_sizes, resolve_model_source

    good = model_dir / "transformer-Q8_0.gguf"
    assert gguf_file_problem(good) is None
    (tmp_path / "four.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "folder.gguf").mkdir()
    no_tensors = _rewrite(good, tmp_path / "none.gguf", keep=lambda index, name: False)
    for path, expected in [(tmp_path / "four.gguf", "four.gguf is not a readable GGUF file"),
                           (tmp_path / "empty.gguf", "empty.gguf is not a readable GGUF file"),
                           (tmp_path / "folder.gguf", "is a folder: give the .gguf file itself"),
                           (tmp_path / "gone.gguf", "does not exist"),
                           (no_tensors, "none.gguf is a GGUF file without tensors")]:
        problem = gguf_file_problem(path)
        assert problem and expected in problem and "--transformer-file" in problem, problem
        assert "\n" not in problem
    # Tensors missing or misnamed: found from the header with diffusers' own conversion before anything loads, and
    # if loading is tried anyway, diffusers' own failure is said in the same terms.
    from zimage.architecture import PUBLISHED, TINY
    from zimage.gguf_files import layout_problem

    assert layout_problem(good, TINY.transformer, "the demo model") is None
    for bad, expected in [(_rewrite(good, tmp_path / "dropped.gguf", keep=lambda index, name: index != 3),
                           "it lacks 1 of the transformer's tensors"),
                          (_rewrite(good, tmp_path / "renamed.gguf", rename=lambda name: "x" + name),
                           "it lacks 73 of the transformer's tensors")]:
        assert gguf_file_problem(bad) is None  # the header is fine ...
        assert expected in layout_problem(bad, TINY.transformer, "the demo model")  # ... its tensors are not
        with pytest.raises(ValueError, match="its tensors do not make this model's transformer"):
            load_gguf_transformer(bad, str(model_dir), __import__("torch").bfloat16)
    problem = layout_problem(good, PUBLISHED.transformer, "Z-Image-Turbo")
    assert "is not a transformer of Z-Image-Turbo: x_pad_token is (1, 32) where the model has (1, 3840)" in problem
    # Another model's transformer: the weight counts disagree, said before any loading.
    tiny = component_sizes(resolve_model_source(Settings(model=str(model_dir), transformer_file=good))).transformer
    assert mismatch_problem(tiny, tiny, "t.gguf", "demo") is None
    problem = mismatch_problem(tiny, PUBLISHED_SIZES.transformer, "t.gguf", "Tongyi-MAI/Z-Image-Turbo")
    assert problem and "has 6.15B: it is not this model's transformer" in problem


def test_app_and_generate_check_the_transformer_file_before_the_slow_start(model_dir: Path, tmp_path: Path) -> None:
    """app.py (preflight) and `generate` (setup_problem) refuse an unusable --transformer-file before building or
    loading anything (found by a user: app.py served, then logged 'model failed to load' and exited 1)."""
    from zimage.preflight import setup_problem

    probe = lambda: hypothetical_devices(0)  # noqa: E731 - no hardware probe needed
    assert "does not exist" in setup_problem(Settings(demo=True, transformer_file=tmp_path / "gone.gguf"), probe)
    (tmp_path / "dir.gguf").mkdir()
    assert "is a folder" in setup_problem(Settings(demo=True, transformer_file=tmp_path / "dir.gguf"), probe)
    assert setup_problem(Settings(demo=True), probe) is None
    # The demo's GGUF with the real model (published architecture): named as another model's file, before loading.
    good = model_dir / "transformer-Q8_0.gguf"
    assert "is not a transformer of 'Tongyi-MAI/Z-Image-Turbo' (its published architecture)" in setup_problem(
        Settings(transformer_file=good), probe)
    assert setup_problem(Settings(demo=True, transformer_file=good), probe) is None
    # fp8 storage with a GGUF file: refused before loading (was found only by the planner after the start).
    assert "fp8-storage cannot be combined with a GGUF transformer" in setup_problem(
        Settings(demo=True, transformer_file=good, memory_options=("fp8-storage",), dtype="bf16"), probe)
