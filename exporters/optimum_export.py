"""The optimum export path: optimum-onnx's exporter, for every architecture the genai builder
does not take and for embedding models (``feature-extraction``).

Decoders are exported as ``text-generation-with-past`` (one graph with KV-cache inputs and
outputs, so the agent decodes incrementally). This module owns optimum; its failures become
:mod:`exporters.errors` here.

The model is loaded here and handed to optimum's exporter (what ``main_export`` does), so
that its attention implementation is ours to choose: transformers' default, SDPA, silently
skips attention-logit softcapping (Gemma 2's ``attn_logit_softcapping``), and a graph traced
through it is not the model. Such models are traced with eager attention.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from exporters.errors import ExportError, UnsupportedModel

log = logging.getLogger(__name__)

OPTIMUM_TASKS = {
    "text-generation": "text-generation-with-past",
    "feature-extraction": "feature-extraction",
}
# Files copied from the source folder next to the graph (those that exist).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def supported_tasks(config: dict) -> set[str]:
    """The edgegen tasks optimum can export this model type for."""
    import optimum.exporters.onnx.model_configs  # noqa: F401 - registers the ONNX configs
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            config.get("model_type", ""), "onnx", library_name="transformers"
        )
    except KeyError:
        return set()
    return {ours for ours, theirs in OPTIMUM_TASKS.items() if theirs in tasks}


def loading_options(config: dict) -> dict:
    """How transformers must load the model for its trace to compute what the model does."""
    if config.get("attn_logit_softcapping") is not None:
        return {"attn_implementation": "eager"}  # SDPA ignores the softcap
    return {}


def export(hf_dir: Path, work_dir: Path, *, task: str, opset: int | None = None) -> Path:
    """Export ``hf_dir`` as fp32 into ``work_dir``; return the path of its model.onnx."""
    config = json.loads((hf_dir / "config.json").read_text())
    if task not in supported_tasks(config):
        raise UnsupportedModel(
            f"optimum-onnx cannot export model type {config.get('model_type')!r} for {task}"
        )
    from optimum.exporters.onnx import onnx_export_from_model
    from optimum.exporters.tasks import TasksManager
    from optimum.exporters.utils import DisableCompileContextManager
    from optimum.utils.save_utils import maybe_load_preprocessors

    raw = work_dir / "optimum"
    optimum_task = OPTIMUM_TASKS[task]
    try:
        with DisableCompileContextManager():
            model = TasksManager.get_model_from_task(
                optimum_task, str(hf_dir), framework="pt", device="cpu",
                library_name="transformers", local_files_only=True,
                **loading_options(config))
        if optimum_task.endswith("-with-past"):
            model.config.use_cache = True
        onnx_export_from_model(
            model, raw, task=optimum_task, opset=opset, device="cpu", do_validation=False,
            preprocessors=maybe_load_preprocessors(str(hf_dir)))
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise ExportError(f"optimum-onnx failed to export {hf_dir.name}: {exc}") from exc
    graph = raw / "model.onnx"
    if not graph.is_file():
        found = sorted(p.name for p in raw.iterdir())
        raise ExportError(f"optimum-onnx wrote no model.onnx (it wrote {found})")
    return graph


def copy_side_files(hf_dir: Path, out_dir: Path) -> None:
    """Tokenizer, config and chat template next to the graph (those the source has)."""
    for name in SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out_dir / name)


def save_as_bundle_graph(src: Path, dest_dir: Path) -> None:
    """Re-save any graph as ``model.onnx`` + ``model.onnx.data``, the names every bundle uses
    (the quantizers and optimum each pick their own external-data names)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    onnx.save_model(model, str(dest_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=1024)
