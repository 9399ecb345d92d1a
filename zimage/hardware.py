"""The one module that probes the hardware. Everything else receives :class:`DeviceFacts`."""

from __future__ import annotations

from pathlib import Path

from .planner import DeviceFacts, GpuFacts, cpu_has_native_bf16

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


def probe_devices() -> DeviceFacts:
    """Read the GPUs (total and free memory, bf16 support), the RAM and the CPU's bf16 support.

    Called by entry points at start-up, never at import. Without torch's CUDA runtime (a CPU
    build, no driver) it reports no GPU instead of failing.
    """
    import psutil
    import torch

    ram = psutil.virtual_memory()
    gpus: list[GpuFacts] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            properties = torch.cuda.get_device_properties(index)
            # bf16 tensor cores arrived with compute capability 8.0 (Ampere).
            gpus.append(GpuFacts(index=index, name=properties.name, total_bytes=int(total_bytes),
                                 free_bytes=int(free_bytes), supports_bf16=properties.major >= 8))
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
