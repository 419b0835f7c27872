"""`edgegen registry`: the embedded Consul-compatible service registry."""

from __future__ import annotations

from pathlib import Path

import typer


def registry(
    port: int = typer.Option(8500, "--port", help="Port of the HTTP API (Consul's default)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    data_dir: Path = typer.Option(
        None, "--data-dir",
        help="Keep the registry's state here so that a restart does not forget the fleet.",
    ),
    min_deregister_after: float = typer.Option(
        60.0, "--min-deregister-after", hidden=True,
        help="Floor (seconds) for DeregisterCriticalServiceAfter; Consul's is one minute.",
    ),
) -> None:
    """Run a service registry that speaks Consul's HTTP API (the part edgegen uses).

    Agents register with it and the router watches it exactly as they would a real Consul.
    """
    from cloud_router.registry.http import serve

    serve(host, port, str(data_dir) if data_dir else None,
          min_deregister_after=min_deregister_after)


def register(app: typer.Typer) -> None:
    """Add `edgegen registry` to the `edgegen` app."""
    app.command("registry")(registry)
