"""Shared by the benchmark scripts: benchmarks/RESULTS.md kept as sections (one per benchmark and machine,
replaced on each run), and the machine's name for their tables."""

from __future__ import annotations

import platform
import re
from pathlib import Path

HEADER = ("# Benchmark results\n\nWritten by the scripts in this folder; each section names its machine and date. "
          "Ratios are from one run on one machine.\n")


def write_section(path: Path, key: str, text: str) -> None:
    """Insert or replace the section ``key`` (kept between HTML comment markers) in ``path``."""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    current = path.read_text(encoding="utf-8") if path.exists() else HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(updated, encoding="utf-8")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
