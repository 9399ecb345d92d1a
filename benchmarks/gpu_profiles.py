#!/usr/bin/env python3
"""Peak VRAM and latency of every memory profile on the full-size Z-Image-Turbo architecture (CUDA only).

No download: the published architecture (zimage.architecture.PUBLISHED: 6.15B-parameter transformer,
Qwen3-4B-sized text encoder, Flux VAE) is built with random weights on the GPU in bf16 and saved once
to local disk, so the loader's real ``from_pretrained`` path and the planner's safetensors-header sizes
are exercised. Then, at 1024x1024 and the Turbo step count, through the generation service:

1. each profile and option (full, transformer-resident, model-offload, group-offload with and without
   streams, sequential-offload; attention-slicing, vae-tiling, fp8-storage, te-fp8-storage; a GGUF Q4_0
   transformer written from the random one with the ``gguf`` package, ``--gguf``): peak allocated and reserved
   VRAM, median latency of ``--repeats`` runs after a warm-up (prompt cache off), the planner's predicted peak
   and seconds per image beside them with its error (predicted from the start-up probe's rates), RAM used; then
   a prompt-cache miss and hit on model-offload and transformer-resident;
2. emulated 8/12/16/24 GB cards, and an 8 GB card with the GGUF transformer
   (``torch.cuda.set_per_process_memory_fraction``): what ``--memory-profile auto`` picks, run for real, its
   predicted peak and time next to the measured ones (the planner's error), and which profiles fit by their
   measured peaks (``--emulate-all`` runs them all);
3. the compute floor: the transformer's FLOPs per image over the GPU's measured bf16 matmul rate,
   and each profile's latency as a multiple of it.

The steps run most important first (:func:`run_order`): the placements the issue's 8-24 GB targets rest on, then
the emulated cards, then the other options, then the prompt cache; ``--budget-s`` starts no step the time left
has no room for and lists what it left out. ``<out>/gpu-<device>-<date>.json`` and a section of
``benchmarks/RESULTS.md`` are written after every step, so a run stopped from outside keeps what it measured.
Without a CUDA GPU it says so and exits 0. ``--tiny`` runs the same flow on the demo architecture on the CPU (the
``cpu`` profile only): the smoke test that keeps this script working on machines without a GPU.

    python benchmarks/gpu_profiles.py --budget-s 420       # on a CUDA machine (not run on one yet)
    python benchmarks/gpu_profiles.py --tiny --out /tmp/g  # anywhere, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zimage.timing import padded, transformer_flops_per_image  # noqa: E402,F401 - one formula, shared with the planner

GIB = 1024**3
PROMPT = "A red fox in fresh snow at sunrise, detailed fur, soft golden light, 35mm photograph"


@dataclass(frozen=True)
class Case:
    """One placement to measure."""

    profile: str
    options: tuple[str, ...] = ()
    use_streams: bool | None = None  # group-offload only: None = the planner's choice (streams on CUDA)
    max_repeats: int | None = None  # cap for very slow placements
    attention_backend: str = "native"  # --attention-backend: a kernel missing on this machine fails only its row
    #: --compile (auto: where it composes, as the server does by default); the compile and warm-up are in load_s.
    compile: str = "auto"
    gguf: bool = False  # the transformer from the GGUF file written by write_gguf (--transformer-file)
    #: Also time the first request of sizes the warm-up did not compile (the cost of a new size).
    new_sizes: bool = False

    @property
    def label(self) -> str:
        name = " + ".join((self.profile,) + self.options)
        if self.use_streams is not None:
            name += " (streams)" if self.use_streams else " (no streams)"
        if self.attention_backend != "native":
            name += f" [attention {self.attention_backend}]"
        if self.compile == "off":
            name += " [eager]"
        if self.gguf:
            name += " [GGUF]"
        return name


GPU_CASES = (
    # First what the targets rest on: the placements for 24, 16, 12 and 8 GB cards, compiled where it composes
    # (the server's default), with the text encoder streamed at leaf level.
    Case("full", new_sizes=True),
    Case("transformer-resident"),
    Case("transformer-resident", ("fp8-compute",)),
    Case("group-offload", ("fp8-storage",), use_streams=True, max_repeats=2),
    Case("transformer-resident", ("fp8-storage",), max_repeats=2),
    # What compilation and fp8 compute give on their own, and the rest of the options.
    Case("full", compile="off"),
    Case("transformer-resident", compile="off", max_repeats=2),
    Case("full", ("fp8-compute",)),
    Case("group-offload", (), use_streams=True, max_repeats=2),
    Case("full", ("step-cache",), compile="off", max_repeats=2),
    Case("transformer-resident", ("te-fp8-storage",), max_repeats=2),
    Case("full", ("fp8-storage",), max_repeats=2),
    Case("transformer-resident", gguf=True, max_repeats=2),
    Case("model-offload", max_repeats=1),
    Case("full", attention_backend="_native_cudnn", max_repeats=2),
    Case("group-offload", (), use_streams=False, max_repeats=1),
    Case("sequential-offload", (), max_repeats=1),
    Case("full", ("vae-tiling",), max_repeats=2),
)
#: Emulated cards: (GB, with the GGUF transformer), the issue's targets first.
GPU_CARDS = ((16, False), (12, False), (8, False), (24, False), (8, True))
CPU_CASES = (Case("cpu"), Case("cpu", gguf=True))
#: How many of GPU_CASES run before the emulated cards: a run cut short by its time budget still has them.
CORE_CASES = 5
#: Sizes (width, height, images) the compile warm-up did not see (zimage.service.WARM_UP_SHAPES): the first request
#: of each is timed against the next one, which shows whether a new size stalls its user for a recompilation.
NEW_SIZES = ((1280, 720, 1), (720, 1280, 1), (1024, 1024, 2))
#: A step is started only when the time left is more than this, or than the last step took if that was longer.
MIN_STEP_S = 20.0
#: The GGUF file is written only when this much time is left (about a minute on the full-size model).
GGUF_WRITE_S = 90.0


def run_order(tiny: bool, profiles: str = "") -> list[tuple[str, Any]]:
    """What a run measures, most important first: ``("case", Case)``, ``("card", (GB, with GGUF))`` and
    ``("prompt-cache", profile)`` steps. ``profiles`` (comma separated) keeps only those placements' cases."""
    cases = CPU_CASES if tiny else GPU_CASES
    if profiles:
        wanted = set(profiles.split(","))
        cases = tuple(case for case in cases if case.profile in wanted)
    if tiny:
        return [("case", case) for case in cases] + [("prompt-cache", "cpu")]
    core = [case for case in GPU_CASES[:CORE_CASES] if case in cases]
    rest = [case for case in cases if case not in core]
    return ([("case", case) for case in core] + [("card", card) for card in GPU_CARDS]
            + [("case", case) for case in rest]
            + [("prompt-cache", profile) for profile in ("transformer-resident", "model-offload")])


