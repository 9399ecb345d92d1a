"""The hardware probe's pure part: CPU flags read from a /proc/cpuinfo file."""

from __future__ import annotations

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
