"""Command line: ``python -m zimage generate | plan | make-demo | loras | make-demo-lora | serve-ray``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ModelNotFoundError, ZImageError, shown
from .planner import GIB, PlanError, RequestSize
from .settings import SettingsError, add_settings_arguments, path_length_problem, settings_from_args

_ENGINE_SETTINGS = ("model", "demo", "dtype", "device", "memory_profile", "memory_options", "auto_fp8",
                    "reserve_mb", "outputs_dir", "data_dir", "log_prompts", "max_upload_mb", "recovery_fp8",
                    "lora_dir", "controlnet", "model_family", "prompt_cache_mb", "transformer_file",
                    "attention_backend", "compile")
_LORA_SETTINGS = ("model", "demo", "data_dir", "lora_dir")
_PLAN_SETTINGS = ("model", "demo", "dtype", "device", "memory_profile", "memory_options", "auto_fp8",
                  "reserve_mb", "data_dir", "controlnet", "transformer_file", "compile")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its three subcommands."""
    from .service import DEFAULT_SIDE_PX, DEFAULT_STEPS, MAX_IMAGES

    parser = argparse.ArgumentParser(prog="python -m zimage", description="Z-Image-Turbo server tools.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="Generate image(s) from a prompt and print the saved path(s).",
                         description="Generate image(s) from a prompt; prints one saved PNG path per line.")
    gen.add_argument("prompt", help="What to draw (Chinese and English both work).")
    gen.add_argument("--seed", type=int, default=None, help="Seed for repeatable images (default: random).")
    gen.add_argument("--width", type=int, default=DEFAULT_SIDE_PX, help="Width in pixels, multiple of 16.")
    gen.add_argument("--height", type=int, default=DEFAULT_SIDE_PX, help="Height in pixels, multiple of 16.")
    gen.add_argument("--steps", type=int, default=None,
                     help=f"Denoising steps (default: the model's, {DEFAULT_STEPS} for Turbo, 28 for Z-Image base).")
    gen.add_argument("--guidance", type=float, default=None,
                     help="Guidance scale (default: the model's, 0 for Turbo, 4 for Z-Image base; > 0 runs "
                          "classifier-free guidance at twice the cost).")
    gen.add_argument("--negative-prompt", default="", metavar="TEXT",
                     help="What the image should not show; used only with guidance > 0.")
    gen.add_argument("--num-images", type=int, default=1, help=f"Images to generate, 1-{MAX_IMAGES}.")
    gen.add_argument("--image", type=Path, help="Image-to-image: start from this PNG/JPEG/WebP (resized to --width x "
                                               "--height if it differs).")
    gen.add_argument("--mask", type=Path, help="Inpainting: repaint the white area of this mask (needs --image).")
    gen.add_argument("--strength", type=float, default=None,
                     help="How much of the input is repainted, (0, 1] (default 0.6 image-to-image, 1.0 inpainting).")
    gen.add_argument("--control-image", type=Path, metavar="C.png",
                     help="ControlNet: steer by this control image (a pose, edge or depth map; resized to --width x "
                          "--height). With --image and --mask: ControlNet inpainting. Needs a ControlNet "
                          "(--controlnet; --demo has one).")
    gen.add_argument("--controlnet-scale", type=float, default=None, metavar="S",
                     help="How strongly the control image steers, 0 to 2 (default 0.75).")
    gen.add_argument("--lora", action="append", type=_lora_arg, default=None, metavar="NAME[:WEIGHT]",
                     help="A LoRA from the LoRA folder (its file name without .safetensors) and its weight, -2 to 2 "
                          "(default 1); repeat for up to 4. `python -m zimage loras` lists them.")
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="Save the (first) image under this file name.")
    where.add_argument("--out-dir", type=Path, help="Save into this folder (default: the outputs folder).")
    gen.add_argument("--quiet", action="store_true", help="No progress on stderr.")
    add_settings_arguments(gen, _ENGINE_SETTINGS)

    plan = sub.add_parser("plan", help="Print the memory plan for this machine or a hypothetical one.",
                          description="Print the memory plan. Works without a GPU and without weights "
                                      "(published sizes are used when the model is not on disk).")
    plan.add_argument("--vram-gb", type=float, help="Plan for a hypothetical GPU of this size (0: CPU only).")
    plan.add_argument("--gpu-name", metavar="NAME",
                      help="Plan for a known card (e.g. 'RTX 4090', '4060 Ti 16GB', H100): its memory (unless "
                           "--vram-gb) and spec-sheet rates for the time model; `--gpu-name list` lists them.")
    plan.add_argument("--tflops", type=float, metavar="TFLOPS",
                      help="With --vram-gb: the card's achieved bf16 matmul rate, TFLOP/s (overrides --gpu-name's).")
    plan.add_argument("--pcie-gbps", type=float, metavar="GBPS",
                      help="With --vram-gb: its achieved host-to-device copy rate from pinned memory, GB/s, which "
                           "streamed offloading reaches (overrides --gpu-name's).")
    plan.add_argument("--pageable-gbps", type=float, metavar="GBPS",
                      help="With --vram-gb: the host's pageable round-trip rate, GB/s: a byte copied to the GPU from "
                           "pageable memory and back into a new host tensor, as model offload does (the server's "
                           "probe measures it; default 1.19, measured on an H200's host).")
    plan.add_argument("--memory-gbps", type=float, metavar="GBPS",
                      help="With --vram-gb: its achieved memory bandwidth, GB/s, read plus written (prices fp8 and "
                           "GGUF weights, cast at every step; overrides --gpu-name's).")
    plan.add_argument("--gguf-quant", metavar="TYPE",
                      help="Plan as if --transformer-file were a GGUF transformer of this type (Q8_0, Q6_K, Q5_K, "
                           "Q4_K, Q4_0, ...), its size estimated from the type's bits per weight: what a download "
                           "would buy before making it.")
    plan.add_argument("--gpus", type=int, help="With --vram-gb or --gpu-name: number of such GPUs (default 1).")
    plan.add_argument("--ram-gb", type=float, help="With --vram-gb or --gpu-name: system RAM (default 64).")
    plan.add_argument("--width", type=int, default=DEFAULT_SIDE_PX, help="Image width to plan for, in pixels.")
    plan.add_argument("--height", type=int, default=DEFAULT_SIDE_PX, help="Image height to plan for, in pixels.")
    plan.add_argument("--num-images", type=int, default=1, help="Images per request to plan for.")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    add_settings_arguments(plan, _PLAN_SETTINGS)

    demo = sub.add_parser("make-demo", help="Write the tiny demo model as a diffusers folder.")
    demo.add_argument("dir", type=Path, help="Folder to create.")
    demo.add_argument("--gguf", choices=("Q8_0", "Q4_0"), default=None,
                      help="Also write DIR/transformer.gguf: the demo transformer quantized, in the key layout of "
                           "published Z-Image GGUF files (try it with --model DIR --transformer-file "
                           "DIR/transformer.gguf).")

    loras = sub.add_parser("loras", help="List the LoRA folder: name, size, format and whether each fits this model.",
                           description="List the LoRA files (.safetensors; pickles are listed as refused) and whether "
                                       "each fits the configured model, reading only file headers.")
    loras.add_argument("--json", action="store_true", help="Print a JSON list of {name, size_bytes, fits, problem, "
                                                           "format}.")
    add_settings_arguments(loras, _LORA_SETTINGS)

    demo_lora = sub.add_parser("make-demo-lora", help="Write a tiny random LoRA for the demo model.",
                               description="Write a random LoRA for the demo model's transformer in one of the key "
                                           "formats the server reads; the same seed gives the same file.")
    demo_lora.add_argument("file", type=Path, help="File to create, ending in .safetensors (e.g. in the LoRA folder).")
    demo_lora.add_argument("--format", required=True, choices=("peft", "comfyui", "kohya"),
                           help="Key format: peft (diffusers), comfyui (diffusion_model. prefix) or kohya "
                                "(lora_unet_ with alpha).")
    demo_lora.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")

    from .serve_ray import add_parser as add_serve_ray_parser  # Ray itself is imported only when serve-ray runs

    add_serve_ray_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2: bad settings, 1: failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .hardware import configure_cuda_allocator

    configure_cuda_allocator(os.environ)  # before the first CUDA allocation (generate, serve-ray's replicas)
    try:
        if args.command == "make-demo":
            return _make_demo(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "loras":
            return _loras(args)
        if args.command == "make-demo-lora":
            return _make_demo_lora(args)
        if args.command == "serve-ray":
            from .serve_ray import serve_main

            return serve_main(args)
        return _generate(args)
    except (SettingsError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ZImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`plan | head`): not an error of ours. Point stdout at /dev/null so that Python's own
        # flush at exit does not fail again (the recipe of Python's signal documentation).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # Any file problem no check above foresaw: one line with the file, never a traceback.
        where = f" ({shown(str(exc.filename), 200)})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _make_demo(args: argparse.Namespace) -> int:
    from .demo_model import build_demo_model
    from .logs import configure_logging

    configure_logging("WARNING")  # also silences the libraries' "Writing model shards" bars
    problem = path_length_problem(str(args.dir))
    if problem:
        print(f"error: {shown(str(args.dir))} {problem}: choose a shorter name.", file=sys.stderr)
        return 2
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        what = "is not empty" if args.dir.is_dir() else "is a file"
        print(f"error: {args.dir} exists and {what}: choose a new folder.", file=sys.stderr)
        return 2
    try:
        args.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: {args.dir} cannot be created ({exc.strerror}): choose a folder you can write to.",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    build_demo_model(args.dir)
    print(f"demo model written to {args.dir} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(args.dir)
    if args.gguf:
        import torch
        from diffusers import ZImageTransformer2DModel

        from .gguf_files import write_transformer_gguf

        transformer = ZImageTransformer2DModel.from_pretrained(args.dir / "transformer", dtype=torch.float32)
        size = write_transformer_gguf(transformer, args.dir / "transformer.gguf", args.gguf)
        print(f"{args.gguf} transformer written ({size} bytes of tensors)", file=sys.stderr)
        print(args.dir / "transformer.gguf")
    return 0


def _lora_arg(text: str) -> tuple[str, float]:
    """``--lora NAME[:WEIGHT]``; bad syntax is argparse's error (exit 2); the range is checked with the request."""
    from .lora import parse_lora_arg

    try:
        return parse_lora_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _loras(args: argparse.Namespace) -> int:
    from .logs import quiet_libraries
    from .service import GenerationService

    quiet_libraries()  # nothing is logged worth a handler; only the libraries' own chatter is silenced
    settings = settings_from_args(args)
    files = GenerationService(settings).list_loras()  # judged against the configured model; nothing is loaded
    if args.json:
        print(json.dumps([item.info() for item in files], indent=2, ensure_ascii=False))
        return 0
    if not files:
        folder = settings.lora_folder
        if folder.exists() and not folder.is_dir():
            print(f"error: the LoRA folder {folder} is a file, not a folder: set --lora-dir (ZIMAGE_LORA_DIR) to a "
                  "folder.", file=sys.stderr)
            return 2
        where = f"{folder} does not exist yet" if not folder.exists() else f"no LoRA files in {folder}"
        print(f"{where}: put .safetensors LoRAs there (or set --lora-dir / ZIMAGE_LORA_DIR).", file=sys.stderr)
        return 0
    width = max(len(item.name) for item in files)
    print(f"{'NAME':<{width}}  {'SIZE':>9}  {'FORMAT':<8}  FITS")
    for item in files:
        fits = "yes" if item.fits else f"no: {item.problem}"
        print(f"{item.name:<{width}}  {_size_text(item.size_bytes):>9}  {item.format:<8}  {fits}")
    return 0


def _size_text(size_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


def _make_demo_lora(args: argparse.Namespace) -> int:
    from .lora import SAFETENSORS_SUFFIX, write_demo_lora

    if args.file.suffix != SAFETENSORS_SUFFIX:
        print(f"error: {args.file} does not end in {SAFETENSORS_SUFFIX}: the server reads only .safetensors LoRAs.",
              file=sys.stderr)
        return 2
    problem = path_length_problem(str(args.file))
    if problem:
        print(f"error: {shown(str(args.file))} {problem}: choose a shorter name.", file=sys.stderr)
        return 2
    if args.file.exists():
        print(f"error: {args.file} exists: choose a new file name.", file=sys.stderr)
        return 2
    try:
        args.file.parent.mkdir(parents=True, exist_ok=True)  # e.g. the default LoRA folder on a fresh machine
        write_demo_lora(args.file, args.format, args.seed)
    except OSError as exc:
        print(f"error: {args.file} cannot be written ({exc.strerror}): choose another place.", file=sys.stderr)
        return 2
    print(args.file)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .loader import component_sizes, plan_for, resolve_controlnet_source, resolve_model_source
    from .planner import hypothetical_devices

    settings = settings_from_args(args)
    if args.gpu_name == "list":
        from .timing import KNOWN_GPUS

        if args.json:
            print(json.dumps([{"name": spec.name, "memory_gb": spec.memory_gb,
                               "dense_bf16_tflops": spec.dense_bf16_tflops, "memory_gbps": spec.memory_gbps,
                               "pcie_gen": spec.pcie_gen, "pcie_lanes": spec.pcie_lanes,
                               "pageable_gbps": spec.throughput().pageable_gbps,
                               "compute_capability": list(spec.compute_capability), "source": spec.source}
                              for spec in KNOWN_GPUS], indent=2))
            return 0
        for spec in KNOWN_GPUS:
            print(f"{spec.name:<18} {spec.memory_gb:>4g} GB  {spec.dense_bf16_tflops:>7g} TFLOPS dense bf16  "
                  f"{spec.memory_gbps:>6g} GB/s  PCIe {spec.pcie_gen}.0 x{spec.pcie_lanes}  pageable "
                  f"{spec.throughput().pageable_gbps:g} GB/s  "
                  f"sm {spec.compute_capability[0]}.{spec.compute_capability[1]}"
                  f"  ({spec.source}; spec sheet, not measured)")
        return 0
    _check_plan_args(args)
    from .preflight import transformer_file_problem

    problem = transformer_file_problem(settings)
    if problem:
        raise SettingsError(problem)
    throughput = _plan_throughput(args)
    if args.vram_gb is not None or args.gpu_name is not None:
        from .timing import find_gpu

        card = find_gpu(args.gpu_name) if args.gpu_name is not None else None  # checked by _plan_throughput
        vram_gb = args.vram_gb if args.vram_gb is not None else card.memory_gb
        devices = hypothetical_devices(vram_gb, args.gpus or 1, args.ram_gb or 64.0, throughput=throughput,
                                       name=card.name if card is not None else None,
                                       compute_capability=card.compute_capability if card is not None else None)
    else:
        from .hardware import probe_devices

        devices = probe_devices(measure_throughput=True)
    if settings.demo:
        source = resolve_model_source(settings)
    else:
        # Never download for a plan: real headers if the model is on disk, else published sizes.
        from .loader import ModelSource
        from .model_files import find_local_model_folder

        source = ModelSource(settings.model, settings.model, find_local_model_folder(settings.model),
                             transformer_file=settings.transformer_file)
    # With a ControlNet its own weights count too (resident under full; for its requests under offload).
    try:
        sizes = component_sizes(source, resolve_controlnet_source(settings, source))
    except ModelNotFoundError as exc:
        if settings.transformer_file is None:
            raise
        raise SettingsError(str(exc)) from None  # a GGUF file that is not this model's: a bad setting
    if args.gguf_quant is not None:
        from dataclasses import replace

        from .gguf_files import estimated_gguf_stats

        if settings.transformer_file is not None:
            raise SettingsError("--gguf-quant estimates a GGUF file that is not there; --transformer-file gives one "
                                "that is: use one of them.")
        try:
            transformer = estimated_gguf_stats(sizes.transformer, args.gguf_quant)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        sizes = replace(sizes, transformer=transformer,
                        source=f"{sizes.source}; transformer as GGUF {args.gguf_quant} (estimated)")
    request = RequestSize(args.width, args.height, args.num_images)
    plan = plan_for(settings, devices, sizes, request)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    machine = ", ".join(f"{g.name} ({g.total_bytes / GIB:.3g} GiB, {g.free_bytes / GIB:.1f} free)"
                        for g in devices.gpus) or "no CUDA GPU"
    print(f"machine:   {machine}; RAM {devices.ram_total_bytes / GIB:.0f} GiB")
    print(f"sizes:     {sizes.source}")
    print(f"request:   {request.width}x{request.height}, {request.num_images} image(s)")
    print(f"plan:      {plan.describe()}")
    if plan.profile == "cpu":
        print("peak:      no GPU memory: everything is in RAM")
    else:
        print(f"peak:      {plan.predicted_peak_bytes / GIB:.1f} GiB predicted, {plan.budget_bytes / GIB:.1f} GiB usable "
              f"({plan.allocator} allocator)")
    print(f"reason:    {plan.reason}")
    if plan.stages is not None:
        st = plan.stages
        print(f"time:      {plan.predicted_seconds:.2f} s per image predicted: encode {st.encode:.2f}, denoise "
              f"{st.denoise:.2f}, decode {st.decode:.2f}, transfers {st.transfers:.2f}, casts {st.casts:.2f} s"
              + (" (compiled)" if plan.compiled else ""))
    if plan.throughput is not None and plan.profile != "cpu":
        print(f"rates:     {plan.throughput.bf16_tflops:.1f} TFLOP/s bf16, {plan.throughput.h2d_gbps:.1f} GB/s "
              f"host-to-device pinned, {plan.throughput.pageable_gbps:.2f} GB/s pageable round trip, "
              f"{plan.throughput.memory_gbps:.0f} GB/s memory ({plan.throughput.source})")
    for warning in plan.warnings:
        print(f"warning:   {warning}")
    if plan.candidates:
        print()
        print(ranked_table(plan))
    return 0


#: Bounds of a hypothetical machine for ``plan`` (beyond any card or server that exists; they keep the arithmetic finite).
MAX_PLAN_VRAM_GB = 1024
MAX_PLAN_GPUS = 64
MAX_PLAN_RAM_GB = 65536
#: Rates ``plan`` accepts (far beyond any card at both ends: they keep the predicted seconds finite and readable).
PLAN_RATE_BOUNDS = {"tflops": (0.1, 100_000.0), "pcie_gbps": (0.1, 10_000.0), "memory_gbps": (1.0, 100_000.0),
                    "pageable_gbps": (0.01, 10_000.0)}


def _check_plan_args(args: argparse.Namespace) -> None:
    """Refuse a hypothetical machine or request that cannot be planned, naming the value and what is allowed.
    Raises SettingsError."""
    import math

    from .errors import ValidationError
    from .service import GenerationRequest, validate_request

    for name in ("vram_gb", "ram_gb", "tflops", "pcie_gbps", "memory_gbps"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise SettingsError(f"--{name.replace('_', '-')}={value} must be a finite number.")
    if args.vram_gb is not None and not 0 <= args.vram_gb <= MAX_PLAN_VRAM_GB:
        raise SettingsError(f"--vram-gb={args.vram_gb:g} is out of range: use 0 (no GPU) to {MAX_PLAN_VRAM_GB} GB.")
    if (args.gpus is not None or args.ram_gb is not None) and args.vram_gb is None and args.gpu_name is None:
        raise SettingsError("--gpus and --ram-gb describe a hypothetical machine (this one is probed): add --vram-gb N "
                            "or --gpu-name NAME.")
    if args.gpus is not None and not 1 <= args.gpus <= MAX_PLAN_GPUS:
        raise SettingsError(f"--gpus={args.gpus} is out of range: use 1 to {MAX_PLAN_GPUS}.")
    if args.ram_gb is not None and not 0 < args.ram_gb <= MAX_PLAN_RAM_GB:
        raise SettingsError(f"--ram-gb={args.ram_gb:g} is out of range: use more than 0, up to {MAX_PLAN_RAM_GB} GB.")
    try:  # the same request rules as generate and the API
        validate_request(GenerationRequest(prompt="plan", width=args.width, height=args.height,
                                           num_images=args.num_images))
    except ValidationError as exc:
        raise SettingsError(str(exc)) from None


def _plan_throughput(args: argparse.Namespace):
    """The rates for a hypothetical card: --tflops/--pcie-gbps/--memory-gbps over the --gpu-name's spec sheet (else
    over the planner's assumed default for those not given), or the spec sheet alone, or None (the planner's assumed
    default). Raises SettingsError for a bad value or an unknown card."""
    from .planner import DEFAULT_THROUGHPUT
    from .timing import Throughput, find_gpu

    flags = ("tflops", "pcie_gbps", "memory_gbps", "pageable_gbps")
    given = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    for name, value in given.items():
        low, high = PLAN_RATE_BOUNDS[name]
        if not low <= value <= high:
            raise SettingsError(f"--{name.replace('_', '-')}={value:g} is out of range: use {low:g} to {high:g} "
                                f"({'TFLOP/s' if name == 'tflops' else 'GB/s'}).")
    if given and args.vram_gb is None and args.gpu_name is None:
        raise SettingsError("--tflops, --pcie-gbps, --memory-gbps and --pageable-gbps describe a hypothetical card: "
                            "add --vram-gb N (or --gpu-name).")
    spec = None
    if args.gpu_name is not None:
        try:
            spec = find_gpu(args.gpu_name).throughput()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    if not given:
        return spec
    base = spec or DEFAULT_THROUGHPUT
    over = f" over {base.source}" if len(given) < len(flags) else ""
    return Throughput(bf16_tflops=given.get("tflops", base.bf16_tflops), h2d_gbps=given.get("pcie_gbps", base.h2d_gbps),
                      memory_gbps=given.get("memory_gbps", base.memory_gbps),
                      pageable_gbps=given.get("pageable_gbps", base.pageable_gbps),
                      source="given on the command line" + over)


def ranked_table(plan) -> str:
    """The candidates the planner weighed, fastest first: placement, predicted peak, s/image, GB moved per image."""
    rows = [("placement", "peak", "s/image", "GB moved/image", "")]
    chosen = (plan.profile, plan.options)
    fits = {(c.profile, c.options): c.fits for c in plan.candidates}
    for c in plan.candidates:
        untiled = tuple(o for o in c.options if o != "vae-tiling")
        if untiled != c.options and fits.get((c.profile, untiled)) == c.fits and (c.profile, c.options) != chosen:
            continue  # tiling changes nothing here: the row without it says it all

        mark = ("<- chosen" + ("" if c.fits else ", does not fit") if (c.profile, c.options) == chosen
                else "" if c.fits else "does not fit")
        if c.lossy and not mark:
            mark = "lossy"
        rows.append((c.describe(), f"{c.predicted_peak_bytes / GIB:.1f} GiB", f"{c.predicted_seconds:.2f}",
                     f"{c.bytes_moved_per_image / 1e9:.1f}", mark))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}".rstrip()
                     for r in rows)


def _read_inputs(args: argparse.Namespace, settings) -> tuple:
    """The --image, --mask and --control-image files, read safely and fitted to the requested size;
    (image, mask, control image, inputs, notes). ``inputs`` holds (file name, sha256, role) for the PNG metadata."""
    from .errors import ValidationError
    from .uploads import prepare_inputs

    if args.mask is not None and args.image is None:
        raise ValidationError("--mask needs --image (the picture whose white-masked area is repainted).")
    if args.image is None and args.control_image is None:
        return None, None, None, (), []

    def data(path: Path | None) -> tuple[bytes, str] | None:
        if path is None:
            return None
        try:
            return path.read_bytes(), path.name
        except OSError as exc:
            raise ValidationError(f"{path} cannot be read ({exc.strerror}): check the path.") from None

    read = prepare_inputs(args.width, args.height, max_bytes=settings.max_upload_mb * 2**20, image=data(args.image),
                          mask=data(args.mask), control_image=data(args.control_image))
    return (read.fields.get("image"), read.fields.get("mask"), read.fields.get("control_image"), read.inputs,
            list(read.notes))


def _generate(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .errors import ValidationError
    from .service import GenerationRequest, GenerationService, validate_request
    from .storage import OutputStore

    configure_logging("WARNING")
    overrides = {}
    if args.out_dir is not None:
        overrides["outputs_dir"] = args.out_dir
    elif args.out is not None:
        overrides["outputs_dir"] = args.out.parent if str(args.out.parent) else Path(".")
    settings = settings_from_args(args, **overrides)
    service = GenerationService(settings, store=OutputStore(settings.outputs_dir))
    # Before the model loads, bad input fails fast (exit 2): the files, the request's values, then the LoRAs
    # (missing, or made for another model). The service checks the values again at submit.
    try:
        image, mask, control, inputs, notes = _read_inputs(args, settings)
        if control is not None and not settings.controlnet_choice:
            raise ValidationError("--control-image needs a ControlNet: add --controlnet ID_OR_PATH (e.g. "
                                  "alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1; --demo has its own).")
        request = GenerationRequest(prompt=args.prompt, width=args.width, height=args.height, steps=args.steps,
                                    guidance_scale=args.guidance, seed=args.seed, num_images=args.num_images,
                                    image=image, mask=mask, strength=args.strength, inputs=inputs,
                                    loras=tuple(args.lora or ()), negative_prompt=args.negative_prompt,
                                    control_image=control, controlnet_conditioning_scale=args.controlnet_scale)
        checked = validate_request(request, defaults=service.defaults)
        if args.lora:
            service.check_loras(checked.loras)
    except ValidationError as exc:
        raise SettingsError(str(exc)) from None
    from .preflight import setup_problem

    problem = setup_problem(settings)  # a bad GGUF file, a missing attention kernel: before the slow load
    if problem:
        raise SettingsError(problem)
    if not args.quiet:
        print(f"loading {settings.model_source} ...", file=sys.stderr)
    service.load()
    if not args.quiet:
        print(f"memory plan: {service.plan.describe()} ({service.plan.reason})", file=sys.stderr)
        if args.steps is None or args.guidance is None:
            defaults = service.defaults
            print(f"defaults of {defaults.label}: {defaults.steps} steps, guidance {defaults.guidance_scale:g} "
                  f"({defaults.reason})", file=sys.stderr)

    shown: list[str] = []

    def progress(state) -> None:
        """One line per stage on stderr; the denoising line is redrawn in place with a bar."""
        if args.quiet or state.final:
            return
        if state.stage == "denoising" and state.step:
            bar = "#" * (20 * state.step // state.total)
            end = "\n" if state.step == state.total else ""
            print(f"\rstep {state.step:>2}/{state.total} [{bar:<20}]", end=end, file=sys.stderr, flush=True)
            return
        text = state.describe()
        if state.stage != "denoising" and (not shown or shown[-1] != text):
            shown.append(text)
            print(text, file=sys.stderr, flush=True)

    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    job = service.submit(request, on_progress=progress)
    try:
        result = job.result()
    except KeyboardInterrupt:
        job.cancel("interrupted")
        raise
    finally:
        # Let the GPU worker leave torch before the interpreter exits: exiting while that thread is inside a
        # torch call aborts the process (SIGABRT) instead of exiting with the right status.
        service.close()
    paths = list(result.paths)
    if args.out is not None:
        targets = [args.out] + [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
                                for i in range(1, len(paths))]
        for source, target in zip(paths, targets):
            os.replace(source, target)
        paths = targets
    for warning in result.warnings + result.recoveries:
        print(f"note: {warning}", file=sys.stderr)
    if not args.quiet:
        print(f"seed {result.seed}, {result.timings['generate_s']:.2f} s on {result.plan.describe()}",
              file=sys.stderr)
    for path in paths:
        print(path)
    return 0
