"""The README's planner tables: what the planner picks, and every placement it weighed, on 8/12/16/24 GB cards.

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
    devices = hypothetical_devices(spec.memory_gb, throughput=spec.throughput(), name=spec.name)
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
        # The compute floor under the same rates: every weight resident in bf16, nothing moved or cast.
        floor = min(c.predicted_seconds for c in plan.candidates if c.profile == "full" and not c.options)
        lines.append(f"| {card} | {quant or 'bf16'} | {' + '.join((plan.profile,) + plan.options)} | "
                     f"{plan.predicted_peak_bytes / GIB:.1f} GiB | {plan.predicted_seconds:.2f} | "
                     f"{plan.predicted_seconds / floor:.2f}x | {plan.bytes_moved_per_image / 1e9:.1f} |")
    for card, quant, plan in plans:
        lines += ["", f"<details><summary>{card}{' with a GGUF ' + quant + ' transformer' if quant else ''}: "
                      "every placement weighed</summary>", "", "```console", f"$ {_command(card, quant)}",
                  f"plan:      {plan.describe()}", f"reason:    {plan.reason}", "", ranked_table(plan), "```", "",
                  "</details>"]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``block``. Raises ValueError when
    the markers are missing."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are not in the file")
    return text[:start + len(BEGIN)] + "\n" + block + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="Replace the tables in README.md.")
    args = parser.parse_args(argv)
    block = markdown()
    if not args.write:
        print(block)
        return 0
    readme = ROOT / "README.md"
    readme.write_text(replace_block(readme.read_text(), block))
    print(f"written: {readme.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
