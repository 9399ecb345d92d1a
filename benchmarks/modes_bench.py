#!/usr/bin/env python3
"""What each generation mode costs over text-to-image, on the demo model (any machine, no GPU needed).

Through the service (the same path as the page and the CLI: validation, encode, denoise, decode, save), at
``--size`` x ``--size`` with ``--steps`` steps, for: text, image-to-image at strength 0.6 and 1.0, inpainting,
ControlNet and ControlNet inpainting (the demo's tiny ControlNet). Each mode runs once to warm up (its pipeline
is built over the loaded components on first use), then ``--runs`` times interleaved with the others. Reported:
the median of the service's ``generate_s`` (encode + denoise + decode on the worker) and the difference to
text-to-image. Prints a table and writes ``<out>/modes-<date>.json`` and a section of ``benchmarks/RESULTS.md``.

    python benchmarks/modes_bench.py               # results in benchmarks/results/
    python benchmarks/modes_bench.py --quick       # a smoke run (256 px, 2 steps, 1 run) for the tests

The demo model is tiny: its transformer costs little, so the VAE's encode of an input (which the real model
shares) weighs more here than it would on a GPU with the real 6B transformer. Read the differences as what each
mode adds on this machine, not as a GPU forecast.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (label, request fields) of each measured mode; images are made at the run's size.
MODES = (
    ("text", {}),
    ("img2img, strength 0.6", {"image": True, "strength": 0.6}),
    ("img2img, strength 1.0", {"image": True, "strength": 1.0}),
    ("inpaint", {"image": True, "mask": True}),
    ("controlnet", {"control": True}),
    ("controlnet_inpaint", {"image": True, "mask": True, "control": True}),
)


def pictures(size: int) -> dict:
    """An input photo, a mask of its top half and an edge-map control image, all size x size."""
    from PIL import Image

    photo = Image.new("RGB", (size, size), (200, 40, 40))
    photo.paste((30, 30, 220), (0, 0, size // 2, size // 2))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size, size // 2))
    control = Image.new("RGB", (size, size), (255, 255, 255))
    control.paste((0, 0, 0), (size // 4, 0, size // 2, size))
    return {"image": photo, "mask": mask, "control": control}


def request_for(fields: dict, size: int, steps: int, images: dict):
    from zimage.service import GenerationRequest

    return GenerationRequest(prompt="a red sofa in a bright room", width=size, height=size, steps=steps, seed=11,
                             image=images["image"] if fields.get("image") else None,
                             mask=images["mask"] if fields.get("mask") else None,
                             control_image=images["control"] if fields.get("control") else None,
                             strength=fields.get("strength"))


def measure(args: argparse.Namespace, outputs: Path) -> dict:
    from zimage.service import GenerationService
    from zimage.settings import Settings

    settings = Settings(demo=True, data_dir=args.data_dir, outputs_dir=outputs)
    service = GenerationService(settings)
    service.load()
    images = pictures(args.size)
    seconds: dict[str, list[float]] = {label: [] for label, _ in MODES}
    steps_run: dict[str, int] = {}
    try:
        for label, fields in MODES:  # warm-up: builds each mode's pipeline once
            service.generate(request_for(fields, args.size, args.steps, images))
        for _ in range(args.runs):
            for label, fields in MODES:
                seen: list[int] = []
                result = service.generate(request_for(fields, args.size, args.steps, images),
                                          on_progress=lambda p: seen.append(p.total) if p.stage == "denoising"
                                          else None)
                seconds[label].append(result.timings["generate_s"])
                steps_run[label] = seen[-1]
        profile = service.plan.describe()
    finally:
        service.close()
    return {"seconds": seconds, "steps_run": steps_run, "profile": profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--runs", type=int, default=5, help="Measured runs per mode, interleaved.")
    parser.add_argument("--quick", action="store_true", help="Smoke run: 256 px, 2 steps, 1 run; no RESULTS.md.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    parser.add_argument("--data-dir", type=Path, default=None, help="Where the demo model is (built if missing).")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.steps, args.runs = 256, 2, 1
    from zimage.logs import configure_logging

    configure_logging("WARNING")
    with tempfile.TemporaryDirectory() as scratch:
        args.data_dir = args.data_dir or Path(scratch) / "data"
        measured = measure(args, Path(scratch) / "outputs")
    text = statistics.median(measured["seconds"]["text"])
    rows = []
    for label, values in measured["seconds"].items():
        median = statistics.median(values)
        rows.append({"mode": label, "median_s": round(median, 4), "extra_s": round(median - text, 4),
                     "ratio": round(median / text, 3), "steps_run": measured["steps_run"][label],
                     "runs_s": [round(v, 4) for v in values]})
    from results_md import cpu_name

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "profile": measured["profile"],
               "python": platform.python_version()}
    date = time.strftime("%Y-%m-%d")
    report = {"date": date, "machine": machine, "size": args.size, "steps": args.steps, "runs": args.runs,
              "modes": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"modes-{date}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [f"### Cost of each mode over text-to-image, demo model, {args.size}x{args.size}, {args.steps} steps "
             f"({date})", "",
             f"{machine['cpu']}, {machine['cores']} cores, {machine['profile']}; median of {args.runs} interleaved "
             "runs of the service's generate time (encode + denoise + decode).", "",
             "| mode | steps run | median s | extra s over text | ratio |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['mode']} | {row['steps_run']} | {row['median_s']:.3f} | {row['extra_s']:+.3f} | "
                     f"{row['ratio']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.quick:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from results_md import write_section

        write_section(ROOT / "benchmarks" / "RESULTS.md", f"modes-{machine['cpu']}", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
