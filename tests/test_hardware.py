"""The hardware probe's pure part: CPU flags read from a /proc/cpuinfo file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from zimage.hardware import read_cpu_flags
from zimage.planner import cpu_has_native_bf16

X86_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9354 32-Core Processor
flags\t\t: fpu vme de pse avx2 avx512f avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu vme de pse avx2 avx512f avx512_bf16 avx512_vnni
"""
X86_NO_BF16_CPUINFO = """processor\t: 0
model name\t: AMD Ryzen 7 5800X
flags\t\t: fpu sse2 avx avx2 fma sha_ni
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_flags_of_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    cases = {"x86": (X86_CPUINFO, True), "x86-old": (X86_NO_BF16_CPUINFO, False), "arm": (ARM_CPUINFO, True)}
    for name, (text, native) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        flags = read_cpu_flags(path)
        assert "avx2" in flags or "asimd" in flags, name
        assert "amd" not in flags and "epyc" not in flags  # only the flags line, not the model name
        assert cpu_has_native_bf16(flags) is native, name


def test_no_cpuinfo_means_no_flags(tmp_path: Path) -> None:
    assert read_cpu_flags(tmp_path / "missing") == frozenset()
    (tmp_path / "empty").write_text("")
    assert read_cpu_flags(tmp_path / "empty") == frozenset()
    assert read_cpu_flags(tmp_path) == frozenset()  # a folder: unreadable as a file, still no exception


def test_probe_reports_this_cpu() -> None:
    from zimage.hardware import probe_devices

    assert probe_devices().cpu_bf16 is cpu_has_native_bf16(read_cpu_flags())


class FakeGpu:
    """A pretend GPU for the probe: each operation advances a fake clock by its cost, so the rates are exact."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.now = 0.0
        self.calls: dict[str, int] = {}

    def op(self, name: str):
        def run() -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.now += self.seconds[name]
        return run


def test_the_probe_measures_both_copy_rates_pinned_and_pageable() -> None:
    from zimage import hardware

    # The H200's host (gpu-mechanisms-...json): 55.3 GB/s pinned, 8.0 GB/s in from pageable memory, 1.4 GB/s back
    # out into a new host tensor; 64 MiB for the pageable pair, 256 MiB pinned, a 4096^3 matmul at 720 TFLOP/s.
    pinned_s = hardware.PROBE_COPY_BYTES / 55.3e9
    in_s, out_s = hardware.PROBE_PAGEABLE_BYTES / 8.0e9, hardware.PROBE_PAGEABLE_BYTES / 1.4e9
    gpu = FakeGpu({"matmul": 2 * 4096**3 / 720e12, "pinned": pinned_s, "device": 2 * hardware.PROBE_COPY_BYTES / 4e12,
                   "in": in_s, "out": out_s})
    ops = hardware.ProbeOps(matmul=gpu.op("matmul"), pinned_h2d=gpu.op("pinned"), device_copy=gpu.op("device"),
                            pageable_h2d=gpu.op("in"), pageable_d2h=gpu.op("out"), synchronize=lambda: None,
                            clock=lambda: gpu.now)
    rates = hardware.measure_throughput(ops)
    assert abs(rates.h2d_gbps - 55.3) < 1e-6 and abs(rates.bf16_tflops - 720) < 1e-6
    assert abs(rates.memory_gbps - 4000) < 1e-6
    # The round trip: a byte in and out, 1/(1/8 + 1/1.4) GB/s: what model offload pays per byte it moves.
    assert abs(rates.pageable_gbps - 1 / (1 / 8.0 + 1 / 1.4)) < 1e-9
    assert "pageable round trip" in rates.source
    # One warm-up call of each before the timed ones, so the first (slow) call is not in the figure.
    assert gpu.calls == {"matmul": hardware.PROBE_MATMUL_ITERATIONS + 1, "pinned": hardware.PROBE_COPY_ITERATIONS + 1,
                         "device": hardware.PROBE_DEVICE_COPY_ITERATIONS + 1,
                         "in": hardware.PROBE_PAGEABLE_ITERATIONS + 1, "out": hardware.PROBE_PAGEABLE_ITERATIONS + 1}


def test_the_allocator_gets_expandable_segments_unless_the_user_set_it() -> None:
    from zimage.hardware import CUDA_ALLOC_CONF, configure_cuda_allocator, expandable_segments

    environ: dict[str, str] = {}
    assert configure_cuda_allocator(environ) == CUDA_ALLOC_CONF and expandable_segments(environ)
    mine = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"}
    assert configure_cuda_allocator(mine) == "max_split_size_mb:512" and not expandable_segments(mine)
    assert expandable_segments({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64, expandable_segments:True"})


def test_the_probe_tells_the_planner_which_allocator_runs(monkeypatch) -> None:
    from zimage.hardware import probe_devices

    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    assert probe_devices().allocator == "expandable"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert probe_devices().allocator == "default"


def test_the_stage_meter_times_each_stage_and_keeps_no_gpu_figures_on_the_cpu() -> None:
    from zimage.hardware import StageMeter

    meter = StageMeter("cpu")
    sum(range(10000))
    meter.end("encode")
    meter.end("denoise")
    assert list(meter.stages) == ["encode", "denoise"]
    assert all(set(row) == {"seconds"} and row["seconds"] >= 0 for row in meter.stages.values())


def test_a_probe_that_measured_nothing_usable_leaves_the_planner_its_assumed_rates() -> None:
    from zimage.hardware import sane_throughput
    from zimage.timing import Throughput

    good = Throughput(700.0, 55.0, 4000.0, "probe", 1.4)
    assert sane_throughput(good) is good
    for bad in (dict(bf16_tflops=0.0), dict(h2d_gbps=float("inf")), dict(pageable_gbps=float("nan")),
                dict(memory_gbps=-1.0)):
        assert sane_throughput(replace(good, **bad)) is None, bad
