"""The one module that probes the hardware. Everything else receives :class:`DeviceFacts`."""

from __future__ import annotations

import time
from pathlib import Path

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
#: pinned copy takes 5-20 ms on PCIe 4.0-5.0 links, and a 256 MiB copy within the GPU 0.2-2 ms: the whole probe stays
#: well under a second.
PROBE_MATMUL_SIDE = 4096
PROBE_MATMUL_ITERATIONS = 10
PROBE_COPY_BYTES = 256 * 1024 * 1024
PROBE_COPY_ITERATIONS = 3
PROBE_DEVICE_COPY_ITERATIONS = 10


def probe_throughput(index: int) -> Throughput:
    """Measure GPU ``index``'s bf16 matmul rate (TFLOP/s), pinned host-to-device copy rate and memory bandwidth
    (GB/s, 1e9 bytes; a copy within the GPU counts its bytes read and written) for the planner's time model. CUDA
    only (callers skip it without a GPU); a warm-up call of each comes first. Under a second on any card this project
    targets (see :data:`PROBE_MATMUL_SIDE`)."""
    import torch

    device = torch.device("cuda", index)

    def timed(work, iterations: int) -> float:
        work()  # warm-up: cuBLAS picks its kernel, the copy engines wake up
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(iterations):
            work()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / iterations

    side = PROBE_MATMUL_SIDE
    a = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    b = torch.randn(side, side, device=device, dtype=torch.bfloat16)
    tflops = 2 * side**3 / timed(lambda: a @ b, PROBE_MATMUL_ITERATIONS) / 1e12
    a = b = None  # free them before the copies
    host = torch.empty(PROBE_COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(PROBE_COPY_BYTES, dtype=torch.uint8, device=device)
    h2d_gbps = PROBE_COPY_BYTES / timed(lambda: target.copy_(host, non_blocking=True), PROBE_COPY_ITERATIONS) / 1e9
    host = None
    other = torch.empty_like(target)
    memory_gbps = 2 * PROBE_COPY_BYTES / timed(lambda: other.copy_(target), PROBE_DEVICE_COPY_ITERATIONS) / 1e9
    target = other = None
    torch.cuda.empty_cache()
    return Throughput(bf16_tflops=tflops, h2d_gbps=h2d_gbps, memory_gbps=memory_gbps,
                      source=f"measured at start: {side}^3 bf16 matmul, {PROBE_COPY_BYTES >> 20} MiB pinned copy "
                             "and copy within the GPU")


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
                    throughput = probe_throughput(index)
                except RuntimeError:  # the GPU is busy or short of memory: the planner assumes typical rates
                    throughput = None
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)  # after the probe gave its memory back
            gpus.append(GpuFacts(index=index, name=properties.name, total_bytes=int(total_bytes),
                                 free_bytes=int(free_bytes), supports_bf16=properties.major >= 8,
                                 throughput=throughput))
    return DeviceFacts(gpus=tuple(gpus), ram_total_bytes=int(ram.total), ram_available_bytes=int(ram.available),
                       cpu_bf16=cpu_has_native_bf16(read_cpu_flags()))


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
