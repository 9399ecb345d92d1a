"""The one module that probes the hardware. Everything else receives :class:`DeviceFacts`."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .planner import DeviceFacts, GpuFacts, cpu_has_native_bf16
from .timing import Throughput

#: Where Linux describes the CPU; absent on other systems.
CPUINFO_PATH = Path("/proc/cpuinfo")


def read_cpu_flags(path: Path = CPUINFO_PATH) -> frozenset[str]:
    """The CPU feature flags in ``path`` (a /proc/cpuinfo file), lower case; empty when it cannot be read.

    x86 kernels list them on ``flags`` lines, aarch64 kernels on ``Features`` lines. Only the first
    such line is read: Linux reports the same features for every core. Never raises.
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip().lower() in ("flags", "features"):
                    return frozenset(value.lower().split())
    except OSError:  # no /proc (macOS, some containers): unknown means "no native bf16"
        pass
    return frozenset()


#: The probe's sizes: a 4096^3 bf16 matmul is 0.14 TFLOP (about 1 ms on an H100, 10 ms on an RTX 3060), a 256 MiB
#: pinned copy takes 5-20 ms on PCIe 4.0-5.0 links, and a 256 MiB copy within the GPU 0.2-2 ms. The pageable round
#: trip (64 MiB in from pageable memory, then out into a new host tensor as ``module.to("cpu")`` does) took 8 + 45 ms
#: on an H200's host (8.0 and 1.4 GB/s): with one warm-up and two timed rounds the whole probe stays under a second.
PROBE_MATMUL_SIDE = 4096
PROBE_MATMUL_ITERATIONS = 10
PROBE_COPY_BYTES = 256 * 1024 * 1024
PROBE_COPY_ITERATIONS = 3
PROBE_DEVICE_COPY_ITERATIONS = 10
PROBE_PAGEABLE_BYTES = 64 * 1024 * 1024
PROBE_PAGEABLE_ITERATIONS = 2


def pageable_round_trip_gbps(h2d_seconds: float, d2h_seconds: float, nbytes: int) -> float:
    """GB/s of weights moved in and back out through pageable memory, from the seconds of one copy each way of
    ``nbytes``: the rate :attr:`~zimage.timing.Throughput.pageable_gbps` means (model offload moves every component
    in and out once per image)."""
    return nbytes / (h2d_seconds + d2h_seconds) / 1e9


@dataclass(frozen=True)
class ProbeOps:
    """The probe's operations on one GPU (each one call of its work, queued on the device) and how to wait for
    them; :func:`torch_probe_ops` makes the real ones, the tests pass fakes."""

    matmul: Callable[[], Any]  # a PROBE_MATMUL_SIDE^3 bf16 matmul
    pinned_h2d: Callable[[], Any]  # PROBE_COPY_BYTES from pinned host memory
    device_copy: Callable[[], Any]  # PROBE_COPY_BYTES within the GPU
    pageable_h2d: Callable[[], Any]  # PROBE_PAGEABLE_BYTES from pageable host memory
    pageable_d2h: Callable[[], Any]  # PROBE_PAGEABLE_BYTES into a new host tensor, as module.to("cpu") does
    synchronize: Callable[[], Any]
    clock: Callable[[], float] = time.perf_counter


def measure_throughput(ops: ProbeOps) -> Throughput:
    """Time each of ``ops`` (one warm-up call, then the mean of its iterations, synchronized) into the planner's
    rates: bf16 TFLOP/s, pinned host-to-device GB/s, memory GB/s (read plus written), and the pageable round-trip
    GB/s (:func:`pageable_round_trip_gbps`)."""

    def timed(work: Callable[[], Any], iterations: int) -> float:
        work()  # warm-up: cuBLAS picks its kernel, the copy engines wake up
        ops.synchronize()
        started = ops.clock()
        for _ in range(iterations):
            work()
        ops.synchronize()
        return (ops.clock() - started) / iterations

    side = PROBE_MATMUL_SIDE
    tflops = 2 * side**3 / timed(ops.matmul, PROBE_MATMUL_ITERATIONS) / 1e12
    h2d_gbps = PROBE_COPY_BYTES / timed(ops.pinned_h2d, PROBE_COPY_ITERATIONS) / 1e9
    memory_gbps = 2 * PROBE_COPY_BYTES / timed(ops.device_copy, PROBE_DEVICE_COPY_ITERATIONS) / 1e9
    pageable_gbps = pageable_round_trip_gbps(timed(ops.pageable_h2d, PROBE_PAGEABLE_ITERATIONS),
                                             timed(ops.pageable_d2h, PROBE_PAGEABLE_ITERATIONS), PROBE_PAGEABLE_BYTES)
    return Throughput(bf16_tflops=tflops, h2d_gbps=h2d_gbps, memory_gbps=memory_gbps, pageable_gbps=pageable_gbps,
                      source=f"measured at start: {side}^3 bf16 matmul, {PROBE_COPY_BYTES >> 20} MiB pinned copy, "
                             f"{PROBE_PAGEABLE_BYTES >> 20} MiB pageable round trip and copy within the GPU")


def sane_throughput(rates: Throughput) -> Throughput | None:
    """``rates`` when every one is a finite, positive number, else None (the planner then assumes typical rates): a
    clock that did not move, or a busy GPU, must not give the time model a zero or an infinity to divide by."""
    values = (rates.bf16_tflops, rates.h2d_gbps, rates.memory_gbps, rates.pageable_gbps)
    return rates if all(math.isfinite(v) and v > 0 for v in values) else None


