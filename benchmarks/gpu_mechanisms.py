#!/usr/bin/env python3
"""The mechanisms under the memory placements, measured one at a time on the full-size components (CUDA only).

``benchmarks/gpu_profiles.py`` measures whole placements through the service; this script measures the pieces
they are made of, so that the planner's time and peak models can be built from rates instead of guesses, and so that
a slow placement can be traced to its cause:

1. copy rates: pinned and pageable host-to-device, pageable device-to-host into a new host tensor (what
   ``module.to("cpu")`` does, as diffusers' model offload does after every component) and into a pinned one;
2. the text encoder (Qwen3-4B sized, random weights, 512 tokens as the pipeline pads them): resident, and streamed
   with diffusers' group offloading in each of its forms (block or leaf level, with a stream, with
   ``record_stream``);
3. the transformer (6.15B, random weights) one denoising step at 1024x1024: eager; regionally compiled, with the
   compile cost of the first size, of a second and a third size (does a new size stall a request?); with torchao's
   float8 dynamic activation and weight quantization (fp8 compute), eager and compiled, and how far its output
   moves from the bf16 one;
4. the VAE decode at 1024x1024;
5. the allocator: the ``full`` placement's stages (encode, 8 steps, decode) in a child process with and without
   ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: peak allocated and reserved bytes per stage, at 1024x1024
   and 2048x2048.

Each section is written to ``<out>/gpu-mechanisms-<device>-<date>.json`` as soon as it ends, and a section of
``benchmarks/RESULTS.md``; ``--budget-s`` starts no section the time left has no room for. ``--tiny`` runs the same
code on the demo architecture on the CPU (the sections that need CUDA say so): the smoke test that keeps it working.

    python benchmarks/gpu_mechanisms.py --budget-s 200 --out results/
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GIB = 1024**3
TEXT_TOKENS = 512
CAPTION_TOKENS = 68  # the caption of gpu_profiles.PROMPT with its chat template, as measured there
#: Sections in order, with the seconds each took on an H200 (a guess until measured), for --budget-s.
SECTION_COST_S = {"copy_rates": 10, "text_encoder": 60, "transformer": 120, "vae": 15, "allocator": 90}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(device: str, work: Callable[[], Any], repeats: int = 3, warm_up: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``repeats`` calls of ``work`` after ``warm_up`` calls, synchronized on ``device``."""
    for _ in range(warm_up):
        work()
    _sync(device)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        _sync(device)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs), runs


def copy_rates(device: str, nbytes: int) -> dict:
    """GB/s (1e9 bytes) of the copies placements use; each copy once to warm up, then the median of three."""
    import torch

    out: dict[str, Any] = {"bytes": nbytes}
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.fill_(1)  # touch every page: a fresh tensor's pages are not mapped yet
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for name, work in (
        ("pinned_h2d_gbps", lambda: target.copy_(pinned, non_blocking=True)),
        ("pageable_h2d_gbps", lambda: target.copy_(pageable)),
        ("pageable_d2h_new_gbps", lambda: target.to("cpu")),  # a new host tensor each time, as module.to("cpu")
        ("pageable_d2h_gbps", lambda: pageable.copy_(target)),
        ("pinned_d2h_gbps", lambda: pinned.copy_(target, non_blocking=True)),
    ):
        seconds, _ = timed(device, work)
        out[name] = nbytes / seconds / 1e9
    return out


