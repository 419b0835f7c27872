"""`edgegen export`: parse the options and call :func:`exporters.pipeline.export_model`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from edge_agent.bundle import PRECISIONS, TASKS  # the format only: no export stack
from exporters.sources import builtin_help  # the standard library only

console = Console(stderr=True)

# Mirrors exporters.gate.DEFAULT_MAX_PPL_INCREASE_PCT (kept literal so `--help` does not
# import the exporters); tests/cli/test_cli_export.py checks the two agree.
DEFAULT_MAX_PPL_INCREASE = 25.0


# The bundle format's own lists (one source for the exporters, the agent and this CLI).
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str)
Task = Enum("Task", {t.replace("-", "_"): t for t in TASKS}, type=str)


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


class Exporter(str, Enum):
    genai = "genai"
    optimum = "optimum"


def export(
    source: str = typer.Argument(
        ..., help="A Hugging Face folder, a .gguf file, a built-in model "
        f"({builtin_help()}), or a hub id (needs the hub to be reachable).",
        show_default=False),
    name: str = typer.Option(None, "--name", "-n", help="Bundle name (default: from the source)."),
    precision: Precision = typer.Option(
        None, "--precision", "-p",
        help="Weights precision (default: int4 for text generation, fp32 for embeddings, or "
        "what a built-in model names: int8 for gemma3-270m). fp16 needs a GPU.",
        show_default=False),
    task: Task = typer.Option(None, "--task", help="Default: from the model's architecture.",
                              show_default=False),
    out: Path = typer.Option(None, "--out", "-o",
                             help="Bundle store (default: $EDGEGEN_STORE or "
                             "~/.cache/edgegen/bundles).", show_default=False),
    context_length: int = typer.Option(
        None, "--context-length", min=16,
        help="Context window in tokens (default: the model's, at most 2048).",
        show_default=False),
    device: Device = typer.Option(Device.cpu, "--device", help="Device the bundle targets."),
    exporter: Exporter = typer.Option(
        None, "--exporter", help="Export path (default: genai where its builder supports the "
        "architecture, else optimum).", show_default=False),
    trt: bool = typer.Option(False, "--trt", help="Build for TensorRT (needs TensorRT and a GPU)."),
    max_ppl_increase: float = typer.Option(
        DEFAULT_MAX_PPL_INCREASE, "--max-ppl-increase", min=0.0,
        help="Quality gate: refuse a bundle whose perplexity is more than this many percent "
        "above the fp32 reference's."),
    force: bool = typer.Option(False, "--force", help="Write the bundle even if the quality "
                               "gate fails (the manifest records that it was forced)."),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="CPU threads for validation and the bundle's default "
                                "(default: all cores).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead "
                                 "of a table."),
    sign_key: Path = typer.Option(None, "--sign-key", help="Sign the bundle as it is written "
                                  "with this Ed25519 private key (`edgegen bundle keygen`).",
                                  show_default=False),
) -> None:
    """Export a model to a validated, quantized ONNX bundle in the store.

    Checked against the PyTorch fp32 model and written atomically (an error leaves nothing).
    """
    import json
    import os

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cli.bundle import manifest_table
    from exporters.pipeline import export_model
    from exporters.quiet import quiet_libraries

    # The libraries' own warnings and tqdm bars would garble the progress; --debug shows them.
    with quiet_libraries(enabled=not os.environ.get("EDGEGEN_DEBUG")), \
            Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                     console=console, transient=False) as bar:
        current: list[int] = []

        def step(message: str) -> None:
            if current:
                bar.update(current[-1], completed=1, total=1)
            current.append(bar.add_task(message, total=None))

        try:
            bundle = export_model(
                source, name=name, precision=precision.value if precision else None,
                task=task.value if task else None, store=out, context_length=context_length,
                device=device.value, exporter=exporter.value if exporter else None, trt=trt,
                max_ppl_increase_pct=max_ppl_increase, force=force, threads=threads,
                progress=step, sign_key=sign_key,
            )
        finally:
            for tid in current:
                bar.stop_task(tid)
        if current:
            bar.update(current[-1], completed=1, total=1)
    if as_json:
        typer.echo(json.dumps({"digest": bundle.digest, "path": str(bundle.path),
                               **bundle.manifest}, indent=2, sort_keys=True))
        return
    Console().print(manifest_table(bundle.manifest, bundle.digest))
    typer.echo(str(bundle.path))


def register(app: typer.Typer) -> None:
    """Add `edgegen export` to the app."""
    app.command("export", no_args_is_help=True)(export)