def torch_probe_ops(index: int) -> ProbeOps:
    """The probe's operations on CUDA GPU ``index`` (about 1 GB of device memory while the probe runs)."""
    import torch

    device = torch.device("cuda", index)
    side = PROBE_MATMUL_SIDE
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    pinned = torch.empty(PROBE_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(PROBE_COPY_BYTES, dtype=torch.uint8, device=device)
    other = torch.empty_like(target)
    pageable = torch.ones(PROBE_PAGEABLE_BYTES, dtype=torch.uint8)  # ones: every page mapped, as loaded weights are
    small = torch.empty(PROBE_PAGEABLE_BYTES, dtype=torch.uint8, device=device)
    return ProbeOps(matmul=lambda: a @ b, pinned_h2d=lambda: target.copy_(pinned, non_blocking=True),
                    device_copy=lambda: other.copy_(target), pageable_h2d=lambda: small.copy_(pageable),
                    pageable_d2h=lambda: small.to("cpu"), synchronize=lambda: torch.cuda.synchronize(device))


def probe_throughput(index: int) -> Throughput:
    """Measure GPU ``index``'s rates for the planner's time model (:func:`measure_throughput` of
    :func:`torch_probe_ops`). CUDA only (callers skip it without a GPU). Under a second on any card this project
    targets (see :data:`PROBE_MATMUL_SIDE`); its buffers are freed before it returns."""
    import torch

    try:
        return measure_throughput(torch_probe_ops(index))
    finally:
        torch.cuda.empty_cache()  # the closures' buffers are gone with the ops


def probe_devices(measure_throughput: bool = False) -> DeviceFacts:
    """Read the GPUs (total and free memory, bf16 support), the RAM and the CPU's bf16 support; with
    ``measure_throughput``, also each GPU's bf16 rate and host-to-device bandwidth (:func:`probe_throughput`; the
    server's start does this, ``plan`` and the CLI do not).

    Called by entry points at start-up, never at import. Without torch's CUDA runtime (a CPU
    build, no driver) it reports no GPU instead of failing.
    """
    import psutil
    import torch

    ram = psutil.virtual_memory()
    gpus: list[GpuFacts] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            # bf16 tensor cores arrived with compute capability 8.0 (Ampere).
            throughput = None
            if measure_throughput and properties.major >= 8:  # the bf16 probe needs bf16 tensor cores
                try:
                    throughput = sane_throughput(probe_throughput(index))
                except RuntimeError:  # the GPU is busy or short of memory: the planner assumes typical rates
                    throughput = None
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)  # after the probe gave its memory back
            gpus.append(GpuFacts(index=index, name=properties.name, total_bytes=int(total_bytes),
                                 free_bytes=int(free_bytes), supports_bf16=properties.major >= 8,
                                 throughput=throughput, compute_capability=(properties.major, properties.minor)))
    return DeviceFacts(gpus=tuple(gpus), ram_total_bytes=int(ram.total), ram_available_bytes=int(ram.available),
                       cpu_bf16=cpu_has_native_bf16(read_cpu_flags()),
                       fp8_compute_library=importlib.util.find_spec("torchao") is not None,
                       allocator="expandable" if expandable_segments(os.environ) else "default")


#: The CUDA caching allocator's configuration the server runs with unless PYTORCH_CUDA_ALLOC_CONF is set: expandable
#: segments grow one mapping instead of reserving separate blocks, so what it reserves stays close to what tensors
#: hold (less fragmentation: the planner's peak model counts what is reserved, zimage.planner).
CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(environ: Any) -> str:
    """Set ``PYTORCH_CUDA_ALLOC_CONF`` in ``environ`` (the process environment) to :data:`CUDA_ALLOC_CONF` unless
    it is set already (a user's own setting wins); returns the setting in effect. Entry points call it before the
    first CUDA allocation, which is when torch reads it."""
    return environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def expandable_segments(environ: Any) -> bool:
    """Whether the allocator configuration in ``environ`` turns expandable segments on."""
    return "expandable_segments:true" in environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower()


def device_available(device: str) -> bool:
    """Whether ``device`` ("cpu" or "cuda:N") exists for this torch build: the tests' pretend GPUs do not."""
    import torch

    if not device.startswith("cuda"):
        return True
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.cuda.is_available() and index < torch.cuda.device_count()


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a CUDA GPU; nothing on the CPU), so that a stage's time is its own."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)


class StageMeter:
    """Seconds and peak GPU memory of each stage of one job, for its timings and the benchmark.

    :meth:`end` synchronizes ``device`` (so a stage's time is its own, not the next one's), records the seconds since
    the previous mark and the peak allocated and reserved bytes since then (CUDA only), and starts the next stage's
    window. A stage ended twice (a retried decode) keeps its latest figures."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.stages: dict[str, dict[str, float]] = {}
        self.restart()

    def restart(self) -> None:
        synchronize(self.device)
        reset_gpu_peak(self.device)
        self._started = time.perf_counter()

    def end(self, stage: str) -> None:
        synchronize(self.device)
        row: dict[str, float] = {"seconds": time.perf_counter() - self._started}
        stats = gpu_memory_stats(self.device)
        if stats:
            row.update(peak_allocated_bytes=stats["peak_allocated_bytes"],
                       peak_reserved_bytes=stats["peak_reserved_bytes"])
        self.stages[stage] = row
        self.restart()


def gpu_memory_stats(device: str) -> dict[str, int]:
    """Peak allocated/reserved bytes on ``device`` since the last reset (empty for the CPU)."""
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return {}
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "allocated_bytes": int(torch.cuda.memory_allocated(device)),
    }


def reset_gpu_peak(device: str) -> None:
    """Start a new peak-memory window on ``device`` (no-op on the CPU)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def release_memory() -> None:
    """Give cached GPU blocks back after the references to a failed job's tensors were dropped."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
