"""Command line: ``python -m zimage generate | plan | make-demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import ZImageError
from .planner import GIB, PlanError, RequestSize
from .settings import SettingsError, add_settings_arguments, settings_from_args

_ENGINE_SETTINGS = ("model", "demo", "dtype", "device", "memory_profile", "memory_options", "auto_fp8",
                    "reserve_mb", "outputs_dir", "data_dir", "log_prompts", "max_upload_mb", "recovery_fp8")
_PLAN_SETTINGS = ("model", "demo", "dtype", "device", "memory_profile", "memory_options", "auto_fp8",
                  "reserve_mb", "data_dir")


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
    gen.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"Denoising steps (default {DEFAULT_STEPS}).")
    gen.add_argument("--guidance", type=float, default=0.0, help="Guidance scale (Turbo: 0).")
    gen.add_argument("--num-images", type=int, default=1, help=f"Images to generate, 1-{MAX_IMAGES}.")
    gen.add_argument("--image", type=Path, help="Image-to-image: start from this PNG/JPEG/WebP (resized to --width x "
                                               "--height if it differs).")
    gen.add_argument("--mask", type=Path, help="Inpainting: repaint the white area of this mask (needs --image).")
    gen.add_argument("--strength", type=float, default=None,
                     help="How much of the input is repainted, (0, 1] (default 0.6 image-to-image, 1.0 inpainting).")
    where = gen.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="Save the (first) image under this file name.")
    where.add_argument("--out-dir", type=Path, help="Save into this folder (default: the outputs folder).")
    gen.add_argument("--quiet", action="store_true", help="No progress on stderr.")
    add_settings_arguments(gen, _ENGINE_SETTINGS)

    plan = sub.add_parser("plan", help="Print the memory plan for this machine or a hypothetical one.",
                          description="Print the memory plan. Works without a GPU and without weights "
                                      "(published sizes are used when the model is not on disk).")
    plan.add_argument("--vram-gb", type=float, help="Plan for a hypothetical GPU of this size (0: CPU only).")
    plan.add_argument("--gpus", type=int, default=1, help="With --vram-gb: number of such GPUs.")
    plan.add_argument("--ram-gb", type=float, default=64.0, help="With --vram-gb: system RAM.")
    plan.add_argument("--width", type=int, default=DEFAULT_SIDE_PX, help="Image width to plan for, in pixels.")
    plan.add_argument("--height", type=int, default=DEFAULT_SIDE_PX, help="Image height to plan for, in pixels.")
    plan.add_argument("--num-images", type=int, default=1, help="Images per request to plan for.")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    add_settings_arguments(plan, _PLAN_SETTINGS)

    demo = sub.add_parser("make-demo", help="Write the tiny demo model as a diffusers folder.")
    demo.add_argument("dir", type=Path, help="Folder to create.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2: bad settings, 1: failure)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "make-demo":
            return _make_demo(args)
        if args.command == "plan":
            return _plan(args)
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


def _make_demo(args: argparse.Namespace) -> int:
    from .demo_model import build_demo_model
    from .logs import configure_logging

    configure_logging("WARNING")  # also silences the libraries' "Writing model shards" bars
    if args.dir.exists() and any(args.dir.iterdir()):
        print(f"error: {args.dir} exists and is not empty: choose a new folder.", file=sys.stderr)
        return 2
    started = time.perf_counter()
    build_demo_model(args.dir)
    print(f"demo model written to {args.dir} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    print(args.dir)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .loader import component_sizes, plan_for, resolve_model_source
    from .model_files import sizes_for
    from .planner import hypothetical_devices

    settings = settings_from_args(args)
    if args.vram_gb is not None:
        devices = hypothetical_devices(args.vram_gb, args.gpus, args.ram_gb)
    else:
        from .hardware import probe_devices

        devices = probe_devices()
    if settings.demo:
        sizes = component_sizes(resolve_model_source(settings))
    else:
        # Never download for a plan: real headers if the model is on disk, else published sizes.
        from .model_files import find_local_model_folder

        sizes = sizes_for(settings.model, find_local_model_folder(settings.model))
    request = RequestSize(args.width, args.height, args.num_images)
    plan = plan_for(settings, devices, sizes, request)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    machine = ", ".join(f"{g.name} ({g.total_bytes / GIB:.0f} GiB, {g.free_bytes / GIB:.1f} free)"
                        for g in devices.gpus) or "no CUDA GPU"
    print(f"machine:   {machine}; RAM {devices.ram_total_bytes / GIB:.0f} GiB")
    print(f"sizes:     {sizes.source}")
    print(f"request:   {request.width}x{request.height}, {request.num_images} image(s)")
    print(f"plan:      {plan.describe()}")
    print(f"peak:      {plan.predicted_peak_bytes / GIB:.1f} GiB predicted, {plan.budget_bytes / GIB:.1f} GiB usable")
    print(f"reason:    {plan.reason}")
    for warning in plan.warnings:
        print(f"warning:   {warning}")
    return 0


def _read_inputs(args: argparse.Namespace, settings) -> tuple:
    """The --image and --mask files, read safely and fitted to the requested size; (image, mask, inputs, notes)."""
    from .errors import ValidationError
    from .uploads import fit_to_size, read_image, read_mask

    if args.mask is not None and args.image is None:
        raise ValidationError("--mask needs --image (the picture whose white-masked area is repainted).")
    if args.image is None:
        return None, None, (), []
    limit = settings.max_upload_mb * 2**20

    def data(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValidationError(f"{path} cannot be read ({exc.strerror}): check the path.") from None

    source = read_image(data(args.image), args.image.name, max_bytes=limit)
    image, note = fit_to_size(source.image, args.width, args.height, args.image.name)
    inputs, notes = [(args.image.name, source.sha256)], [note] if note else []
    mask = None
    if args.mask is not None:
        read = read_mask(data(args.mask), args.mask.name, max_bytes=limit, size=(args.width, args.height))
        mask = read.image
        inputs.append((args.mask.name, read.sha256))
    return image, mask, tuple(inputs), notes


def _generate(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .service import GenerationRequest, GenerationService
    from .storage import OutputStore

    configure_logging("WARNING")
    overrides = {}
    if args.out_dir is not None:
        overrides["outputs_dir"] = args.out_dir
    elif args.out is not None:
        overrides["outputs_dir"] = args.out.parent if str(args.out.parent) else Path(".")
    settings = settings_from_args(args, **overrides)
    image, mask, inputs, notes = _read_inputs(args, settings)  # before the model loads: bad files fail fast
    service = GenerationService(settings, store=OutputStore(settings.outputs_dir))
    if not args.quiet:
        print(f"loading {settings.model_source} ...", file=sys.stderr)
    service.load()
    if not args.quiet:
        print(f"memory plan: {service.plan.describe()} ({service.plan.reason})", file=sys.stderr)

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

    request = GenerationRequest(prompt=args.prompt, width=args.width, height=args.height, steps=args.steps,
                                guidance_scale=args.guidance, seed=args.seed, num_images=args.num_images,
                                image=image, mask=mask, strength=args.strength, inputs=inputs)
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