def text_encoder_streaming(arch: Any, device: str, tokens: int) -> dict:
    """Seconds to encode ``tokens`` tokens with the text encoder resident and streamed by group offloading."""
    import torch
    from diffusers.hooks import apply_group_offloading
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(**{**arch.text_encoder, "vocab_size": arch.text_encoder["vocab_size"] or 1000})
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3Model(config).to(torch.bfloat16)
    host = {name: tensor.to("cpu") for name, tensor in model.state_dict().items()}
    # Non-persistent buffers (the rotary embedding's inverse frequencies) are not in the state dict.
    host_buffers = {name: buffer.to("cpu") for name, buffer in model.named_buffers() if name not in host}
    ids = torch.randint(0, config.vocab_size, (1, tokens), device=device)
    mask = torch.ones_like(ids)

    def encode(m: Any) -> Any:
        with torch.inference_mode():
            return m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    rows: dict[str, Any] = {}
    rows["resident"] = {"seconds": timed(device, lambda: encode(model))[0]}
    del model
    gc.collect()
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    variants = {
        "block, stream": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True),
        "block, stream, record_stream": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                                             record_stream=True),
        "leaf, stream": dict(offload_type="leaf_level", use_stream=True),
        "leaf, stream, record_stream": dict(offload_type="leaf_level", use_stream=True, record_stream=True),
        "block, no stream": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=False),
    }
    for name, kwargs in variants.items():
        if not device.startswith("cuda") and kwargs.get("use_stream"):
            rows[name] = {"error": "streams need CUDA"}
            continue
        try:
            with torch.device("meta"):
                streamed = Qwen3Model(config)
            streamed.load_state_dict(host, assign=True)
            for buffer_name, buffer in host_buffers.items():
                owner, _, leaf = buffer_name.rpartition(".")
                streamed.get_submodule(owner).register_buffer(leaf, buffer.clone(), persistent=False)
            started = time.perf_counter()
            apply_group_offloading(streamed, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                   **kwargs)
            setup_s = time.perf_counter() - started
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats(device)
            seconds, runs = timed(device, lambda: encode(streamed))
            row = {"seconds": seconds, "runs": runs, "setup_s": setup_s}
            if device.startswith("cuda"):
                row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            rows[name] = row
        except Exception as exc:  # noqa: BLE001 - a failed variant is a row
            rows[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        streamed = None
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    weights = sum(t.numel() * t.element_size() for t in host.values())
    return {"tokens": tokens, "weight_bytes": weights, "variants": rows}


def _transformer(arch: Any, device: str) -> Any:
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = ZImageTransformer2DModel(**arch.transformer)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.x_pad_token.fill_(1.0)
        model.cap_pad_token.fill_(1.0)
    return model.eval()


def _inputs(arch: Any, device: str, width: int, height: int) -> tuple:
    import torch

    generator = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(16, 1, height // 8, width // 8, generator=generator).to(device, torch.bfloat16)
    caption = torch.randn(CAPTION_TOKENS, arch.transformer["cap_feat_dim"], generator=generator).to(device,
                                                                                                    torch.bfloat16)
    return [latents], torch.tensor([0.5], device=device, dtype=torch.bfloat16), [caption]


def _step(model: Any, inputs: tuple) -> Any:
    import torch

    with torch.inference_mode():
        return model(*inputs, return_dict=False)[0][0]


def transformer_steps(arch: Any, device: str, sizes: list[tuple[int, int]], compile_sizes: bool) -> dict:
    """One denoising step's seconds: eager bf16, regionally compiled (with each size's compile cost), fp8 compute."""
    import torch

    out: dict[str, Any] = {"sizes": [list(s) for s in sizes]}
    model = _transformer(arch, device)
    first = _inputs(arch, device, *sizes[0])
    reference = _step(model, first).float()
    out["eager_step_s"] = timed(device, lambda: _step(model, first))[0]
    if compile_sizes:
        try:
            model.compile_repeated_blocks(fullgraph=True)
            compiles = []
            for width, height in sizes:
                inputs = _inputs(arch, device, width, height)
                started = time.perf_counter()
                _step(model, inputs)
                _sync(device)
                first_call_s = time.perf_counter() - started
                step_s = timed(device, lambda: _step(model, inputs), warm_up=0)[0]
                compiles.append({"size": [width, height], "first_call_s": first_call_s, "step_s": step_s})
            # Back to the first size: does it still hit the compiled graph?
            started = time.perf_counter()
            _step(model, first)
            _sync(device)
            compiles.append({"size": list(sizes[0]), "first_call_s": time.perf_counter() - started, "again": True})
            out["compiled"] = compiles
        except Exception as exc:  # noqa: BLE001
            out["compiled"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    out["fp8_compute"] = fp8_compute(arch, device, first, reference, compile_sizes)
    return out


def fp8_compute(arch: Any, device: str, inputs: tuple, reference: Any, compile_it: bool) -> dict:
    """torchao float8 dynamic activation + weight quantization (row-wise scales) of the transformer's linear layers:
    step seconds eager and compiled, and the output's distance from the bf16 one (relative L2)."""
    import torch

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as exc:
        return {"error": f"torchao not importable: {exc}"}
    if not device.startswith("cuda"):
        return {"error": "fp8 compute needs CUDA"}
    out: dict[str, Any] = {}
    try:
        model = _transformer(arch, device)
        started = time.perf_counter()
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
        out["quantize_s"] = time.perf_counter() - started
        out["weight_bytes_after"] = torch.cuda.memory_allocated(device)
        result = _step(model, inputs).float()
        out["relative_l2_vs_bf16"] = float((result - reference).norm() / reference.norm())
        out["eager_step_s"] = timed(device, lambda: _step(model, inputs))[0]
        if compile_it:
            model.compile_repeated_blocks(fullgraph=True)
            started = time.perf_counter()
            _step(model, inputs)
            _sync(device)
            out["compile_first_call_s"] = time.perf_counter() - started
            out["compiled_step_s"] = timed(device, lambda: _step(model, inputs), warm_up=0)[0]
            result = _step(model, inputs).float()
            out["compiled_relative_l2_vs_bf16"] = float((result - reference).norm() / reference.norm())
        del model
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    gc.collect()
    torch.cuda.empty_cache()
    return out


def vae_decode(arch: Any, device: str, width: int, height: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**arch.vae).to(torch.bfloat16).eval()
    latents = torch.randn(1, 16, height // 8, width // 8, device=device, dtype=torch.bfloat16)

    def decode() -> Any:
        with torch.inference_mode():
            return vae.decode(latents, return_dict=False)[0]

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    seconds, _ = timed(device, decode)
    row = {"size": [width, height], "seconds": seconds}
    if device.startswith("cuda"):
        row["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


def allocator_child(arch_name: str, device: str, sizes: list[tuple[int, int]]) -> dict:
    """Run in a child process: the full placement's stages, peak allocated/reserved bytes per stage."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    from zimage.architecture import PUBLISHED, TINY

    arch = PUBLISHED if arch_name == "published" else TINY
    torch.manual_seed(0)
    transformer = _transformer(arch, device)
    with torch.device(device):
        encoder = Qwen3Model(Qwen3Config(**{**arch.text_encoder, "vocab_size": arch.text_encoder["vocab_size"]
                                            or 1000})).to(torch.bfloat16).eval()
        vae = AutoencoderKL(**arch.vae).to(torch.bfloat16).eval()
    _sync(device)
    rows = {"weights_allocated_bytes": torch.cuda.memory_allocated(device),
            "weights_reserved_bytes": torch.cuda.memory_reserved(device), "sizes": []}
    ids = torch.randint(0, 1000, (1, TEXT_TOKENS), device=device)
    for width, height in sizes:
        stages = {}

        def stage(name: str, work: Callable[[], Any]) -> Any:
            torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            with torch.inference_mode():
                result = work()
            _sync(device)
            stages[name] = {"seconds": time.perf_counter() - started,
                            "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
                            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}
            return result

        stage("encode", lambda: encoder(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        output_hidden_states=True).hidden_states[-2])
        inputs = _inputs(arch, device, width, height)
        latents = stage("denoise", lambda: [transformer(*inputs, return_dict=False)[0][0] for _ in range(8)][-1])
        stage("decode", lambda: vae.decode(latents.transpose(0, 1).to(torch.bfloat16), return_dict=False)[0])
        rows["sizes"].append({"size": [width, height], "stages": stages})
    return rows


def allocator(arch_name: str, device: str, budget_left: Callable[[], float]) -> dict:
    """The child run with the default caching allocator and with expandable segments."""
    out = {}
    for name, conf in (("default", None), ("expandable_segments", "expandable_segments:True")):
        if budget_left() < 30:
            out[name] = {"error": "no time left"}
            continue
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if conf:
            env["PYTORCH_CUDA_ALLOC_CONF"] = conf
        sizes = "1024x1024,2048x2048" if arch_name == "published" else "256x256"
        completed = subprocess.run([sys.executable, __file__, "--allocator-child", arch_name, "--device", device,
                                    "--sizes", sizes], env=env, capture_output=True, text=True,
                                   timeout=max(30, budget_left()))
        try:
            out[name] = json.loads(completed.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[name] = {"error": (completed.stderr or completed.stdout)[-400:]}
    return out


def markdown(result: dict) -> str:
    lines = [f"### Placement mechanisms, {result['architecture']}, {result['date']}", "",
             f"Device: **{result['device']}**, torch {result['torch']}, diffusers {result['diffusers']}. Random "
             "weights; timings are medians of 3 after a warm-up.", ""]
    not_run = [name for name in ("copy_rates", "text_encoder", "transformer", "vae", "allocator")
               if isinstance(result.get(name), dict) and set(result[name]) == {"error"}]
    if not_run:
        lines += ["Not measured: " + "; ".join(f"{name} ({result[name]['error']})" for name in not_run) + ".", ""]
    copies = result.get("copy_rates")
    if copies and "error" not in copies:
        lines += ["| copy (GB/s) | pinned H2D | pageable H2D | pageable D2H, new tensor | pageable D2H | pinned D2H |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {copies['bytes'] / GIB:.0f} GiB | {copies['pinned_h2d_gbps']:.1f} | "
                  f"{copies['pageable_h2d_gbps']:.1f} | {copies['pageable_d2h_new_gbps']:.1f} | "
                  f"{copies['pageable_d2h_gbps']:.1f} | {copies['pinned_d2h_gbps']:.1f} |", ""]
    encoder = result.get("text_encoder")
    if encoder and "variants" in encoder:
        lines += [f"Text encoder, {encoder['tokens']} tokens, {encoder['weight_bytes'] / 1e9:.2f} GB of weights:", "",
                  "| placement | seconds | effective GB/s | peak allocated | setup |", "| --- | --- | --- | --- | --- |"]
        for name, row in encoder["variants"].items():
            if "error" in row:
                lines.append(f"| {name} | failed: {row['error'][:80]} | | | |")
                continue
            gbps = encoder["weight_bytes"] / row["seconds"] / 1e9 if name != "resident" else float("nan")
            peak = f"{row['peak_allocated_bytes'] / GIB:.2f} GiB" if "peak_allocated_bytes" in row else "-"
            setup = f"{row['setup_s']:.1f} s" if "setup_s" in row else "-"
            lines.append(f"| {name} | {row['seconds']:.3f} | {'-' if math.isnan(gbps) else f'{gbps:.1f}'} | {peak} | "
                         f"{setup} |")
        lines.append("")
    steps = result.get("transformer")
    if steps and "eager_step_s" in steps:
        lines += [f"Transformer, one step at {steps['sizes'][0][0]}x{steps['sizes'][0][1]}: eager "
                  f"{steps['eager_step_s'] * 1000:.0f} ms.", ""]
        compiled = steps.get("compiled")
        if isinstance(compiled, list):
            lines += ["| compiled, size | first call (compile) | step |", "| --- | --- | --- |"]
            for row in compiled:
                step = f"{row['step_s'] * 1000:.0f} ms" if "step_s" in row else "-"
                lines.append(f"| {row['size'][0]}x{row['size'][1]}{' (again)' if row.get('again') else ''} | "
                             f"{row['first_call_s']:.1f} s | {step} |")
            lines.append("")
        elif compiled:
            lines += [f"Compiled: failed: {compiled['error']}", ""]
        fp8 = steps.get("fp8_compute") or {}
        if "error" in fp8:
            lines += [f"fp8 compute (torchao): {fp8['error']}", ""]
        elif fp8:
            lines += [f"fp8 compute (torchao float8 dynamic, row-wise): eager step {fp8['eager_step_s'] * 1000:.0f} ms"
                      + (f", compiled {fp8['compiled_step_s'] * 1000:.0f} ms (first call "
                         f"{fp8['compile_first_call_s']:.1f} s)" if "compiled_step_s" in fp8 else "")
                      + f"; output {fp8['relative_l2_vs_bf16']:.3f} relative L2 from bf16.", ""]
    vae = result.get("vae")
    if vae and "seconds" in vae:
        lines += [f"VAE decode {vae['size'][0]}x{vae['size'][1]}: {vae['seconds'] * 1000:.0f} ms, peak "
                  f"{vae.get('peak_allocated_bytes', 0) / GIB:.2f} GiB allocated.", ""]
    alloc = result.get("allocator")
    if alloc and "error" not in alloc:
        lines += ["| allocator | size | stage | seconds | peak allocated | peak reserved |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, run in alloc.items():
            if "error" in run:
                lines.append(f"| {name} | failed: {run['error'][-100:]} | | | | |")
                continue
            for size in run["sizes"]:
                for stage, row in size["stages"].items():
                    lines.append(f"| {name} | {size['size'][0]}x{size['size'][1]} | {stage} | {row['seconds']:.3f} | "
                                 f"{row['peak_allocated_bytes'] / GIB:.2f} GiB | "
                                 f"{row['peak_reserved_bytes'] / GIB:.2f} GiB |")
        lines.append("")
    if result.get("skipped"):
        lines += ["Not measured: " + ", ".join(result["skipped"]) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--results-md", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--tiny", action="store_true", help="The demo architecture on the CPU: a smoke test.")
    parser.add_argument("--budget-s", type=float, default=math.inf)
    parser.add_argument("--no-compile", action="store_true", help="Leave out the compiled steps.")
    parser.add_argument("--allocator-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1024x1024", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allocator_child:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
        print(json.dumps(allocator_child(args.allocator_child, args.device, sizes)))
        return 0
    import diffusers
    import torch

    from results_md import write_section
    from zimage.architecture import PUBLISHED, TINY

    started = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        print("gpu_mechanisms: no CUDA GPU on this machine (use --tiny for a CPU smoke run).")
        return 0
    device = "cuda:0" if cuda else "cpu"
    arch = PUBLISHED if cuda else TINY
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "architecture": arch.name,
                              "device": torch.cuda.get_device_name(0) if cuda else "CPU (tiny smoke run)",
                              "torch": torch.__version__, "diffusers": diffusers.__version__, "skipped": []}
    slug = "".join(c if c.isalnum() else "-" for c in result["device"].lower()).strip("-")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    def save() -> None:
        result["wall_s"] = time.perf_counter() - started
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"gpu-mechanisms-{slug}-{result['date']}.json").write_text(json.dumps(result, indent=2))
        write_section(args.results_md, f"gpu-mechanisms {slug}", markdown(result))

    sizes = [(1024, 1024), (1024, 768), (1280, 720)] if cuda else [(256, 256), (256, 192)]
    sections: dict[str, Callable[[], Any]] = {
        "copy_rates": lambda: copy_rates(device, GIB) if cuda else {"error": "needs CUDA"},
        "text_encoder": lambda: text_encoder_streaming(arch, device, TEXT_TOKENS if cuda else 32),
        "transformer": lambda: transformer_steps(arch, device, sizes, compile_sizes=cuda and not args.no_compile),
        "vae": lambda: vae_decode(arch, device, *sizes[0]),
        "allocator": lambda: allocator("published", device, left) if cuda else {"error": "needs CUDA"},
    }
    for name, work in sections.items():
        if left() < SECTION_COST_S[name] * (0.2 if args.tiny else 1):
            result["skipped"].append(f"{name} (time budget)")
            continue
        print(f"{name} ...", file=sys.stderr)
        section_started = time.perf_counter()
        try:
            result[name] = work()
        except Exception as exc:  # noqa: BLE001 - a failed section is recorded, the next one runs
            result[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        result.setdefault("section_s", {})[name] = time.perf_counter() - section_started
        save()
    save()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