# --- Pure parts (tested without a GPU) --------------------------------------------------------------

def planner_error_percent(predicted_bytes: int, measured_bytes: int) -> float:
    """How far the prediction is from the measurement, in percent of the measurement (+ = overestimate)."""
    return 100.0 * (predicted_bytes - measured_bytes) / measured_bytes if measured_bytes else float("nan")


def fits(measured_peak_reserved_bytes: int, card_gb: float, reserve_bytes: int) -> bool:
    """Whether a placement whose measured peak is this would run on a card of ``card_gb``."""
    from zimage.planner import CUDA_CONTEXT_BYTES

    return measured_peak_reserved_bytes <= card_gb * GIB - CUDA_CONTEXT_BYTES - reserve_bytes


def markdown(result: dict) -> str:
    """The tables for RESULTS.md and stdout."""
    m = result["machine"]
    floor = result["compute_floor"]
    lines = [
        f"### Memory profiles, {result['architecture']}, {result['date']}",
        "",
        f"Device: **{m['device']}** ({m['gpu_total_gb']:.0f} GB), torch {m['torch']}, diffusers {m['diffusers']}; "
        f"{result['width']}x{result['height']}, {result['steps']} steps, {result['dtype']}, median of the "
        "timed runs (n) after a warm-up. "
        + ("Weights are random: memory and speed are the real model's, the images are not."
           if m["gpu_total_gb"] else "The tiny demo model on the CPU: a smoke run of the flow, no figure here is "
                                     "the real model's."),
        "",
        "| placement | compiled | peak allocated | peak reserved | predicted peak (error) | median latency | "
        "encode / denoise / decode | predicted s/image (error) | x compute floor | pixels vs full | RAM (RSS) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["profiles"]:
        if row["ok"]:
            lines.append(f"| {row['label']} | {'yes' if row.get('compiled') else 'no'} | "
                         f"{row['peak_allocated_bytes'] / GIB:.2f} GiB | "
                         f"{row['peak_reserved_bytes'] / GIB:.2f} GiB | {_predicted_peak(row)} | "
                         f"{row['median_s']:.2f} s (n={len(row['latencies_s'])}) | {_stages(row)} | "
                         f"{_predicted_time(row)} | {row['median_s'] / floor['floor_s']:.1f}x | {_drift(row)} | "
                         f"{row['rss_gb']:.1f} GB |")
        else:
            lines.append(f"| {row['label']} | - | - | - | - | - | - | - | - | - | failed: {row['error'][:80]} |")
    for row in result["profiles"]:
        if row.get("new_sizes"):
            lines += ["", f"Sizes the compile warm-up did not see, on {row['label']} (first request, then the next):",
                      "", "| size | images | first | next |", "| --- | --- | --- | --- |"]
            lines += [f"| {n['size'][0]}x{n['size'][1]} | {n['images']} | {n['first_s']:.2f} s | {n['again_s']:.2f} s |"
                      for n in row["new_sizes"]]
    lines += [
        "",
        f"Compute floor: the transformer does {floor['transformer_tflop_per_image']:.3g} TFLOP per image "
        f"({floor['caption_tokens']} caption tokens); measured bf16 matmul rate "
        f"{floor['matmul_tflops']:.3g} TFLOP/s; floor {floor['floor_s']:.3g} s per image.",
    ]
    if result.get("throughput"):
        t = result["throughput"]
        lines += ["", f"Start-up probe (the planner's rates): {t['bf16_tflops']:.1f} TFLOP/s bf16, "
                      f"{t['h2d_gbps']:.1f} GB/s host-to-device (pinned), "
                      f"{t.get('pageable_gbps', float('nan')):.2f} GB/s pageable round trip, "
                      f"{t['memory_gbps']:.0f} GB/s memory. Allocator: "
                      f"PYTORCH_CUDA_ALLOC_CONF={result.get('cuda_alloc_conf') or '(default)'}."]
    if result.get("gguf"):
        g = result["gguf"]
        lines += ["", f"GGUF transformer: {g['quant']}, {g['stored_bytes'] / GIB:.2f} GiB of tensors, written in "
                      f"{g['write_s']:.0f} s with the gguf package."]
    if result.get("prompt_cache"):
        lines += ["", "| prompt cache | first request (miss) | same prompt again (hit) |", "| --- | --- | --- |"]
        for row in result["prompt_cache"]:
            lines.append(f"| {row['label']} | {row.get('miss_s', float('nan')):.2f} s | "
                         f"{row.get('hit_s', float('nan')):.2f} s |" if row["ok"] else
                         f"| {row['label']} | failed: {row['error'][:60]} | |")
    if result.get("cards"):
        lines += ["", "| emulated card | auto picks | predicted peak | measured peak (reserved) | planner error | "
                  "latency | predicted s/image (error) | x compute floor | placements that fit (measured peaks) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for card in result["cards"]:
            run = card["auto"]
            measured = (f"{run['peak_reserved_bytes'] / GIB:.2f} GiB" if run["ok"] else f"failed: {run['error'][:60]}")
            error = f"{card['planner_error_percent']:+.0f}%" if run["ok"] else "-"
            latency = f"{run['median_s']:.2f} s" if run["ok"] else "-"
            floor_x = f"{run['median_s'] / floor['floor_s']:.2f}x" if run["ok"] else "-"
            name = f"{card['card_gb']} GB" + (" + GGUF" if card.get("gguf") else "")
            if run.get("reused"):
                name += " (measured row)"
            lines.append(f"| {name} | {run['label']} | {run.get('predicted_peak_bytes', 0) / GIB:.2f} GiB | "
                         f"{measured} | {error} | {latency} | {_predicted_time(run) if run['ok'] else '-'} | "
                         f"{floor_x} | {', '.join(fitting_placements(result, card)) or 'none'} |")
    if result.get("skipped"):
        lines += ["", "Not measured in this run: " + "; ".join(result["skipped"]) + "."]
    return "\n".join(lines)


def _stages(row: dict) -> str:
    stages = row.get("stages_s") or {}
    if not stages:
        return "-"
    return " / ".join(f"{stages.get(name, float('nan')):.2f}" for name in ("encode_s", "denoise_s", "decode_s")) + " s"


def _drift(row: dict) -> str:
    drift = row.get("pixels_vs_full")
    return "-" if not drift else f"{drift['mean_abs_levels']:.1f} levels"


def _predicted_peak(row: dict) -> str:
    predicted = row.get("predicted_peak_bytes") or 0
    if not predicted:
        return "-"
    return f"{predicted / GIB:.2f} GiB ({planner_error_percent(predicted, row['peak_reserved_bytes']):+.0f}%)"


def _predicted_time(row: dict) -> str:
    predicted = row.get("predicted_seconds")
    if not predicted:
        return "-"
    error = 100.0 * (predicted - row["median_s"]) / row["median_s"]
    return f"{predicted:.2f} s ({error:+.0f}%)"


# --- Adapters (CUDA, or the CPU with --tiny) -------------------------------------------------------

def build_and_save(arch: Any, folder: Path, device: str) -> float:
    """Build ``arch`` with random weights directly on ``device`` in bf16 and save it; returns seconds."""
    import torch

    from zimage.architecture import build_random_pipeline
    from zimage.demo_model import build_tokenizer
    from zimage.hardware import release_memory

    started = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            pipe = build_random_pipeline(arch, build_tokenizer(), seed=0)
    finally:
        torch.set_default_dtype(previous)
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe
    release_memory()
    return time.perf_counter() - started


def matmul_tflops(device: str, side: int, iterations: int) -> float:
    """Measured dense bf16 matmul rate of ``device`` in TFLOP/s."""
    import torch

    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    started = time.perf_counter()
    for _ in range(iterations):
        a @ b
    _sync(device)
    return 2 * side**3 * iterations / (time.perf_counter() - started) / 1e12


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def caption_tokens(folder: Path) -> int:
    """Tokens the pipeline feeds the transformer for PROMPT (chat template included, no padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=True)
    return len(tokenizer(text).input_ids)


def write_gguf(folder: Path, quant: str, path: Path) -> dict:
    """The saved transformer of ``folder`` written to ``path`` as GGUF ``quant`` with the project's writer (the
    key layout published Z-Image GGUF files use); returns its size and the seconds it took."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage.gguf_files import write_transformer_gguf
    from zimage.hardware import release_memory

    started = time.perf_counter()
    transformer = ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", dtype=torch.bfloat16)
    stored = write_transformer_gguf(transformer, path, quant)
    del transformer
    release_memory()
    return {"quant": quant, "path": str(path), "stored_bytes": stored, "write_s": time.perf_counter() - started}


#: The pixels of each measured placement's first image (same prompt and seed), to say how far lossy options move them.
REFERENCE_PIXELS: dict[str, Any] = {}


def pixel_distance(pixels: Any, reference: Any) -> dict[str, float]:
    """Mean absolute difference in 0-255 levels and relative L2 distance of two images of the same shape."""
    import numpy as np

    a, b = np.asarray(pixels, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    return {"mean_abs_levels": float(np.abs(a - b).mean()),
            "relative_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-9))}


def _stage_medians(results: list) -> dict[str, float]:
    stages = ("encode_s", "denoise_s", "decode_s")
    return {name: statistics.median(r.timings[name] for r in results) for name in stages
            if all(name in r.timings for r in results)}


def run_case(folder: Path, case: Case, devices: Any, repeats: int, work: Path, device: str,
             gguf_file: Path | None = None) -> dict:
    """Load the pipeline with this placement through the service (the transformer from ``gguf_file`` for a GGUF
    case), generate, and measure: seconds and peak memory of each stage, the predicted ones beside them, and how far
    the image is from the ``full`` one (lossy options)."""
    import numpy as np
    import psutil

    from zimage.errors import ZImageError
    from zimage.hardware import gpu_memory_stats, reset_gpu_peak
    from zimage.loader import load_pipeline
    from zimage.planner import PlanError
    from zimage.service import DEFAULT_STEPS, GenerationRequest, GenerationService
    from zimage.settings import Settings

    # The prompt cache is off: every timed run encodes its prompt, as the planner's prediction assumes (a cache
    # hit is measured on its own, measure_prompt_cache).
    settings = Settings(model=str(folder), memory_profile=case.profile, memory_options=case.options,
                        device=device, outputs_dir=work / "outputs",
                        data_dir=work / "data", auto_fp8=True, prompt_cache_mb=0,
                        attention_backend=case.attention_backend, compile=case.compile,
                        transformer_file=gguf_file if case.gguf else None)

    def factory(source: Any, plan: Any) -> Any:
        if case.use_streams is not None and plan.profile == "group-offload":
            plan = replace(plan, use_streams=case.use_streams)
        return load_pipeline(source, plan)

    service = GenerationService(settings, devices=devices, pipeline_factory=factory)
    row: dict[str, Any] = {"label": case.label, "ok": False}
    try:
        started = time.perf_counter()
        service.load()
        row["load_s"] = time.perf_counter() - started
        plan = service.plan
        row.update(label=case.label if case.profile != "auto" else plan.describe(), profile=plan.profile,
                   options=list(plan.options), predicted_peak_bytes=plan.predicted_peak_bytes,
                   predicted_seconds=plan.predicted_seconds, bytes_moved_per_image=plan.bytes_moved_per_image,
                   predicted_stages=plan.stages.to_json() if plan.stages else None,
                   attention_backend=service.attention_backend, compiled=plan.compiled)
        request = GenerationRequest(prompt=PROMPT, width=1024, height=1024, steps=DEFAULT_STEPS, seed=1)
        service.generate(request)  # warm-up: kernels, allocator, offload hooks
        reset_gpu_peak(device)
        results = []
        for _ in range(min(repeats, case.max_repeats or repeats)):
            result = service.generate(request)
            if result.recoveries:  # the service stepped down: this placement did not run as asked
                raise ZImageError(f"out of memory, recovered by: {'; '.join(result.recoveries)}")
            results.append(result)
        stats = gpu_memory_stats(device)
        # The service's stage meter resets the peak at every stage: the job's peak is the largest stage peak.
        for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
            stats[key] = max([stats.get(key, 0)] + [max(row.get(key, 0) for row in r.stage_peaks.values())
                                                    for r in results if r.stage_peaks])
        latencies = [r.timings["generate_s"] for r in results]
        pixels = np.asarray(results[0].images[0].convert("RGB"))
        reference = REFERENCE_PIXELS.setdefault("full", pixels) if case.profile == "full" and not case.options \
            and not case.gguf else REFERENCE_PIXELS.get("full")
        row.update(ok=True, latencies_s=latencies, median_s=statistics.median(latencies),
                   stages_s=_stage_medians(results), stage_peaks=results[-1].stage_peaks,
                   peak_allocated_bytes=stats.get("peak_allocated_bytes", 0),
                   peak_reserved_bytes=stats.get("peak_reserved_bytes", 0),
                   rss_gb=psutil.Process().memory_info().rss / 1e9)
        if reference is not None and reference is not pixels:
            row["pixels_vs_full"] = pixel_distance(pixels, reference)
        if case.new_sizes and plan.compiled:
            row["new_sizes"] = []
            for width, height, images in NEW_SIZES:
                sized = GenerationRequest(prompt=PROMPT, width=width, height=height, steps=DEFAULT_STEPS, seed=1,
                                          num_images=images)
                first = service.generate(sized).timings["generate_s"]
                again = service.generate(sized).timings["generate_s"]
                row["new_sizes"].append({"size": [width, height], "images": images, "first_s": first,
                                         "again_s": again})
    except Exception as exc:  # noqa: BLE001 - a failed case is a row (torch's compiler raises its own types), the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        service.unload()  # the next case loads its own pipeline into the freed memory
    return row


def measure_prompt_cache(folder: Path, profile: str, devices: Any, work: Path, device: str) -> dict:
    """Seconds of a first request and of the same prompt again (a prompt-cache hit: no text encoder) on
    ``profile``, after a warm-up with another prompt."""
    from zimage.service import DEFAULT_STEPS, GenerationRequest, GenerationService
    from zimage.settings import Settings

    settings = Settings(model=str(folder), memory_profile=profile, device=device, outputs_dir=work / "outputs",
                        data_dir=work / "data")
    service = GenerationService(settings, devices=devices)
    row: dict[str, Any] = {"label": profile, "ok": False}
    try:
        service.load()

        def timed(prompt: str) -> float:
            request = GenerationRequest(prompt=prompt, width=1024, height=1024, steps=DEFAULT_STEPS, seed=1)
            return service.generate(request).timings["generate_s"]

        timed("warm-up " + PROMPT)
        row.update(ok=True, miss_s=timed(PROMPT), hit_s=timed(PROMPT))
    except Exception as exc:  # noqa: BLE001 - a failed case is a row, the run goes on
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        service.unload()
    return row


def machine(device: str) -> dict:
    import diffusers
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        return {"device": props.name, "gpu_total_gb": props.total_memory / 1e9, "torch": torch.__version__,
                "diffusers": diffusers.__version__}
    return {"device": "CPU (tiny smoke run)", "gpu_total_gb": 0.0, "torch": torch.__version__,
            "diffusers": diffusers.__version__}


def run(args: argparse.Namespace, save: Callable[[dict], None], time_left: Callable[[], float]) -> dict:
    """Measure everything in a scratch folder that is removed afterwards (the saved model is ~21 GB). ``save`` is
    called with the result so far after every step (a run stopped from outside keeps what it measured);
    ``time_left()`` is the budget's seconds left: no step starts that the budget has no room for."""
    work = Path(tempfile.mkdtemp(prefix="zimage-gpu-bench-", dir=args.work_dir))
    try:
        return _measure(args, work, save, time_left)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(args: argparse.Namespace, work: Path, save: Callable[[dict], None],
             time_left: Callable[[], float]) -> dict:
    from zimage.architecture import PUBLISHED, TINY
    from zimage.hardware import probe_devices
    from zimage.logs import configure_logging
    from zimage.service import DEFAULT_STEPS

    configure_logging("WARNING")
    device = "cpu" if args.tiny else "cuda:0"
    arch = TINY if args.tiny else PUBLISHED
    folder = work / "model"
    print(f"building {arch.name} with random weights on {device} ...", file=sys.stderr)
    build_s = build_and_save(arch, folder, device)
    devices = probe_devices(measure_throughput=not args.tiny)
    if devices.gpus and devices.gpus[0].throughput is not None:
        t = devices.gpus[0].throughput
        result_throughput = {"bf16_tflops": t.bf16_tflops, "h2d_gbps": t.h2d_gbps, "memory_gbps": t.memory_gbps,
                             "pageable_gbps": t.pageable_gbps, "source": t.source}
    else:
        result_throughput = None
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"), "architecture": arch.name, "machine": machine(device),
        "width": 1024, "height": 1024, "steps": DEFAULT_STEPS, "dtype": "bf16", "repeats": args.repeats,
        "build_and_save_s": build_s, "throughput": result_throughput, "budget_s": args.budget_s,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "compute_capability": list(devices.gpus[0].compute_capability) if devices.gpus else None,
        "fp8_compute_library": devices.fp8_compute_library,
    }
    tokens = caption_tokens(folder)
    flops = transformer_flops_per_image(arch.transformer, 1024, 1024, DEFAULT_STEPS, tokens)
    rate = matmul_tflops(device, 256 if args.tiny else 8192, 3 if args.tiny else 50)
    result["compute_floor"] = {"caption_tokens": tokens, "transformer_tflop_per_image": flops / 1e12,
                               "matmul_tflops": rate, "floor_s": flops / 1e12 / rate}
    result.update(profiles=[], prompt_cache=[], cards=[], skipped=[])
    planned = run_order(args.tiny, args.profiles)
    if not args.gguf:
        planned = [(kind, what) for kind, what in planned if not (kind == "case" and what.gguf)
                   and not (kind == "card" and what[1])]
    gguf_file: Path | None = None
    gguf_tried = False
    last_step_s = 0.0
    save(result)
    for kind, what in planned:
        needs_gguf = (kind == "case" and what.gguf) or (kind == "card" and what[1])
        name = step_name(kind, what)
        if needs_gguf and not gguf_tried:
            gguf_tried = True
            if time_left() > GGUF_WRITE_S:
                print(f"writing the transformer as GGUF {args.gguf} ...", file=sys.stderr)
                result["gguf"] = write_gguf(folder, args.gguf, work / f"transformer-{args.gguf}.gguf")
                gguf_file = Path(result["gguf"]["path"])
        if needs_gguf and gguf_file is None:
            result["skipped"].append(f"{name}: no time left to write the GGUF file")
            continue
        if time_left() <= max(MIN_STEP_S, last_step_s):
            result["skipped"].append(f"{name}: the time budget (--budget-s) ran out")
            continue
        print(f"{kind} {name} ...", file=sys.stderr)
        step_started = time.perf_counter()
        try:
            if kind == "case":
                result["profiles"].append(run_case(folder, what, devices, args.repeats, work, device, gguf_file))
            elif kind == "prompt-cache":
                result["prompt_cache"].append(measure_prompt_cache(folder, what, devices, work, device))
            else:
                result["cards"].append(emulate_card(folder, what, devices, work, device, gguf_file,
                                                    [c for k, c in planned if k == "case"] if args.emulate_all
                                                    else (), measured=result["profiles"]))
        except Exception as exc:  # noqa: BLE001 - one failed step must not cost the rest of a short GPU lease
            result["skipped"].append(f"{name}: failed ({type(exc).__name__}: {str(exc)[:120]})")
        last_step_s = time.perf_counter() - step_started
        save(result)
    return result


def step_name(kind: str, what: Any) -> str:
    """A :func:`run_order` step in words, for the log and the list of steps left out."""
    if kind == "case":
        return what.label
    if kind == "card":
        return f"{what[0]} GB card" + (" with the GGUF transformer" if what[1] else "")
    return f"prompt cache on {what}"


def emulate_card(folder: Path, card: tuple[float, bool], devices: Any, work: Path, device: str,
                 gguf_file: Path | None, run_all: Any = (), measured: list | None = None) -> dict:
    """What ``--memory-profile auto`` picks on a card of ``card_gb``, with the probe's rates (so predicted seconds
    compare with measured ones): when that placement was measured already (``measured``, the rows of this run) and
    its measured peak fits the card, that row is reused (an unconstrained allocator reserves at least as much as a
    constrained one); otherwise it is run for real on the card emulated with
    ``torch.cuda.set_per_process_memory_fraction``. ``run_all``: also run these cases there and list those that ran
    (``--emulate-all``)."""
    import torch

    from zimage.loader import component_sizes, plan_for, resolve_model_source
    from zimage.planner import hypothetical_devices
    from zimage.settings import Settings

    card_gb, with_gguf = card
    gpu = devices.gpus[0] if devices.gpus else None
    card_devices = hypothetical_devices(card_gb, 1, devices.ram_total_bytes / GIB,
                                        throughput=gpu.throughput if gpu else None,
                                        compute_capability=gpu.compute_capability if gpu else None,
                                        fp8_compute_library=devices.fp8_compute_library)
    settings = Settings(model=str(folder), device=device, transformer_file=gguf_file if with_gguf else None,
                        outputs_dir=work / "outputs", data_dir=work / "data")
    plan = plan_for(settings, card_devices, component_sizes(resolve_model_source(settings)))
    auto = None
    for row in measured or ():
        if (row.get("ok") and row.get("profile") == plan.profile and tuple(row.get("options", ())) == plan.options
                and row.get("compiled") == plan.compiled and ("[GGUF]" in row["label"]) == with_gguf
                and "[attention" not in row["label"] and "(no streams)" not in row["label"]
                and fits(row["peak_reserved_bytes"], card_gb, 1024**3)):
            auto = dict(row, label=plan.describe(), reused=row["label"], predicted_peak_bytes=plan.predicted_peak_bytes,
                        predicted_seconds=plan.predicted_seconds)
            break
    total = torch.cuda.get_device_properties(device).total_memory
    ran: list[str] = []
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_gb * GIB / total), device)
    try:
        if auto is None:
            auto = run_case(folder, Case("auto", gguf=with_gguf), card_devices, 1, work, device, gguf_file)
        ran = [c.label for c in run_all if c.gguf == with_gguf
               and run_case(folder, c, card_devices, 1, work, device, gguf_file)["ok"]]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"card_gb": card_gb, "gguf": with_gguf, "auto": auto, "ran": ran if run_all else None,
            "planner_error_percent": planner_error_percent(auto.get("predicted_peak_bytes", 0),
                                                           auto.get("peak_reserved_bytes", 0))}


