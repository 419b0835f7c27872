"""`scripts/gpu_check.sh` on a machine without a GPU: one clear line on stderr, a non-zero
exit within seconds, and nothing installed or written. PATH is set by each test (empty, or
one fake `nvidia-smi`), so the answer is the same on a machine that has a GPU.

The GPU half (venv, exports, agent timings) needs an NVIDIA GPU and is not run here; its
requirement list, which decides what that venv holds, is checked against pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tomllib

from tests.support.procs import REPO

BASH = shutil.which("bash") or "/bin/bash"
SCRIPT = "scripts/gpu_check.sh"


def run_check(tmp_path, bin_dir, *args):
    """The script with PATH = ``bin_dir`` alone and its venv and work dirs in ``tmp_path``."""
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path),
           "EDGEGEN_GPU_VENV": str(tmp_path / "venv"), "EDGEGEN_GPU_WORK": str(tmp_path / "work")}
    started = time.monotonic()
    r = subprocess.run([BASH, SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    return r, time.monotonic() - started


def fake_nvidia_smi(bin_dir, body: str):
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def assert_refused(r, took, tmp_path, *expected):
    assert r.returncode != 0
    assert took < 10, f"took {took:.1f} s"
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: "), r.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert "nothing was installed" in lines[0]
    assert not (tmp_path / "venv").exists() and not (tmp_path / "work").exists()


def test_without_nvidia_smi_it_stops_before_installing_anything(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    r, took = run_check(tmp_path, empty)
    assert_refused(r, took, tmp_path, "no nvidia-smi on PATH")


def test_nvidia_smi_that_finds_no_gpu_stops_it(tmp_path):
    # what nvidia-smi prints (exit 6) on a machine whose driver sees no device
    fake_nvidia_smi(tmp_path / "bin", 'echo "No devices were found"\nexit 6\n')
    r, took = run_check(tmp_path, tmp_path / "bin")
    assert_refused(r, took, tmp_path, "nvidia-smi finds no GPU", "No devices were found")


def test_nvidia_smi_without_a_driver_stops_it(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", "echo \"NVIDIA-SMI has failed because it couldn't "
                    "communicate with the NVIDIA driver.\"\nexit 9\n")
    r, took = run_check(tmp_path, tmp_path / "bin")
    assert_refused(r, took, tmp_path, "nvidia-smi finds no GPU", "NVIDIA driver")


def test_a_driver_too_old_for_the_cuda_13_wheels_stops_it(tmp_path):
    fake_nvidia_smi(tmp_path / "bin", """case "$1" in
  --query-gpu=*) echo "NVIDIA H100 80GB HBM3, 550.54.15" ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |" ;;
esac
""")
    r, took = run_check(tmp_path, tmp_path / "bin")
    assert_refused(r, took, tmp_path, "supports CUDA up to 12.4", "CUDA 13")


def test_unknown_arguments_are_refused(tmp_path):
    r, _ = run_check(tmp_path, tmp_path, "--bogus")
    assert r.returncode != 0 and "unknown argument --bogus" in r.stderr


def test_help_describes_the_script(tmp_path):
    r, _ = run_check(tmp_path, tmp_path, "--help")
    assert r.returncode == 0
    for text in ("EDGEGEN_GPU_VENV", "EDGEGEN_GPU_WHEELS", "--download-wheels", "--trt"):
        assert text in r.stdout, text


def requirements(*args: str) -> list[str]:
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "requirements", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_the_gpu_venv_requirements_leave_out_the_cpu_onnxruntime():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    reqs = requirements()
    names = [r.split("[")[0].split("=")[0] for r in reqs]
    assert "onnxruntime" not in names and "onnxruntime-genai" not in names
    for req in project["dependencies"]:
        if not req.startswith(("onnxruntime==", "onnxruntime-genai==")):
            assert req in reqs, req
    for req in extras["export"]:
        assert req in reqs, req
    ort_gpu, genai_cuda = extras["gpu"]
    assert ort_gpu.replace("onnxruntime-gpu", "onnxruntime-gpu[cuda,cudnn]") in reqs
    assert genai_cuda in reqs


def test_pins_can_be_overridden_and_the_cuda_wheels_left_out():
    reqs = requirements("--override", "onnxruntime-gpu==1.31.1", "--no-cuda-libs")
    assert "onnxruntime-gpu==1.31.1" in reqs
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "requirements", "--override",
                        "not-a-dependency==1"], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and "not-a-dependency" in r.stderr


def test_the_script_parses_and_passes_shellcheck():
    subprocess.run([BASH, "-n", SCRIPT], cwd=REPO, check=True, timeout=30)
    # scripts/install.sh installs shellcheck and scripts/check_env.py insists on it: a machine
    # without it fails here rather than skipping the lint
    r = subprocess.run(["shellcheck", SCRIPT], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout
