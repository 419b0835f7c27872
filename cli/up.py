"""`edgegen up`: a whole local fleet on this machine, for trying edgegen out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console()


def up(
    cluster: Path = typer.Option(None, "--cluster", help="Cluster file (YAML nodes: name, "
                                 "region, zone, lat, lon, tier); default: 3 edges + 1 central."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle directory (default: the newest "
                                "in the store)."),
    router_port: int = typer.Option(8080, "--router-port"),
    registry_port: int = typer.Option(8500, "--registry-port"),
    mqtt_port: int = typer.Option(1883, "--mqtt-port"),
    demo: bool = typer.Option(False, "--demo", "--once", help="When ready, ask one question "
                              "through the router and one over MQTT, print both, exit."),
) -> None:
    """Start the registry, an MQTT broker, edge agents in three regions, a central agent
    and the router; Ctrl-C stops everything."""
    from edge_agent.bundle import default_store, iter_bundles
    from manifests.errors import LocalFleetError
    from manifests.fleet import FleetOptions, run_fleet

    if bundle is None:
        found = next(iter(iter_bundles(default_store())), None)
        if found is None:
            raise LocalFleetError(
                f"no bundle in {default_store()}: export one first, e.g. "
                "`edgegen export HuggingFaceTB/SmolLM2-135M-Instruct --precision int8`, "
                "or pass --bundle")
        bundle = found.path
    run_fleet(FleetOptions(cluster=cluster, bundle=str(bundle), router_port=router_port,
                           registry_port=registry_port, mqtt_port=mqtt_port),
              console=console, demo=demo)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
