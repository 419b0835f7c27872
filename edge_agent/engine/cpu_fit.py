"""Whether this CPU computes a bundle's int8 kernels right.

onnxruntime multiplies dynamically quantized activations (uint8) by int8 weights with
VPMADDUBSW on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI), which adds pairs of products
in 16 bits and saturates when the weights use their full range: SmolLM2's int8 read
perplexity 3121 against 27 on an AVX2 EPYC. edgegen's int8 exports keep the weights within
[-64, 64] (``reduce_range``, recorded in the manifest's ``quantization``), where no pair can
overflow; a bundle exported before that, or by another tool, passes its validation on a VNNI
machine and answers garbage on such an edge. The agent refuses it there rather than serve it.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path

VNNI_FLAGS = frozenset(("avx512_vnni", "avx_vnni"))   # /proc/cpuinfo's names
X86 = frozenset(("x86_64", "amd64", "i386", "i686"))


def saturation_risk(quantization: Mapping | None, machine: str,
                    flags: frozenset[str]) -> str | None:
    """Why this CPU would compute the bundle's int8 MatMuls wrong, or None. ``machine``:
    ``platform.machine()``; ``flags``: the CPU's flags (``cpu_flags``)."""
    q = quantization or {}
    if q.get("weights") != "int8" or q.get("method") != "dynamic" or q.get("reduce_range"):
        return None   # weight-only int8 (MatMulNBits) computes in float: no such kernel
    if machine.lower() not in X86 or flags & VNNI_FLAGS:
        return None   # ARM's and VNNI's int8 kernels add in 32 bits
    return ("its int8 weights use their full range, which onnxruntime's int8 kernel saturates "
            "on x86 CPUs without VNNI, as this one is: its answers would be wrong here. Export "
            "it again with this edgegen, which keeps int8 weights within [-64, 64]")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's flags (empty where /proc/cpuinfo has none, as off Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def check(quantization: Mapping | None) -> str | None:
    """``saturation_risk`` on this machine."""
    return saturation_risk(quantization, platform.machine(), cpu_flags())