def fitting_placements(result: dict, card: dict) -> list[str]:
    """The measured placements whose peak fits the emulated ``card`` (all that ran there, with --emulate-all)."""
    if card.get("ran") is not None:
        return card["ran"]
    return [row["label"] for row in result["profiles"]
            if row["ok"] and ("[GGUF]" in row["label"]) == card["gguf"]
            and fits(row["peak_reserved_bytes"], card["card_gb"], 1024**3)]


def main(argv: list[str] | None = None) -> int:
    from results_md import write_section

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Folder for the JSON.")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md",
                        help="Markdown file whose section for this device is replaced.")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="Where the random-weight model (about 21 GB) is saved (default: the temp folder).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per placement after the warm-up.")
    parser.add_argument("--emulate-all", action="store_true",
                        help="On each emulated card, run every placement instead of judging by measured peaks.")
    parser.add_argument("--profiles", default="",
                        help="Only these profiles, comma separated (e.g. full,model-offload), for a shorter run.")
    parser.add_argument("--tiny", action="store_true", help="The demo architecture on the CPU: a smoke test.")
    parser.add_argument("--budget-s", type=float, default=None, metavar="S",
                        help="Start no step after S seconds (nor one the time left has no room for); the steps run "
                             "most important first, and the results are written after each (default: no budget).")
    parser.add_argument("--gguf", default="Q4_0", choices=("Q4_0", "Q8_0", ""),
                        help="Also measure the transformer written as this GGUF type (about a minute to write on "
                             "the full-size model; Q8_0 about twice that); '' skips it.")
    args = parser.parse_args(argv)
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        parser.error(f"--budget-s {args.budget_s:g}: give the seconds as a number from 0 up, or leave it out for "
                     "no budget")
    from zimage.hardware import configure_cuda_allocator

    configure_cuda_allocator(os.environ)  # as the server does, before the first CUDA allocation
    if not args.tiny:
        import torch

        if not torch.cuda.is_available():
            print("gpu_profiles: no CUDA GPU on this machine, nothing to measure (use --tiny for a CPU smoke run).")
            return 0
    started = time.perf_counter()
    written: list[Path] = []

    def save(result: dict) -> None:
        result["wall_s"] = time.perf_counter() - started
        slug = "".join(c if c.isalnum() else "-" for c in result["machine"]["device"].lower()).strip("-")
        args.out.mkdir(parents=True, exist_ok=True)
        json_path = args.out / f"gpu-{slug}-{result['date']}.json"
        json_path.write_text(json.dumps(result, indent=2))
        write_section(args.results_md, f"gpu-profiles {slug}", markdown(result))
        written[:] = [json_path]

    def time_left() -> float:
        return math.inf if args.budget_s is None else args.budget_s - (time.perf_counter() - started)

    result = run(args, save, time_left)
    save(result)
    print(markdown(result))
    print(f"\nwritten: {written[0]}, {args.results_md} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
