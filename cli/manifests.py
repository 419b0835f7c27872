"""`edgegen manifests render`: write the K3s manifests for a bundle to a folder."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.deploy import MQTT_ANONYMOUS_HELP, config_options

manifests_app = typer.Typer(help="Render the K3s manifests edgegen deploys.",
                            no_args_is_help=True)


@manifests_app.command("render")
def render_cmd(
    bundle: str = typer.Argument(..., help="Bundle directory."),
    out: Path = typer.Option(Path("edgegen-manifests"), "--out", "-o",
                             help="Folder to write (a Kustomize base)."),
    bundle_url: str = typer.Option(None, "--bundle-url",
                                   help="Where the nodes pull the bundle from (http/https)."),
    namespace: str = typer.Option("edgegen", "--namespace", "-n"),
    nodes: str = typer.Option(None, "--nodes", help="Extra edge-node labels, k=v,k2=v2."),
    max_unavailable: str = typer.Option("1", "--max-unavailable"),
    image: str = typer.Option(None, "--image", help="Container image with edgegen."),
    consul_address: str = typer.Option(None, "--consul-address",
                                       help="Use this Consul instead of installing one."),
    central: bool = typer.Option(True, "--central/--no-central",
                                 help="Render the central GPU Deployment."),
    mqtt: bool = typer.Option(True, "--mqtt/--no-mqtt", help="Render a broker per edge node."),
    mqtt_anonymous: bool = typer.Option(False, "--mqtt-anonymous", help=MQTT_ANONYMOUS_HELP),
) -> None:
    """Write one YAML file per object plus kustomization.yaml."""
    from manifests.render import render, write_manifests

    cfg = config_options(bundle, bundle_url, "k3s" if bundle_url else "local", namespace, nodes,
                         max_unavailable, image, consul_address, central, mqtt,
                         mqtt_anonymous)
    paths = write_manifests(render(cfg), out)
    typer.echo(f"wrote {len(paths)} files to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(manifests_app, name="manifests")
