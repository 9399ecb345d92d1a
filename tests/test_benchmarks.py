"""The benchmarks stay runnable: their pure parts checked, their smoke modes run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_profiles  # noqa: E402
from results_md import write_section  # noqa: E402


def test_published_architecture_has_exactly_the_planners_published_sizes() -> None:
    from zimage.architecture import PUBLISHED, parameter_counts
    from zimage.planner import PUBLISHED_CONTROLNET, PUBLISHED_SIZES

    counts = parameter_counts(PUBLISHED)
    assert counts == {"transformer": PUBLISHED_SIZES.transformer.params,
                      "text_encoder": PUBLISHED_SIZES.text_encoder.params, "vae": PUBLISHED_SIZES.vae.params,
                      "controlnet": PUBLISHED_CONTROLNET.params}
    assert counts["transformer"] == 6_154_908_736  # the published 6.15B


def test_transformer_flops_by_hand() -> None:
    config = {"dim": 6, "all_patch_size": (2,), "in_channels": 16, "n_layers": 1, "n_refiner_layers": 0,
              "cap_feat_dim": 4}
    # 128x128 px -> 16x16 latents -> 8x8 patches = 64 image tokens; 10 caption tokens pad to 32.
    image, caption, dim, hidden = 64, 32, 6, 16
    block = 2 * (image + caption) * (4 * dim * dim + 3 * dim * hidden) + 4 * (image + caption) ** 2 * dim
    embed = 2 * image * 64 * dim * 2 + 2 * caption * 4 * dim
    assert gpu_profiles.transformer_flops_per_image(config, 128, 128, 3, 10) == 3 * (block + embed)


def test_published_transformer_flops_at_1024() -> None:
    from zimage.architecture import PUBLISHED

    flops = gpu_profiles.transformer_flops_per_image(PUBLISHED.transformer, 1024, 1024, 8, 100)
    # ~6.1B parameters x 2 FLOPs x ~4200 tokens x 8 steps, plus attention: 400-500 TFLOP.
    assert 400e12 < flops < 500e12
    assert gpu_profiles.transformer_flops_per_image(PUBLISHED.transformer, 1024, 1024, 16, 100) == 2 * flops


@pytest.mark.parametrize("predicted, measured, error", [(110, 100, 10.0), (90, 100, -10.0), (100, 100, 0.0)])
def test_planner_error_percent(predicted: int, measured: int, error: float) -> None:
    assert gpu_profiles.planner_error_percent(predicted, measured) == pytest.approx(error)


def test_fits_leaves_the_context_and_the_reserve() -> None:
    gib = 1024**3
    assert gpu_profiles.fits(14 * gib, 16, gib)
    assert not gpu_profiles.fits(int(14.6 * gib), 16, gib)  # 16 - 0.5 context - 1 reserve = 14.5


def test_results_sections_are_replaced_not_duplicated(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    write_section(path, "a", "first")
    write_section(path, "b", "other")
    write_section(path, "a", "second")
    text = path.read_text()
    assert text.count("<!-- begin a -->") == 1 and "second" in text and "first" not in text and "other" in text


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profiles.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA GPU" in done.stdout and not list(tmp_path.iterdir())


def test_gpu_benchmark_flow_on_the_tiny_model(tmp_path: Path) -> None:
    """Build, save, load through the real loader and service, measure, write: everything but CUDA."""
    results_md = tmp_path / "RESULTS.md"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profiles.py"), "--tiny", "--repeats", "2",
                           "--out", str(tmp_path), "--results-md", str(results_md), "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-*.json")
    result = json.loads(json_path.read_text())
    row, gguf_row = result["profiles"]
    assert row["ok"] and row["label"] == "cpu" and len(row["latencies_s"]) == 2 and row["median_s"] > 0
    # The GGUF case: the demo transformer written as Q4_0 with the gguf package, loaded through --transformer-file.
    assert gguf_row["ok"] and gguf_row["label"] == "cpu [GGUF]" and gguf_row["median_s"] > 0
    assert result["gguf"]["quant"] == "Q4_0" and result["gguf"]["stored_bytes"] > 0
    assert result["compute_floor"]["caption_tokens"] > 10 and result["compute_floor"]["floor_s"] > 0
    assert "| cpu |" in results_md.read_text() and "x compute floor" in done.stdout
    assert not list(tmp_path.glob("zimage-gpu-bench-*"))  # the saved model does not stay on disk


def test_gpu_benchmark_runs_what_the_targets_rest_on_first() -> None:
    order = gpu_profiles.run_order(tiny=False)
    kinds = [kind for kind, _ in order]
    first_card = kinds.index("card")
    core = [what.label for kind, what in order[:first_card]]
    # Before the emulated cards: the placements for 8-24 GB cards, compiled where it composes (the default), and
    # fp8 compute, which no run has measured yet (the planner does not pick it until one has).
    assert core == ["full", "transformer-resident", "transformer-resident + fp8-compute",
                    "group-offload + fp8-storage (streams)", "transformer-resident + fp8-storage"]
    assert [what for kind, what in order if kind == "card"][:4] == [(16, False), (12, False), (8, False), (24, False)]
    assert "full [eager]" in [what.label for kind, what in order if kind == "case"]
    assert kinds[-2:] == ["prompt-cache", "prompt-cache"]  # a repeated prompt matters less than the placements
    labels = [what.label for kind, what in order if kind == "case"]
    assert sorted(labels) == sorted(case.label for case in gpu_profiles.GPU_CASES) and len(set(labels)) == len(labels)
    only = gpu_profiles.run_order(tiny=False, profiles="model-offload")
    assert {what.profile for kind, what in only if kind == "case"} == {"model-offload"}


def test_gpu_benchmark_keeps_to_its_time_budget_and_says_what_it_left_out(tmp_path: Path) -> None:
    # A budget of 0 s: the model is built and the floor measured, no step starts, the files say what was left out.
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profiles.py"), "--tiny", "--budget-s", "0",
                           "--out", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md"),
                           "--work-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                            "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-*.json")
    result = json.loads(json_path.read_text())
    assert result["profiles"] == [] and result["compute_floor"]["floor_s"] > 0
    assert result["skipped"] == ["cpu: the time budget (--budget-s) ran out",
                                 "cpu [GGUF]: no time left to write the GGUF file",
                                 "prompt cache on cpu: the time budget (--budget-s) ran out"]
    assert "Not measured in this run: cpu: the time budget" in (tmp_path / "RESULTS.md").read_text()
    assert result["budget_s"] == 0
    for bad in ("-1", "nan", "inf"):
        refused = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_profiles.py"), "--tiny",
                                  "--budget-s", bad, "--out", str(tmp_path / "no")], capture_output=True, text=True,
                                 timeout=120)
        assert refused.returncode == 2 and "from 0 up" in refused.stderr and not (tmp_path / "no").exists()


def test_service_benchmark_quick_mode(tmp_path: Path, data_dir: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "service_bench.py"), "--quick",
                           "--out", str(tmp_path), "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("service-*-quick.json")
    result = json.loads(json_path.read_text())
    assert (tmp_path / json_path.name.replace(".json", ".png")).stat().st_size > 1000
    assert [row["clients"] for row in result["queue"]] == [1, 4, 8, 16]
    assert all(not row["failures"] and row["images"] == row["clients"] for row in result["queue"])
    assert result["overhead"]["api_over_direct"] > 1  # HTTP is never free
    assert len(result["soak"]["points"]) == 3
    assert "| ratio API / direct |" in done.stdout


def test_modes_benchmark_quick_mode(tmp_path: Path, data_dir: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "modes_bench.py"), "--quick",
                           "--out", str(tmp_path), "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("modes-*-quick.json")
    rows = {row["mode"]: row for row in json.loads(json_path.read_text())["modes"]}
    assert list(rows) == ["text", "img2img, strength 0.6", "img2img, strength 1.0", "inpaint", "controlnet",
                          "controlnet_inpaint"]
    assert rows["text"]["extra_s"] == 0 and all(row["median_s"] > 0 for row in rows.values())
    assert rows["controlnet_inpaint"]["steps_run"] == 2 and "| controlnet |" in done.stdout


def test_doors_benchmark_quick_mode(tmp_path: Path, data_dir: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "doors_bench.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "ZIMAGE_DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("doors-*-quick.json")
    report = json.loads(json_path.read_text())
    assert set(report["doors"]) == {"rest", "gradio http", "gradio_client"}
    for door, row in report["doors"].items():
        # Each door's cost is what the client waited beyond the job's own time: never negative, never the whole wall.
        assert 0 <= row["median_cost_s"] < row["median_wall_s"], door
    assert "| gradio_client |" in done.stdout


def test_mechanisms_benchmark_runs_its_flow_on_the_tiny_model(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_mechanisms.py"), "--tiny", "--out",
                           str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-mechanisms-*.json")
    result = json.loads(json_path.read_text())
    variants = result["text_encoder"]["variants"]
    assert variants["resident"]["seconds"] > 0 and variants["block, no stream"]["seconds"] > 0
    assert variants["leaf, stream"] == {"error": "streams need CUDA"}  # said, not skipped silently
    assert result["transformer"]["eager_step_s"] > 0 and result["vae"]["seconds"] > 0
    assert "Placement mechanisms" in (tmp_path / "RESULTS.md").read_text()
