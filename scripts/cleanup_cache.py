#!/usr/bin/env python3
"""Delete old generated images so the outputs folder stays bounded. Meant for cron (deploy/cron/).

    python scripts/cleanup_cache.py                       # outputs older than 30 minutes
    python scripts/cleanup_cache.py --max-total-mb 2000   # ... and the oldest until under 2 GB
    python scripts/cleanup_cache.py --dry-run --verbose   # show what would go
    python scripts/cleanup_cache.py --gradio-cache        # also Gradio's temporary folder

The folder defaults to the app's outputs folder, from the same settings as the app (ZIMAGE_OUTPUTS_DIR,
relative paths from the current folder). Prints one summary line per folder. Exit status: 0 done (or
skipped because another cleanup holds the lock), 1 a folder is missing or unusable, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, no install needed

from zimage.cleanup import CleanupBusy, CleanupError, clean  # noqa: E402
from zimage.settings import SettingsError, settings_from_args  # noqa: E402
from zimage.storage import OUTPUT_SUFFIXES, gradio_cache_dir  # noqa: E402


def positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive: give a number above 0")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cleanup_cache.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="Folder to clean (default: the app's outputs folder).")
    parser.add_argument("--max-age-minutes", type=positive(float), default=30.0,
                        help="Delete images older than this (default 30).")
    parser.add_argument("--max-total-mb", type=positive(float), default=None,
                        help="Then delete the oldest until the folder holds at most this many MB.")
    parser.add_argument("--gradio-cache", action="store_true",
                        help="Also clean Gradio's temporary folder (GRADIO_TEMP_DIR, else <data dir>/gradio-cache) "
                             "with the same age rule; any kind of file there, since Gradio owns it.")
    parser.add_argument("--dry-run", action="store_true", help="Delete nothing; report what would be deleted.")
    parser.add_argument("--verbose", action="store_true", help="List every file deleted (or that would be).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(None)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    jobs = [(args.dir or settings.outputs_dir, OUTPUT_SUFFIXES)]
    if args.gradio_cache:
        jobs.append((gradio_cache_dir(settings, os.environ), None))
    max_total_bytes = int(args.max_total_mb * 1e6) if args.max_total_mb is not None else None
    status = 0
    for root, suffixes in jobs:
        try:
            report = clean(Path(root), max_age_s=args.max_age_minutes * 60, max_total_bytes=max_total_bytes,
                           suffixes=suffixes, dry_run=args.dry_run)
        except CleanupBusy as exc:
            print(str(exc))
            continue
        except CleanupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        if args.verbose:
            for entry in report.deleted:
                print(f"{'would delete' if args.dry_run else 'deleted'} {entry.path} ({entry.size_bytes} bytes)")
        for error in report.errors:
            print(f"warning: could not delete {error}", file=sys.stderr)
        print(report.summary())
    return status


if __name__ == "__main__":
    raise SystemExit(main())
