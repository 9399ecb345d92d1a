#!/usr/bin/env python3
"""What LoRA adapters cost per image: the demo model at 512x512, 8 steps (any machine, no GPU needed).

Through the service (``GenerationService.generate``, wall time from submit to the saved PNG), interleaved in
``--rounds`` rounds so that drift hits every case alike:

* no LoRA, ``--repeats`` times;
* 1, 2 and 4 demo LoRAs never loaded before (first use: the header check at submit, the file's SHA-256,
  ``load_lora_weights``, and evicting the least recently used adapters once the cache of 8 is full);
* the same 1, 2 and 4 again, ``--repeats`` times each, interleaved with no LoRA in a rotating order (cached:
  ``enable_lora`` + ``set_adapters``, the extra matmuls of the adapter layers, ``disable_lora`` afterwards).

Prints a table of medians and fastest runs with the extra seconds over no LoRA (the fastest runs are the least
disturbed by other processes on a shared machine; the load average is recorded), writes
``<out>/lora-<date>.json`` and a section of ``benchmarks/RESULTS.md``. A rank-r adapter adds r * (in + out)
multiply-adds to a layer's in * out: a quarter on the demo model (32 wide, rank 4), where peft's per-layer Python
work also weighs, and under 2% for a rank-32 LoRA on the real model (3840 wide).

    python benchmarks/lora_bench.py               # results in benchmarks/results/
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

COUNTS = (1, 2, 4)


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    from zimage.lora import write_demo_lora
    from zimage.service import GenerationRequest, GenerationService
    from zimage.settings import Settings

    lora_dir = tmp / "loras"
    lora_dir.mkdir()
    service = GenerationService(Settings(demo=True, data_dir=tmp / "data", outputs_dir=tmp / "outputs",
                                         lora_dir=lora_dir))
    service.load()

    def timed(loras: tuple = ()) -> float:
        started = time.perf_counter()
        service.generate(GenerationRequest("a lighthouse at dusk", width=args.size, height=args.size,
                                           steps=args.steps, seed=7, loras=loras))
        return time.perf_counter() - started

    seconds: dict[str, list[float]] = {"none": []}
    for count in COUNTS:
        seconds[f"{count} first use"] = []
        seconds[f"{count} cached"] = []
    try:
        timed()  # warm-up: first calls allocate
        for round_index in range(args.rounds):
            sets = {}
            for count in COUNTS:
                names = [f"bench-{round_index}-{count}-{i}" for i in range(count)]
                for index, name in enumerate(names):
                    seed = 1000 * round_index + 10 * count + index
                    write_demo_lora(lora_dir / f"{name}.safetensors", "peft", seed=seed)
                sets[count] = tuple((name, 1.0) for name in names)
                seconds[f"{count} first use"].append(timed(sets[count]))
            # Interleaved, in a rotating order: a burst of load from other processes hits every case alike.
            cases = ["none", *COUNTS]
            for repeat in range(args.repeats):
                for case in cases[repeat % len(cases):] + cases[:repeat % len(cases)]:
                    if case == "none":
                        seconds["none"].append(timed())
                    else:
                        seconds[f"{case} cached"].append(timed(sets[case]))
    finally:
        service.close()
    return {"seconds": seconds, "plan": service.plan.describe() if service.plan else None}


def table(measured: dict, args: argparse.Namespace, machine: dict, date: str) -> str:
    seconds = measured["seconds"]
    base = statistics.median(seconds["none"])
    fastest = min(seconds["none"])
    lines = [f"### LoRA adapters, demo model, {args.size}x{args.size}, {args.steps} steps ({date})", "",
             f"{machine['cpu']}, {machine['cores']} cores, {measured['plan']}; wall time of "
             f"`GenerationService.generate` per image, {args.rounds} rounds; load average "
             f"{machine['load_before']:.1f} before, {machine['load_after']:.1f} after.", "",
             "| LoRAs | median s | extra over none, median | fastest s | extra over none, fastest | runs |",
             "| --- | --- | --- | --- | --- | --- |",
             f"| none | {base:.3f} | - | {fastest:.3f} | - | {len(seconds['none'])} |"]
    for kind, values in seconds.items():
        if kind != "none":
            median = statistics.median(values)
            lines.append(f"| {kind} | {median:.3f} | {median - base:+.3f} | {min(values):.3f} | "
                         f"{min(values) - fastest:+.3f} | {len(values)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="Rounds (each: none, then 1, 2, 4 LoRAs).")
    parser.add_argument("--repeats", type=int, default=3, help="Cached and no-LoRA images per round and case.")
    parser.add_argument("--size", type=int, default=512, help="Image side in pixels.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="Results folder.")
    args = parser.parse_args(argv)
    from zimage.hardware import probe_devices
    from zimage.logs import quiet_libraries
    from zimage.planner import choose_dtype

    quiet_libraries()
    load_before = os.getloadavg()[0]  # other processes on the same cores show up in every figure
    with tempfile.TemporaryDirectory() as scratch:
        measured = measure(args, Path(scratch))
    import torch

    from results_md import cpu_name

    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "dtype": choose_dtype("auto", "cpu", probe_devices()),
               "python": platform.python_version(), "torch": torch.__version__, "load_before": load_before,
               "load_after": os.getloadavg()[0]}
    date = time.strftime("%Y-%m-%d")
    base = statistics.median(measured["seconds"]["none"])
    report = {"date": date, "machine": machine, "size": args.size, "steps": args.steps, "rounds": args.rounds,
              "repeats": args.repeats, **measured,
              "median_s": {kind: statistics.median(values) for kind, values in measured["seconds"].items()},
              "extra_s": {kind: statistics.median(values) - base for kind, values in measured["seconds"].items()
                          if kind != "none"}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"lora-{date}.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    text = table(measured, args, machine, date)
    print(text)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_md import write_section

    write_section(ROOT / "benchmarks" / "RESULTS.md", f"lora-{machine['cpu']}", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
