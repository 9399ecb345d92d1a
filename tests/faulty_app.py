"""``app.py`` on a pretend 80 GB GPU whose first generation runs out of memory and whose reloads fail.

Run by tests/test_supervisor.py under a real supervisord: the service walks its out-of-memory policy, the
reload it needs fails (as a host out of RAM would), the fallback fails too, and the app must exit non-zero
for Supervisor to restart it. The pipeline is the real demo pipeline on the CPU; only the GPU is pretended.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RunsOutOfMemory:
    """The real pipeline, except that every denoising call fails as a full GPU would."""

    def __init__(self, pipe) -> None:
        self._pipe = pipe

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **kwargs):
        import torch

        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def make_service(settings, on_fatal):
    import torch
    from diffusers import ZImagePipeline

    from zimage.planner import hypothetical_devices
    from zimage.service import GenerationService

    loads = []

    def factory(source, plan):
        loads.append(plan.describe())
        if len(loads) > 1:
            raise MemoryError("cannot allocate memory for the weights")
        return RunsOutOfMemory(ZImagePipeline.from_pretrained(source.pretrained, dtype=torch.float32))

    return GenerationService(settings, devices=hypothetical_devices(80), pipeline_factory=factory, on_fatal=on_fatal)


if __name__ == "__main__":
    import app

    raise SystemExit(app.main(service_factory=make_service))
