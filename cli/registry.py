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
    acl_file: Path = typer.Option(
        None, "--acl-file", envvar="EDGEGEN_REGISTRY_ACL_FILE", dir_okay=False,
        help="Turn Consul's ACLs on: tokens and their rules (YAML or JSON, see the README). "
             "Without it, anyone who reaches the registry may register and deregister.",
    ),
) -> None:
    """Run a service registry that speaks Consul's HTTP API (the part edgegen uses).

    Agents register with it and the router watches it exactly as they would a real Consul.
    """
    from cloud_router.registry.http import serve

    serve(host, port, str(data_dir) if data_dir else None,
          min_deregister_after=min_deregister_after,
          acl_file=str(acl_file) if acl_file else None)


def register(app: typer.Typer) -> None:
    """Add `edgegen registry` to the `edgegen` app."""
    app.command("registry")(registry)
