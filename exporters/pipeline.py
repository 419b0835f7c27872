"""`export_model`: from a source to a validated, quantized bundle in the store.

The order is chosen so that every mistake the user can make fails before any slow work:
options and the machine first, then the store, then the source, then the model's limits.
The bundle is assembled in a staging directory inside the store and renamed into place only
after validation and the quality gate pass, so an error or an interruption leaves no bundle.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edge_agent.bundle import (
    PRECISIONS,
    TASKS,
    Bundle,
    default_store,
    staging_dir,
    write_bundle,
)
from edge_agent.errors import BundleSignatureError
from exporters import gate, genai, optimum_export, quantize, validation
from exporters.errors import (
    ExportError,
    ExportOptionError,
    QualityGateFailed,
    SourceError,
    StoreError,
    UnsupportedModel,
    ValidationFailed,
)
from exporters.int4_recipe import Int4Recipe, recipe_for_precision
from exporters.sources import Source, cache_root, resolve_source

log = logging.getLogger(__name__)

EXPORTERS = ("genai", "optimum")
DEVICES = ("cpu", "cuda")
# Capped so that the default KV cache of a long-context model fits a small edge device;
# --context-length raises it up to the model's own maximum.
DEFAULT_MAX_CONTEXT = 2048
Progress = Callable[[str], None]


def export_model(
    source: str,
    *,
    name: str | None = None,
    precision: str | None = None,
    task: str | None = None,
    store: str | os.PathLike | None = None,
    context_length: int | None = None,
    device: str = "cpu",
    exporter: str | None = None,
    trt: bool = False,
    max_ppl_increase_pct: float = gate.DEFAULT_MAX_PPL_INCREASE_PCT,
    force: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    sign_key: str | os.PathLike | None = None,
    int4_recipe: str | dict | Int4Recipe | None = None,
) -> Bundle:
    """Export ``source`` into ``store`` and return the sealed bundle.

    With ``sign_key`` (an Ed25519 private key file), the bundle is signed as it is written
    (``edgegen.sig``); the key is read first, so a bad key fails before any work.

    ``precision`` defaults to int4 for text generation and fp32 for embeddings; ``exporter``
    (genai | optimum) defaults to genai where its builder supports the architecture.
    ``int4_recipe`` (a name, ``key=value,...`` or dict; ``exporters.int4_recipe``) overrides
    the default int4 recipe, for experiments; the manifest records it as ``quantization``.
    Raises :class:`exporters.errors.ExportError` subclasses, each with a one-line message.
    """
    step = progress or (lambda _msg: None)
    check_options(precision=precision, task=task, device=device, exporter=exporter, trt=trt,
                  context_length=context_length)
    check_device(precision=precision, device=device, trt=trt)
    recipe = recipe_for_precision(precision, int4_recipe)  # None: int4_recipe.DEFAULT
    signer = _signing_key(sign_key) if sign_key is not None else None
    store = Path(store) if store is not None else default_store()
    staging = _make_staging(store)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=store))
    try:
        step("reading the source")
        src = resolve_source(source)
        config = src.config()
        task = check_task(config, task) if task else infer_task(config)
        check_tokenizer(src.hf_dir)
        precision = precision or src.default_precision or (
            "int4" if task == "text-generation" else "fp32")
        ctx = resolve_context_length(config, context_length)
        if task == "feature-extraction" and context_length is None:
            ctx = min(ctx, sentence_max_length(src.hf_dir) or ctx)
        path, tried = choose_exporter(config, task, precision, exporter)
        threads = threads or os.cpu_count() or 1
        started = time.monotonic()
        step(f"building the {precision} graph with the {path} exporter")
        if path == "genai":
            quantization = genai.build(
                src.hf_dir, staging, precision=precision,
                device="cuda" if trt or device == "cuda" else "cpu", context_length=ctx,
                threads=threads, cache_dir=work / "genai-cache", recipe=recipe)
        else:
            quantization = _optimum(src, staging, work, task=task, precision=precision,
                                    step=step, recipe=recipe)
        _finish_side_files(src, staging)
        build_s = time.monotonic() - started
        step("validating against the PyTorch fp32 reference")
        from exporters.onnx_graph import Graph
        from exporters.reference import load_reference

        graph = Graph(staging / "model.onnx", threads=threads)
        signature = graph.signature(config, staging / "model.onnx")
        ref = load_reference(src.hf_dir, task)
        pooling = pooling_for(src.hf_dir) if task == "feature-extraction" else None
        if task == "text-generation":
            runtime = "onnxruntime-genai" if path == "genai" else "onnxruntime"
            served = served_generator(staging, runtime, ctx, threads,
                                      generation_ids(src.hf_dir, config))
            try:
                figures = validation.validate_causal(graph, ref, signature, ctx, served=served,
                                                     window=sliding_window(config))
            finally:
                served.close()
            check_served(figures)
        else:
            figures = validation.validate_encoder(
                graph, ref, pooling, served_embeddings(staging, pooling, ctx, threads))
        del graph
        check_fp32_parity(precision, figures)
        decision = gate.judge(figures, max_ppl_increase_pct)
        if not decision.passed and not force:
            raise QualityGateFailed(
                f"{precision} export refused by the quality gate: {decision.reason} "
                f"(raise --max-ppl-increase or pass --force to write it anyway)"
            )
        figures["gate"] = decision.as_manifest(max_ppl_increase_pct, force)
        step("writing the bundle")
        manifest = {
            "name": name or src.default_name,
            "task": task,
            "runtime": "onnxruntime-genai" if path == "genai" else "onnxruntime",
            "exporter": path,
            "exporters_tried": tried,
            "source": src.as_manifest(),
            "precision": precision,
            "quantization": quantization,
            "device": device,
            "signature": signature,
            "generation": generation_ids(src.hf_dir, config),
            "chat_template": "chat_template.jinja"
            if (staging / "chat_template.jinja").is_file() else None,
            "context_length": ctx,
            "validation": figures,
            "export_seconds": round(build_s, 1),
        }
        if pooling:
            manifest["pooling"] = pooling
        seal = None
        if signer is not None:  # signed in staging: the bundle appears in the store signed
            from edge_agent.bundle.signing import sign_bundle

            seal = functools.partial(sign_bundle, key=signer)
        try:
            bundle = write_bundle(staging, manifest, store, seal=seal)
        except OSError as exc:
            raise StoreError(f"cannot write the bundle into {store}: {exc}") from exc
        except BundleSignatureError as exc:
            raise StoreError(f"the bundle could not be signed: {exc}") from exc
        log.info("bundle written", extra={"path": str(bundle.path), "digest": bundle.digest})
        return bundle
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# -- decisions on plain data -------------------------------------------------------------

def check_options(*, precision: str | None, task: str | None, device: str,
                  exporter: str | None, trt: bool, context_length: int | None) -> None:
    """Reject option values that no model could satisfy."""
    for label, value, allowed in (("precision", precision, PRECISIONS), ("task", task, TASKS),
                                  ("device", device, DEVICES),
                                  ("exporter", exporter, EXPORTERS)):
        if value is not None and value not in allowed:
            raise ExportOptionError(f"--{label} {value!r} is not one of {', '.join(allowed)}")
    if context_length is not None and context_length < 16:
        raise ExportOptionError(f"--context-length {context_length} is too small (minimum 16)")
    if trt and exporter == "optimum":
        raise ExportOptionError("--trt builds with the genai exporter, not optimum")


def infer_task(config: dict) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        return "text-generation"
    if any(a.endswith(("Model", "ForMaskedLM")) for a in archs) or not archs:
        return "feature-extraction"
    raise UnsupportedModel(
        f"cannot tell which task {archs} is for; pass --task text-generation or "
        f"feature-extraction"
    )


def check_task(config: dict, task: str) -> str:
    """``task`` as asked, unless the model plainly cannot do it (an encoder generating text)."""
    archs = config.get("architectures") or []
    if task == "text-generation" and archs and not any(
            a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        raise UnsupportedModel(
            f"{archs[0]} is an encoder (an embedding model), it cannot generate text: export "
            f"it with --task feature-extraction"
        )
    return task


def check_tokenizer(hf_dir: Path) -> None:
    """The vocabulary must load as the agent will load it (``tokenizers``' tokenizer.json),
    before any graph is built."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return  # transformers converts tokenizer.model (and so does the builder): checked then
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"the vocabulary in {path} cannot be loaded: {reason}") from exc


