"""The README's planner tables: what the planner picks, and every placement it weighed, on 8/12/16/24 GB cards; and
every placement measured on a GPU beside the planner's prediction for it.

    .venv/bin/python scripts/planner_tables.py            # print the Markdown
    .venv/bin/python scripts/planner_tables.py --write    # replace the block between the markers in README.md

Pure: the published Z-Image-Turbo sizes (never files on this machine), the cards' spec-sheet rates from
zimage.timing.KNOWN_GPUS, 1024x1024, one image, the default 1 GiB reserve. A GGUF row uses the size a file of that
type would have (``plan --gguf-quant``). tests/test_planner.py checks that README.md holds exactly this output, so
the README changes with the planner or the test fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- planner-tables:begin (scripts/planner_tables.py --write) -->"
END = "<!-- planner-tables:end -->"
GPU_BEGIN = "<!-- gpu-rows:begin (scripts/planner_tables.py --write) -->"
GPU_END = "<!-- gpu-rows:end -->"
RESULTS = ROOT / "benchmarks" / "results"
#: The committed GPU runs the planner's models are held to (tests/test_planner_gpu_rows.py): file, allocator, how the
#: text encoder was streamed then, and what the run was.
GPU_RUNS = (("gpu-nvidia-h200-2026-12-04-run1.json", "default", "block_level",
             "run 1: eager, default allocator, text encoder streamed by blocks"),
            ("gpu-nvidia-h200-2026-12-04-run3.json", "expandable", "leaf_level",
             "run 3: compiled where it composes, expandable segments, text encoder streamed by layers"))
#: (card in zimage.timing.KNOWN_GPUS, GGUF type or None): one 8/12/16/24 GB card each, and the GGUF files that the
#: 8 and 12 GB cards are the audience of.
CARDS = (("RTX 4060 8GB", None), ("RTX 4060 8GB", "Q4_0"), ("RTX 4070 12GB", None), ("RTX 4070 12GB", "Q8_0"),
         ("RTX 4060 Ti 16GB", None), ("RTX 4090 24GB", None))


def _plan(card: str, quant: str | None):
    from zimage.gguf_files import estimated_gguf_stats
    from zimage.planner import PUBLISHED_SIZES, RequestSize, hypothetical_devices, plan_memory
    from zimage.timing import find_gpu

    spec = find_gpu(card)
    sizes = PUBLISHED_SIZES
    if quant is not None:
        sizes = replace(sizes, transformer=estimated_gguf_stats(sizes.transformer, quant))
    devices = hypothetical_devices(spec.memory_gb, throughput=spec.throughput(), name=spec.name,
                                   compute_capability=spec.compute_capability)
    return plan_memory(devices, sizes, RequestSize())


def _command(card: str, quant: str | None) -> str:
    return f'python -m zimage plan --gpu-name "{card}"' + (f" --gguf-quant {quant}" if quant else "")


def markdown() -> str:
    """The summary table, then one ranked table per card (in a collapsed block each)."""
    from zimage.cli import ranked_table
    from zimage.planner import GIB

    plans = [(card, quant, _plan(card, quant)) for card, quant in CARDS]
    lines = ["| card | transformer | plan | predicted peak | predicted s/image | x compute | GB moved/image |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for card, quant, plan in plans:
        # Against the same rates' fastest case: every weight resident in bf16, nothing moved or cast.
        floor = min(c.predicted_seconds for c in plan.candidates if c.profile == "full" and not c.options)
        lines.append(f"| {card} | {quant or 'bf16'} | {plan.describe().split(' on ')[0]} | "
                     f"{plan.predicted_peak_bytes / GIB:.1f} GiB | {plan.predicted_seconds:.2f} | "
                     f"{plan.predicted_seconds / floor:.2f}x | {plan.bytes_moved_per_image / 1e9:.1f} |")
    for card, quant, plan in plans:
        lines += ["", f"<details><summary>{card}{' with a GGUF ' + quant + ' transformer' if quant else ''}: "
                      "every placement weighed</summary>", "", "```console", f"$ {_command(card, quant)}",
                  f"plan:      {plan.describe()}", f"reason:    {plan.reason}", "", ranked_table(plan), "```", "",
                  "</details>"]
    return "\n".join(lines)


def gpu_rows() -> list[dict]:
    """Every placement measured on a GPU in the committed runs, with the planner's peak and time predicted for it
    (the run's own probe rates, allocator and text-encoder streaming): dicts of label, run, measured and predicted
    figures."""
    import json

    from zimage import peak_model
    from zimage.planner import PUBLISHED_SIZES, RequestSize
    from zimage.time_model import predict_stages
    from zimage.timing import Throughput

    fallback_pageable = json.loads((RESULTS / GPU_RUNS[-1][0]).read_text())["throughput"]["pageable_gbps"]
    rows = []
    for name, allocator, offload, what in GPU_RUNS:
        run = json.loads((RESULTS / name).read_text())
        t = run["throughput"]
        rates = Throughput(t["bf16_tflops"], t["h2d_gbps"], t["memory_gbps"], "probe",
                           t.get("pageable_gbps") or fallback_pageable)
        for row in (r for r in run["profiles"] if r["ok"]):
            sizes = PUBLISHED_SIZES
            if "[GGUF]" in row["label"]:
                sizes = replace(sizes, transformer=replace(sizes.transformer, stored_bytes=run["gguf"]["stored_bytes"]))
            streams = row["profile"] in ("transformer-resident", "group-offload") and "(no streams)" not in row["label"]
            options = tuple(row["options"])
            peak = peak_model.predict_peak_bytes(row["profile"], options, sizes, RequestSize(), 2, streams, allocator,
                                                 offload)
            stages = predict_stages(row["profile"], options, sizes, RequestSize(), "bf16", rates,
                                    row.get("compiled", False), offload)
            rows.append({"run": what, "label": row["label"], "compiled": row.get("compiled", False),
                         "measured_peak": row["peak_reserved_bytes"], "predicted_peak": peak,
                         "measured_s": row["median_s"], "predicted_s": stages.total,
                         "floor_s": run["compute_floor"]["floor_s"], "stages_s": row.get("stages_s")})
    return rows


def gpu_markdown() -> str:
    """The measured H200 table beside the planner's predictions."""
    from zimage.planner import GIB

    lines = ["| run | placement | compiled | peak reserved, measured | predicted (error) | s/image, measured | "
             "predicted (error) | x compute floor |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in gpu_rows():
        peak_error = (row["predicted_peak"] - row["measured_peak"]) / row["measured_peak"]
        time_error = (row["predicted_s"] - row["measured_s"]) / row["measured_s"]
        lines.append(f"| {row['run'].split(':')[0]} | {row['label']} | {'yes' if row['compiled'] else 'no'} | "
                     f"{row['measured_peak'] / GIB:.2f} GiB | {row['predicted_peak'] / GIB:.2f} GiB "
                     f"({peak_error:+.0%}) | {row['measured_s']:.2f} s | {row['predicted_s']:.2f} s ({time_error:+.0%}) "
                     f"| {row['measured_s'] / row['floor_s']:.2f}x |")
    lines += ["", "; ".join(f"{what}" for _, _, _, what in GPU_RUNS) + "."]
    return "\n".join(lines)


def replace_block(text: str, block: str, begin: str = BEGIN, end: str = END) -> str:
    """``text`` with the part between ``begin`` and ``end`` (the planner tables' markers by default) replaced by
    ``block``. Raises ValueError when the markers are missing."""
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"the markers {begin!r} and {end!r} are not in the file")
    return text[:start + len(begin)] + "\n" + block + "\n" + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Replace the tables in README.md.")
    args = parser.parse_args(argv)
    block, gpu = markdown(), gpu_markdown()
    if not args.write:
        print(block + "\n\n" + gpu)
        return 0
    readme = ROOT / "README.md"
    readme.write_text(replace_block(replace_block(readme.read_text(), block), gpu, GPU_BEGIN, GPU_END))
    print(f"written: {readme.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
