"""Engine selection and device checks."""

from __future__ import annotations

import pytest

from edge_agent.engine.ort import providers_for
from edge_agent.errors import DeviceUnavailable


def test_cpu_is_always_available():
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_absent_gpu_provider_is_a_clear_error(device):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has a GPU build of onnxruntime")
    with pytest.raises(DeviceUnavailable, match=device):
        providers_for(device)