def model_max_context(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def resolve_context_length(config: dict, requested: int | None) -> int:
    limit = model_max_context(config)
    if requested is None:
        return min(limit or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)
    if limit is not None and requested > limit:
        raise ExportOptionError(
            f"--context-length {requested} is larger than the model's maximum of {limit} tokens"
        )
    return requested


def choose_exporter(config: dict, task: str, precision: str,
                    requested: str | None) -> tuple[str, list[str]]:
    """Which path exports this model, and which were considered (for the error message)."""
    archs = config.get("architectures") or ["?"]
    genai_ok = task == "text-generation" and genai.supports(config)
    optimum_ok = task in optimum_export.supported_tasks(config)
    if requested == "genai":
        if not genai_ok:
            raise UnsupportedModel(
                f"the genai exporter does not support {archs[0]} for {task} "
                f"(try --exporter optimum)"
            )
        return "genai", ["genai"]
    if requested == "optimum":
        if not optimum_ok:
            raise UnsupportedModel(
                f"the optimum exporter does not support model type "
                f"{config.get('model_type')!r} for {task} (try --exporter genai)"
            )
        if precision == "fp16":
            raise ExportOptionError("fp16 is built by the genai exporter; drop --exporter optimum")
        return "optimum", ["optimum"]
    if genai_ok:
        return "genai", ["genai"]
    if optimum_ok and precision != "fp16":
        return "optimum", ["genai", "optimum"]
    raise UnsupportedModel(
        f"no exporter supports {archs[0]} (model type {config.get('model_type')!r}) for "
        f"{task} at {precision}: tried genai (builder architectures: "
        f"{'no' if not genai_ok else 'yes'}), optimum (model types: "
        f"{'no' if not optimum_ok else 'yes'})"
    )


def check_fp32_parity(precision: str, figures: dict) -> None:
    """An fp32 export computes the reference's function: it must agree everywhere."""
    if precision != "fp32":
        return
    if figures.get("perplexity") is not None:
        diff = figures["max_abs_logit_diff"]
        agree = figures["teacher_forced_top1_agreement"]
        if diff > validation.FP32_MAX_LOGIT_DIFF or agree < 1.0:
            raise ValidationFailed(
                f"fp32 graph does not match the reference: max |logit diff| {diff:.4g} "
                f"(limit {validation.FP32_MAX_LOGIT_DIFF}), top-1 agreement {agree:.1%}"
            )
    elif min(figures["min_pooled_cosine"], figures["min_served_cosine"]) < 0.9999:
        raise ValidationFailed(
            f"fp32 encoder does not match the reference: pooled cosine "
            f"{figures['min_pooled_cosine']:.6f}, served cosine "
            f"{figures['min_served_cosine']:.6f} (the agent's tokenizer and pooling), "
            f"max |hidden diff| {figures['max_abs_hidden_diff']:.4g}"
        )


def generation_ids(hf_dir: Path, config: dict) -> dict:
    gen = {}
    if (hf_dir / "generation_config.json").is_file():
        gen = json.loads((hf_dir / "generation_config.json").read_text())

    def pick(key):
        return gen.get(key, config.get(key))

    eos = pick("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return {"eos_token_ids": eos_ids, "bos_token_id": pick("bos_token_id"),
            "pad_token_id": pick("pad_token_id")}


# -- device checks and I/O ------------------------------------------------------------------

def check_device(*, precision: str | None, device: str, trt: bool) -> None:
    """fp16, CUDA and TensorRT need a GPU and its onnxruntime build: say so before working."""
    if not (precision == "fp16" or device == "cuda" or trt):
        return
    import onnxruntime as ort

    providers = set(ort.get_available_providers())
    if trt and not providers & {"TensorrtExecutionProvider", "NvTensorRTRTXExecutionProvider"}:
        raise ExportOptionError(
            "--trt needs TensorRT and a GPU: this onnxruntime has no TensorRT execution "
            f"provider (available: {', '.join(sorted(providers))})"
        )
    if "CUDAExecutionProvider" not in providers:
        what = "fp16 export" if precision == "fp16" else "--device cuda"
        raise ExportOptionError(
            f"{what} needs a GPU and the edgegen[gpu] extra (onnxruntime-gpu); this machine "
            f"offers only {', '.join(sorted(providers))}: use int4 or int8 on CPU"
        )


def _signing_key(path: str | os.PathLike):
    """The Ed25519 private key at ``path``; a key that cannot be used is an option error."""
    from edge_agent.bundle.signing import load_private_key
    from edge_agent.errors import SigningKeyError

    try:
        return load_private_key(path)
    except SigningKeyError as exc:
        raise ExportOptionError(f"--sign-key: {exc}") from exc


def _make_staging(store: Path) -> Path:
    try:
        staging = staging_dir(store)
        probe = staging / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return staging
    except OSError as exc:
        raise StoreError(f"bundle store {store} is not writable: {exc.strerror or exc}") from exc


def _optimum(src: Source, staging: Path, work: Path, *, task: str, precision: str,
             step: Progress, recipe: Int4Recipe) -> dict | None:
    """Export with optimum; return the manifest's ``quantization`` (None for fp32)."""
    raw = optimum_export.export(src.hf_dir, work, task=task)
    quantization = None
    if precision == "fp32":
        optimum_export.save_as_bundle_graph(raw, staging)
    else:
        step(f"quantizing to {precision}")
        out = work / "quantized" / "model.onnx"
        out.parent.mkdir()
        quantization = quantize.quantize_int8(raw, out) if precision == "int8" \
            else quantize.quantize_int4(raw, out, recipe)
        optimum_export.save_as_bundle_graph(out, staging)
    optimum_export.copy_side_files(src.hf_dir, staging)
    return quantization


def _finish_side_files(src: Source, staging: Path) -> None:
    """Make sure the chat template, if the model has one, is in chat_template.jinja."""
    target = staging / "chat_template.jinja"
    if target.exists():
        return
    tc = staging / "tokenizer_config.json"
    if tc.is_file():
        template = json.loads(tc.read_text()).get("chat_template")
        if isinstance(template, str) and template.strip():
            target.write_text(template)


def served_generator(staging: Path, runtime: str, ctx: int, threads: int, generation: dict):
    """The agent's generation engine over the staged bundle, as it will serve it."""
    from edge_agent.engine.loader import load_engine
    from edge_agent.settings import AgentSettings

    bundle = _staged_bundle(staging, {"task": "text-generation", "runtime": runtime,
                                      "context_length": ctx, "generation": generation})
    return load_engine(bundle, AgentSettings(bundle=str(staging), node="export", threads=threads))


def sliding_window(config: dict) -> int | None:
    """The window of a model's local-attention layers (Gemma 2/3, Mistral), if it has any."""
    window = config.get("sliding_window")
    if config.get("use_sliding_window") is False:  # Qwen2 carries a window it does not use
        return None
    return window if isinstance(window, int) and window > 0 else None


def check_served(figures: dict) -> None:
    """The agent must read prompts as the reference does, at any precision: a different id
    is a tokenizer bug, not a quantization cost."""
    if figures["served_tokenizer_match"] < 1.0:
        raise ValidationFailed(
            f"the agent's tokenizer (tokenizer.json) encodes "
            f"{1 - figures['served_tokenizer_match']:.0%} of the validation prompts "
            f"differently from the reference tokenizer"
        )


def _staged_bundle(staging: Path, manifest: dict):
    """``staging`` as a Bundle the agent's engines can open (not yet sealed or hashed)."""
    from edge_agent.bundle import Bundle

    files = {p.name: {} for p in staging.iterdir() if p.is_file()}
    return Bundle(path=staging, digest="", manifest={**manifest, "files": files})


def served_embeddings(staging: Path, pooling: dict, ctx: int, threads: int):
    """The agent's embedding engine over the staged bundle, as it will serve it."""
    from edge_agent.engine.embed import EmbeddingEngine

    staged = _staged_bundle(staging, {"pooling": pooling, "context_length": ctx})
    return EmbeddingEngine(staged, providers=["CPUExecutionProvider"], threads=threads)


def sentence_max_length(hf_dir: Path) -> int | None:
    """A sentence-transformers model's ``max_seq_length`` (sentence_bert_config.json): the
    length it was trained to embed, shorter than its position table (all-MiniLM-L6-v2: 256
    of 512). Longer inputs are refused by the agent rather than embedded out of training."""
    cfg = hf_dir / "sentence_bert_config.json"
    if not cfg.is_file():
        return None
    value = json.loads(cfg.read_text()).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def pooling_for(hf_dir: Path) -> dict:
    """Pooling of a sentence-transformers model (1_Pooling/config.json), else mean."""
    cfg = hf_dir / "1_Pooling" / "config.json"
    mode = "mean"
    if cfg.is_file():
        if json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
            mode = "cls"
    return {"mode": mode, "normalize": True}


__all__ = ["ExportError", "cache_root", "export_model"]
