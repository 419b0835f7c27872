"""An int8 bundle whose weights use their full range is refused on an x86 CPU without VNNI,
where onnxruntime's int8 kernel saturates (edge_agent.engine.cpu_fit), and served elsewhere."""

from types import SimpleNamespace

import pytest

from edge_agent.engine import cpu_fit, loader
from edge_agent.errors import ModelLoadError
from edge_agent.settings import AgentSettings

FULL_RANGE = {"weights": "int8", "method": "dynamic", "per_channel": True}   # before 7 bits
SEVEN_BITS = {**FULL_RANGE, "reduce_range": True}
AVX2 = frozenset(("sse4_2", "avx", "avx2", "fma"))
AVX512 = AVX2 | {"avx512f", "avx512bw"}


@pytest.mark.parametrize("quantization, machine, flags, refused", [
    (FULL_RANGE, "x86_64", AVX2, True),
    (FULL_RANGE, "x86_64", AVX512, True),                     # AVX-512 before VNNI saturates too
    (FULL_RANGE, "AMD64", AVX2, True),
    (FULL_RANGE, "x86_64", AVX512 | {"avx512_vnni"}, False),
    (FULL_RANGE, "x86_64", AVX2 | {"avx_vnni"}, False),
    (FULL_RANGE, "aarch64", frozenset(("asimd", "asimddp")), False),
    (SEVEN_BITS, "x86_64", AVX2, False),
    ({"weights": "int8", "method": "rtn", "block_size": 32}, "x86_64", AVX2, False),  # genai
    ({"weights": "int4", "method": "k_quant"}, "x86_64", AVX2, False),
    (None, "x86_64", AVX2, False),                                                     # fp32
])
def test_which_bundles_a_cpu_would_compute_wrong(quantization, machine, flags, refused):
    why = cpu_fit.saturation_risk(quantization, machine, flags)
    assert (why is not None) == refused
    if refused:
        assert "VNNI" in why and "Export it again" in why


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx2 fma\n\n"
                    "processor\t: 1\nflags\t\t: fpu sse4_2 avx2 fma\n")
    assert cpu_fit.cpu_flags(info) == {"fpu", "sse4_2", "avx2", "fma"}
    assert cpu_fit.cpu_flags(tmp_path / "absent") == frozenset()


def test_the_agent_refuses_a_full_range_int8_bundle_on_such_a_cpu(monkeypatch):
    monkeypatch.setattr(cpu_fit.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_fit, "cpu_flags", lambda: AVX2)
    bundle = SimpleNamespace(name="smollm2-int8", manifest={"quantization": FULL_RANGE})
    with pytest.raises(ModelLoadError, match="smollm2-int8 cannot be served on this CPU.*VNNI"):
        loader.load_engine(bundle, AgentSettings(bundle="unused", node="edge-1"))
