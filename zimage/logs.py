"""Logging set-up for the entry points: readable lines, and one JSON line per generation job."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: str = "INFO") -> None:
    """Send logs to stderr. Job records (logger ``zimage.jobs``) are bare JSON lines for log tools."""
    root = logging.getLogger()
    if getattr(root, "_zimage_configured", False):
        return
    text = logging.StreamHandler(sys.stderr)
    text.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(text)
    root.setLevel(level)
    jobs = logging.getLogger("zimage.jobs")
    json_handler = logging.StreamHandler(sys.stderr)
    json_handler.setFormatter(logging.Formatter("%(message)s"))
    jobs.addHandler(json_handler)
    jobs.propagate = False
    root._zimage_configured = True  # type: ignore[attr-defined]
    quiet_libraries()


def quiet_libraries() -> None:
    """diffusers/transformers print progress bars and hub retries; the service reports its own progress."""
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - both are requirements
        pass
    for name in ("huggingface_hub", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
