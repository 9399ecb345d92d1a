"""The transformer's attention kernel (``--attention-backend``) and regional compilation (``--compile``).

diffusers 0.42.1 dispatches attention by name (``transformer.set_attention_backend(name)``); each kernel comes from
its own package. :func:`choose_backend` is the pure decision: a named backend needs its package (refused with the
package to install otherwise); ``auto`` takes the first that is installed and can run on this device, in the
order below (FlashAttention 3 is Hopper-only; FlashAttention 2 and SageAttention need their packages; cuDNN
attention comes with torch on CUDA). On a CPU only ``native`` (torch's scaled_dot_product_attention) runs.
:func:`apply` is the adapter that calls diffusers, and tries the next candidate of ``auto`` when one fails.

Which is fastest for Z-Image on a given card is still to be measured (``benchmarks/gpu_profiles.py``); the order
follows the kernels' published speed-ups over PyTorch's SDPA on Hopper/Ampere, not a measurement here.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .errors import ZImageError

log = logging.getLogger("zimage.attention")

#: What ``--attention-backend`` accepts.
BACKEND_CHOICES = ("auto", "native", "flash", "_flash_3", "sage", "_native_cudnn")
#: The package each backend needs (the import name, and what to pip install).
BACKEND_PACKAGES = {
    "flash": ("flash_attn", "flash-attn"),
    "_flash_3": ("flash_attn_interface", "flash-attn 3 (the 'hopper' build of flash-attention)"),
    "sage": ("sageattention", "sageattention"),
}
#: ``auto``'s order on a CUDA GPU, fastest first.
AUTO_ORDER = ("_flash_3", "flash", "sage", "_native_cudnn", "native")


class AttentionBackendError(ZImageError):
    """The named backend cannot run here; the message names the package or the device it needs."""


@dataclass(frozen=True)
class BackendChoice:
    """The backends to try, in order (one for a named backend, several for ``auto``), and why."""

    candidates: tuple[str, ...]
    reason: str


def choose_backend(requested: str, *, cuda: bool, compute_capability: tuple[int, int] | None,
                   installed: Callable[[str], bool]) -> BackendChoice:
    """Decide which attention backend(s) to use.

    ``cuda``: the transformer computes on a CUDA GPU; ``compute_capability``: that GPU's (major, minor), e.g.
    (9, 0) for an H100, or None when not known yet (the start-up check: then only packages are checked);
    ``installed(module)``: whether a Python module can be imported. Raises
    :class:`AttentionBackendError` for a named backend whose package or device is missing.
    """
    if requested not in BACKEND_CHOICES:
        raise AttentionBackendError(f"attention_backend={requested!r} is not valid: use one of "
                                    f"{', '.join(BACKEND_CHOICES)}.")
    if requested == "native":
        return BackendChoice(("native",), "asked for (torch's scaled_dot_product_attention)")
    if requested != "auto":
        if not cuda:
            raise AttentionBackendError(f"--attention-backend {requested} needs a CUDA GPU: on this device use native "
                                        "(or auto).")
        package = BACKEND_PACKAGES.get(requested)
        if package is not None and not installed(package[0]):
            raise AttentionBackendError(f"--attention-backend {requested} needs the package {package[1]} (module "
                                        f"{package[0]}), which is not installed: pip install it, or use auto.")
        if requested == "_flash_3" and compute_capability is not None and compute_capability[0] != 9:
            raise AttentionBackendError("--attention-backend _flash_3 runs on Hopper GPUs only (compute capability "
                                        "9.x, e.g. H100/H200): use flash or auto.")
        return BackendChoice((requested,), "asked for")
    if not cuda:
        return BackendChoice(("native",), "auto on a CPU: torch's scaled_dot_product_attention is the one that runs")
    usable = []
    for name in AUTO_ORDER:
        package = BACKEND_PACKAGES.get(name)
        if package is not None and not installed(package[0]):
            continue
        if name == "_flash_3" and (compute_capability or (0, 0))[0] != 9:
            continue
        usable.append(name)
    return BackendChoice(tuple(usable), f"auto: the fastest installed of {', '.join(AUTO_ORDER)}")


def module_installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it."""
    return importlib.util.find_spec(name) is not None


def apply(pipe: Any, requested: str, device: str) -> str:
    """Set the transformer's attention backend for ``requested`` on ``device``; returns the backend in use.

    For ``auto`` a backend that diffusers refuses is skipped (logged) and the next one tried; ``native`` is
    diffusers' default and needs no call. Raises :class:`AttentionBackendError` for a named backend that cannot
    run here.
    """
    import torch

    # A plan can name a CUDA device that this torch build cannot use (the tests' pretend GPU): then only the CPU's
    # kernel runs.
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    capability = torch.cuda.get_device_capability(device) if cuda else None
    choice = choose_backend(requested, cuda=cuda, compute_capability=capability, installed=module_installed)
    for name in choice.candidates:
        if name == "native":
            break  # diffusers' default: nothing to set
        try:
            pipe.transformer.set_attention_backend(name)
        except Exception as exc:  # noqa: BLE001 - diffusers raises RuntimeError/ValueError for a kernel it cannot use
            if requested != "auto":
                raise AttentionBackendError(f"--attention-backend {name} cannot run here: {exc}") from None
            log.info("attention backend %s not usable here (%s); trying the next", name, exc)
            continue
        log.info("attention backend: %s (%s)", name, choice.reason)
        return name
    log.info("attention backend: native (%s)", choice.reason)
    return "native"


@contextmanager
def compiled_or_eager(compiled: bool) -> Iterator[None]:
    """Run the transformer's compiled blocks when ``compiled``, else eagerly (torch's public
    ``torch.compiler.set_stance("force_eager")``): for a request whose LoRA adapters changed the graph, which would
    otherwise be compiled again on the spot (tens of seconds on a GPU). Nothing to do when nothing was compiled."""
    if compiled:
        yield
        return
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


def compile_transformer(pipe: Any, warm_up: Callable[[], None]) -> float:
    """Compile the transformer's repeated blocks (diffusers' regional compilation, ``fullgraph=True``: one compiled
    code serves all 34, the 30 main layers and the 2 + 2 refiners) and run ``warm_up()`` so the first request does
    not pay for compiling; torch's compiled graphs of an earlier pipeline are dropped first
    (``torch.compiler.reset``). Returns the seconds spent (compile and warm-up), which the caller logs.

    Measured on an H200 (benchmarks/results/gpu-nvidia-h200-2026-12-04-run3.json): 1.37 s per 1024x1024 image eager,
    0.93 s compiled; after a warm-up at two shapes (zimage.service.WARM_UP_SHAPES) a size or batch not seen before
    took 0.0-0.15 s more on its first request, not a recompilation."""
    import torch

    started = time.perf_counter()
    # A new pipeline (a reload) would otherwise add its graphs to those of the one it replaces, towards dynamo's
    # recompile limit (hit on an H200 by the third pipeline of one process: FailOnRecompileLimitHit).
    torch.compiler.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    warm_up()
    return time.perf_counter() - started


__all__ = ["AUTO_ORDER", "BACKEND_CHOICES", "AttentionBackendError", "BackendChoice", "apply", "choose_backend",
           "compile_transformer", "compiled_or_eager", "module_installed"]
