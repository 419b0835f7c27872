"""The `edgegen` command. This module only composes the command groups; each lives in its own
module with a ``register(app)`` function, and no command holds logic of its own."""

from __future__ import annotations

import os
import sys

import typer

from cli import agent, bundle, deploy, export, manifests, mqtt, registry, rollout, router, up
from cli.logs import setup_logging

app = typer.Typer(
    name="edgegen",
    help=(
        "Run generative models at the edge: export a model to a validated ONNX bundle, serve "
        "it on edge nodes with an OpenAI-compatible API and MQTT, and route every request to "
        "the nearest healthy edge."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from edge_agent.version import VERSION

        typer.echo(f"edgegen {VERSION}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show tracebacks for errors and log at debug level."
    ),
    log_level: str = typer.Option(
        None, "--log-level", envvar="EDGEGEN_LOG_LEVEL",
        help="Log level for servers: debug, info, warning (default), error.",
    ),
) -> None:
    if debug:
        os.environ["EDGEGEN_DEBUG"] = "1"
    setup_logging("debug" if debug else log_level)


for module in (export, bundle, agent, registry, router, mqtt, deploy, rollout, manifests, up):
    module.register(app)


def _known_errors() -> tuple[type[BaseException], ...]:
    from cloud_router.errors import RouterError
    from edge_agent.errors import AgentError
    from exporters.errors import ExportError
    from manifests.errors import DeployError

    return (ExportError, AgentError, RouterError, DeployError)


def run() -> None:
    """Console-script entry point: errors the project raises on purpose become one red line
    and exit code 1 (usage errors are Typer's exit code 2); `--debug` shows the traceback."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("Aborted.", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        import click

        # typer 0.29 vendors click (typer._click): its usage errors are TyperExceptions.
        if isinstance(exc, (click.ClickException, typer.TyperException)) and hasattr(exc, "show"):
            exc.show()
            sys.exit(exc.exit_code)
        if os.environ.get("EDGEGEN_DEBUG") or not isinstance(exc, _known_errors()):
            raise
        from rich.console import Console
        from rich.markup import escape

        # escape: messages quote user input and lists ("['LlamaForCausalLM']", "edgegen[gpu]")
        # that rich would otherwise read as markup; soft_wrap keeps the error on one line.
        Console(stderr=True, soft_wrap=True).print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True
        )
        sys.exit(1)


if __name__ == "__main__":
    run()
