"""`edgegen up`: a whole local fleet on this machine, for trying edgegen out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cli.deploy import MQTT_ANONYMOUS_HELP

console = Console()


def up(
    cluster: Path = typer.Option(None, "--cluster", help="Cluster file (YAML nodes: name, "
                                 "region, zone, lat, lon, tier); default: 3 edges + 1 central."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle directory (default: the newest "
                                "in the store)."),
    router_port: int = typer.Option(8080, "--router-port"),
    registry_port: int = typer.Option(8500, "--registry-port"),
    mqtt_port: int = typer.Option(1883, "--mqtt-port"),
    mqtt_anonymous: bool = typer.Option(False, "--mqtt-anonymous", help=MQTT_ANONYMOUS_HELP),
    demo: bool = typer.Option(False, "--demo", "--once", help="When ready, ask one question "
                              "through the router and one over MQTT, print both, exit."),
) -> None:
    """Start the registry, an MQTT broker, edge agents in three regions, a central agent
    and the router; Ctrl-C stops everything."""
    from edge_agent.bundle import default_store
    from manifests.bundle_ref import newest_bundle
    from manifests.fleet import FleetOptions, run_fleet

    if bundle is None:
        bundle = newest_bundle(default_store()).path
    run_fleet(FleetOptions(cluster=cluster, bundle=str(bundle), router_port=router_port,
                           registry_port=registry_port, mqtt_port=mqtt_port,
                           mqtt_anonymous=mqtt_anonymous),
              console=console, demo=demo)


def register(app: typer.Typer) -> None:
    app.command("up")(up)
