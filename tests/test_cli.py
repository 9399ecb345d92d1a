"""The command line as a user runs it: real subprocesses on the demo model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zimage.storage import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([sys.executable, "-m", "zimage", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


def test_generate_demo_prints_the_saved_path(data_dir: Path, tmp_path: Path) -> None:
    done = run(["generate", "一只猫 a cat", "--demo", "--seed", "7", "--width", "256", "--height", "256",
                "--out-dir", str(tmp_path)], data_dir)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    path = Path(line)
    assert path.parent == tmp_path and path.is_file()
    assert read_metadata(path)["seed"] == 7 and read_metadata(path)["prompt"] == "一只猫 a cat"
    assert "step  8/8" in done.stderr and "seed 7" in done.stderr
    assert done.stderr.index("Encoding the prompt") < done.stderr.index("step  8/8") < done.stderr.index("Decoding the image")


def test_generate_out_file_and_same_seed_same_bytes_of_pixels(data_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    outs = []
    for name in ("a.png", "b.png"):
        target = tmp_path / name
        done = run(["generate", "a cat", "--demo", "--seed", "11", "--width", "256", "--height", "256",
                    "--steps", "2", "--out", str(target), "--quiet"], data_dir)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(target) and done.stderr == ""
        outs.append(Image.open(target).tobytes())
    assert outs[0] == outs[1]


def test_plan_json_for_a_hypothetical_card(data_dir: Path) -> None:
    done = run(["plan", "--vram-gb", "16", "--width", "1024", "--height", "1024", "--json"], data_dir)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    # The 1024x1024 decode tips the resident transformer over the 14.5 GiB usable: tiled, it fits.
    assert plan["profile"] == "transformer-resident" and plan["options"] == ["vae-tiling"] and plan["compiled"]
    assert plan["predicted_peak_bytes"] > 10 * 1024**3 and "fits" in plan["reason"]
    assert set(plan["predicted_stages"]) == {"encode_s", "denoise_s", "decode_s", "transfers_s", "casts_s"}
    assert plan["predicted_seconds"] > 0 and plan["bytes_moved_per_image"] > 0
    seconds = [c["predicted_seconds"] for c in plan["candidates"]]
    assert seconds == sorted(seconds)
    assert {"profile", "options", "predicted_peak_bytes", "predicted_seconds", "bytes_moved_per_image",
            "fits"} <= set(plan["candidates"][0])


def test_plan_ranked_table_for_a_named_card(data_dir: Path) -> None:
    done = run(["plan", "--gpu-name", "RTX 4090"], data_dir)
    assert done.returncode == 0, done.stderr
    assert "plan:      full, compiled on cuda:0" in done.stdout
    assert "spec sheet of the RTX 4090 24GB (not measured)" in done.stdout
    assert "time:      6.02 s per image predicted: encode 0.39, denoise 5.02, decode 0.61" in done.stdout
    header = next(line for line in done.stdout.splitlines() if line.startswith("placement"))
    assert "peak" in header and "s/image" in header and "GB moved/image" in header
    assert "<- chosen" in done.stdout
    given = run(["plan", "--vram-gb", "12", "--tflops", "100", "--pcie-gbps", "20", "--pageable-gbps", "9", "--json"],
                data_dir)
    rates = json.loads(given.stdout)["throughput"]
    assert (rates["bf16_tflops"], rates["h2d_gbps"], rates["pageable_gbps"]) == (100, 20, 9)
    unknown = run(["plan", "--gpu-name", "RTX 9999"], data_dir)
    assert unknown.returncode == 2 and "is not in the table" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize(("argv", "message"), [
    (["--vram-gb", "inf"], "--vram-gb=inf must be a finite number"),
    (["--vram-gb", "nan"], "--vram-gb=nan must be a finite number"),
    (["--vram-gb", "1e308"], "--vram-gb=1e+308 is out of range: use 0 (no GPU) to 1024 GB"),
    (["--vram-gb", "-1"], "--vram-gb=-1 is out of range"),
    (["--vram-gb", "8", "--gpus", "0"], "--gpus=0 is out of range: use 1 to 64"),
    (["--vram-gb", "8", "--ram-gb", "0"], "--ram-gb=0 is out of range"),
    (["--gpu-name", "4090", "--ram-gb", "inf"], "--ram-gb=inf must be a finite number"),
    (["--vram-gb", "24", "--tflops", "inf"], "--tflops=inf must be a finite number"),
    (["--vram-gb", "24", "--memory-gbps", "0"], "--memory-gbps=0 is out of range: use 1 to 100000 (GB/s)"),
    # Denormal rates gave Infinity seconds (invalid JSON) and 300-digit numbers.
    (["--vram-gb", "24", "--tflops", "1e-320"], "--tflops=9.99989e-321 is out of range: use 0.1 to 100000"),
    (["--vram-gb", "24", "--pcie-gbps", "1e-12"], "--pcie-gbps=1e-12 is out of range"),
    (["--vram-gb", "24", "--pageable-gbps", "0"], "--pageable-gbps=0 is out of range: use 0.01 to 10000 (GB/s)"),
    (["--pageable-gbps", "5"], "describe a hypothetical card: add --vram-gb"),
    (["--gpus", "4"], "--gpus and --ram-gb describe a hypothetical machine"),  # was silently ignored
    (["--gpu-name", "a" * 2500], "... (2500 characters) is not in the table"),  # not echoed in full
    (["--transformer-file", "/tmp/" + "a" * 300 + ".gguf"], "longer than the 255 a file system allows"),
    (["--model", "a" * 300], "model='aaaa"),
    (["--gpu-name", "4090", "--num-images", "0"], "num_images=0 is out of range: use a whole number from 1 to 4"),
    (["--gpu-name", "4090", "--num-images", "5"], "num_images=5 is out of range"),
    (["--gpu-name", "4090", "--width", "1023"], "width=1023 is not a multiple of 16: use 1008 or 1024"),
    (["--gpu-name", "4090", "--width", "-16"], "width=-16 is out of range"),
    (["--gpu-name", "L40"], "'L40' is not in the table"),
    (["--gpu-name", "4090", "--gguf-quant", "Q9"], "--gguf-quant 'Q9' is not a GGUF type diffusers can load"),
])
def test_plan_refuses_a_machine_or_request_it_cannot_plan(argv: list[str], message: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    """In-process (no torch import per case): one line naming the value, exit 2, never a traceback or a plan of a
    negative card (found by a user: inf and nan crashed, -1 GB planned for a CPU, 0 images divided by zero)."""
    from zimage.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_plan_lists_cards_as_json_and_estimates_a_gguf_download(capsys: pytest.CaptureFixture) -> None:
    from zimage.cli import main

    assert main(["plan", "--gpu-name", "list", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    assert {"name", "memory_gb", "dense_bf16_tflops", "memory_gbps", "pcie_gen", "pcie_lanes", "pageable_gbps",
            "compute_capability"} <= set(cards[0])
    assert main(["plan", "--gpu-name", "RTX 4070 12GB", "--gguf-quant", "Q4_0", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["profile"], plan["options"]) == ("transformer-resident", [])  # a Q4_0 file fits resident on 12 GB
    assert main(["plan", "--gpu-name", "RTX 4060 8GB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "group-offload"  # without the GGUF file
    # The name a driver reports finds the card, and the plan names the card it resolved to.
    assert main(["plan", "--gpu-name", "NVIDIA GeForce RTX 4060 Ti"]) == 0
    assert "machine:   RTX 4060 Ti 16GB (16 GiB" in capsys.readouterr().out


def test_files_with_names_too_long_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from zimage.cli import main

    long_name = "a" * 300
    for argv in (["make-demo", str(tmp_path / long_name)],
                 ["make-demo-lora", str(tmp_path / f"{long_name}.safetensors"), "--format", "peft"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "longer than the 255 a file system allows" in err and err.count("\n") == 1, err


def test_plan_for_this_machine_in_text(data_dir: Path) -> None:
    done = run(["plan"], data_dir)
    assert done.returncode == 0, done.stderr
    assert "plan:" in done.stdout and "published sizes" in done.stdout


def test_make_demo(tmp_path: Path, data_dir: Path) -> None:
    done = run(["make-demo", str(tmp_path / "demo")], data_dir)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "demo" / "model_index.json").is_file()
    refused = run(["make-demo", str(tmp_path / "demo")], data_dir)
    assert refused.returncode == 2 and "not empty" in refused.stderr


def test_make_demo_refuses_unusable_folders_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from zimage.cli import main

    (tmp_path / "afile").write_text("x")
    for folder, message in [(tmp_path / "afile", "exists and is a file"),
                            (tmp_path / "afile" / "sub", "cannot be created (Not a directory)")]:
        assert main(["make-demo", str(folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["generate", "a cat", "--model", "/no/such/model"], 1, "could not be loaded (no such folder)"),
        # An invalid request is refused before the model loads, like a bad setting.
        (["generate", "a cat", "--demo", "--width", "1000"], 2, "width=1000 is not a multiple of 16"),
        (["generate", "a cat", "--demo", "--memory-profile", "model-offload"], 2, "needs a CUDA GPU"),
        (["generate", "a cat"], 1, "run with --demo"),
        # Checked before the model loads, like app.py's start-up checks (found by a user: exit 1 after loading).
        (["generate", "a cat", "--demo", "--attention-backend", "flash"], 2, "needs a CUDA GPU"),
        (["generate", "a cat", "--demo", "--transformer-file", "/no/such.gguf"], 2, "does not exist"),
    ],
)
def test_errors_are_one_clear_line_not_a_traceback(data_dir: Path, tmp_path: Path, args: list[str], code: int,
                                                   message: str) -> None:
    done = run(args + ["--out-dir", str(tmp_path)], data_dir, HF_HOME=str(tmp_path / "hf"))
    assert done.returncode == code
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [[], ["generate"], ["plan"], ["make-demo"]])
def test_help(command: list[str], data_dir: Path) -> None:
    done = run(command + ["--help"], data_dir)
    assert done.returncode == 0 and "usage:" in done.stdout


def test_ctrl_c_during_a_generation_exits_130_with_one_line(data_dir: Path, tmp_path: Path) -> None:
    import signal

    environ = {**os.environ, "ZIMAGE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "zimage", "generate", "a long job", "--demo", "--width", "1024",
                             "--height", "1024", "--steps", "50", "--out-dir", str(tmp_path)], cwd=ROOT, env=environ,
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    seen = ""
    while "step  2/50" not in seen:
        char = proc.stderr.read(1)
        assert char, seen
        seen += char
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(120) == 130, rest  # not an abort from a thread still inside torch
    assert rest.rstrip().endswith("interrupted") and "Traceback" not in rest and "terminate" not in rest
    assert not list(tmp_path.glob("*.png"))
