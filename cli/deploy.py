"""`edgegen deploy`, `edgegen rollback`, `edgegen status`: options in, library calls out."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.rollout import (
    BAKE,
    GATES,
    GROUPS,
    INCONCLUSIVE,
    PROMETHEUS,
    TOKEN,
    TOKEN_FILE,
    WAVES,
    rollout_options,
)

console = Console()


# Devices log in to the edge brokers unless this opt-in says otherwise (README: Devices: MQTT).
MQTT_ANONYMOUS_HELP = ("Let devices connect to the MQTT broker without a password (the topic "
                       "ACL still applies). Off by default.")


def config_options(bundle, bundle_url, target, namespace, nodes, max_unavailable, image,
                   consul_address, central=True, mqtt=True, mqtt_anonymous=False):
    """Build the DeployConfig the flags describe (shared with `edgegen manifests render`)."""
    from manifests.bundle_ref import bundle_ref
    from manifests.render import (
        DEFAULT_IMAGE,
        DeployConfig,
        check_config,
        parse_selector,
    )

    cfg = DeployConfig(
        bundle=bundle_ref(bundle, bundle_url, target),
        namespace=namespace,
        image=image or DEFAULT_IMAGE,
        node_selector=parse_selector(nodes),
        max_unavailable=str(max_unavailable),
        consul_address=consul_address,
        central=central,
        mqtt=mqtt,
        mqtt_anonymous=mqtt_anonymous,
    )
    check_config(cfg)
    return cfg


def progress_table(decision) -> Table:
    t = Table(title=f"rollout: {decision.reason}", title_justify="left")
    for col in ("node", "bundle", "state", "detail"):
        t.add_column(col)
    style = {"ready": "green", "crash-looping": "red", "old bundle": "dim"}
    for n in decision.nodes:
        t.add_row(n.node, n.digest[:12], f"[{style.get(n.phase, 'yellow')}]{n.phase}[/]",
                  n.detail)
    return t


class _LiveProgress:
    """A live table while the rollout is watched: per pod while the edge DaemonSet comes up,
    per wave and node while a bundle goes out through the fleet's desired state."""

    def __init__(self):
        self.live = Live(Table(title="rollout: applying"), console=console,
                         refresh_per_second=4, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        return self.live.__exit__(*exc)

    def __call__(self, progress) -> None:
        from cli.rollout import view_table
        from manifests.fleet_rollout import RolloutView

        self.live.update(view_table(progress.to_dict()) if isinstance(progress, RolloutView)
                         else progress_table(progress))


def _fleet(client, cfg, consul, token, token_file, prometheus, options):
    from cloud_router.credentials import consul_token
    from manifests.deploy import fleet_access

    return fleet_access(client, cfg, options, consul=consul,
                        token=consul_token(token, token_file), prometheus=prometheus)


CONSUL_K3S = typer.Option(None, "--consul", help="k3s: the Consul the agents follow (default: "
                          "--consul-address, else the cluster's through the API server's "
                          "service proxy).")


def deploy(
    bundle: str = typer.Argument(..., help="Bundle directory to deploy."),
    target: str = typer.Option("k3s", "--target", help="k3s, or local (processes here)."),
    kubeconfig: str = typer.Option(None, "--kubeconfig", help="Path to the kubeconfig."),
    context: str = typer.Option(None, "--context", help="kubeconfig context to use."),
    namespace: str = typer.Option("edgegen", "--namespace", "-n"),
    nodes: str = typer.Option(None, "--nodes",
                              help="Extra labels edge nodes must have: k=v,k2=v2."),
    max_unavailable: str = typer.Option("1", "--max-unavailable",
                                        help="Nodes (or %) updated at once."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for the rollout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the rendered YAML and exit."),
    image: str = typer.Option(None, "--image", help="Container image with edgegen."),
    bundle_url: str = typer.Option(None, "--bundle-url",
                                   help="Where the nodes pull the bundle from (k3s)."),
    consul_address: str = typer.Option(None, "--consul-address",
                                       help="Use an existing Consul instead of installing one."),
    central: bool = typer.Option(True, "--central/--no-central",
                                 help="Also deploy the central GPU tier."),
    mqtt: bool = typer.Option(True, "--mqtt/--no-mqtt", help="A Mosquitto broker per edge node."),
    mqtt_anonymous: bool = typer.Option(False, "--mqtt-anonymous", help=MQTT_ANONYMOUS_HELP),
    force_conflicts: bool = typer.Option(False, "--force-conflicts",
                                         help="Take over fields other managers own."),
    cluster: Path = typer.Option(None, "--cluster",
                                 help="local: cluster file (YAML nodes); default: built in."),
    router_port: int = typer.Option(8080, "--router-port", help="local: the router's port."),
    registry_port: int = typer.Option(8500, "--registry-port",
                                      help="local: the embedded registry's port."),
    mqtt_port: int = typer.Option(1883, "--mqtt-port", help="local: the MQTT broker's port."),
    consul: str = CONSUL_K3S, consul_token: str = TOKEN, consul_token_file: Path = TOKEN_FILE,
    waves: str = WAVES, groups: str = GROUPS, bake: float = BAKE, gates: str = GATES,
    inconclusive: str = INCONCLUSIVE, prometheus: str = PROMETHEUS,
) -> None:
    """Deploy a bundle to K3s edge nodes, or run the same container specs as local processes
    with --target local. On K3s the first deploy starts the edge pods; later bundles go out in
    waves with health gates through the nodes' desired state in Consul (pre-pulled, hot-swapped,
    rolled back from each node's cache on a failed gate): K3s restarts nothing."""
    from manifests.render import render, to_yaml

    if target not in ("k3s", "local"):
        raise typer.BadParameter("--target must be k3s or local")
    cfg = config_options(bundle, bundle_url, target, namespace, nodes, max_unavailable,
                         image, consul_address, central, mqtt and target == "k3s",
                         mqtt_anonymous)
    if dry_run:
        typer.echo(to_yaml(render(cfg)), nl=False)
        return
    if target == "local":
        from manifests.fleet import FleetOptions, run_fleet

        run_fleet(FleetOptions(cluster=cluster, bundle=bundle, router_port=router_port,
                               registry_port=registry_port, mqtt_port=mqtt_port,
                               mqtt_anonymous=mqtt_anonymous, deploy_config=cfg),
                  console=console)
        return
    from manifests.deploy import deploy as do_deploy
    from manifests.kube import KubeClient

    client = KubeClient.connect(kubeconfig, context)
    console.print(f"deploying {cfg.bundle.name} {cfg.bundle.digest[:12]} to "
                  f"{client.description}, namespace {cfg.namespace}")
    fleet = _fleet(client, cfg, consul, consul_token, consul_token_file, prometheus,
                   rollout_options(waves, groups, bake, gates, inconclusive))
    with _LiveProgress() as progress:
        do_deploy(client, cfg, timeout, progress, force_conflicts, fleet)
    console.print(f"[green]rolled out[/] {cfg.bundle.name} {cfg.bundle.digest[:12]}")


def rollback(
    kubeconfig: str = typer.Option(None, "--kubeconfig"),
    context: str = typer.Option(None, "--context"),
    namespace: str = typer.Option("edgegen", "--namespace", "-n"),
    timeout: float = typer.Option(600.0, "--timeout"),
    force_conflicts: bool = typer.Option(False, "--force-conflicts"),
    consul: str = CONSUL_K3S, consul_token: str = TOKEN, consul_token_file: Path = TOKEN_FILE,
    bake: float = BAKE, gates: str = GATES, prometheus: str = PROMETHEUS,
) -> None:
    """Roll the edge nodes back to the bundle served before the current one (from their own
    disks: no download), in waves like a deploy."""
    from manifests.deploy import read_deployed
    from manifests.deploy import rollback as do_rollback
    from manifests.kube import KubeClient

    client = KubeClient.connect(kubeconfig, context)
    state = read_deployed(client, namespace)
    fleet = None if state is None else _fleet(
        client, state.config, consul, consul_token, consul_token_file, prometheus,
        rollout_options(None, None, bake, gates, "promote"))
    with _LiveProgress() as progress:
        target, _ = do_rollback(client, namespace, timeout, progress, force_conflicts, fleet)
    console.print(f"[green]rolled back[/] to {target.name} {target.digest[:12]}")


def status(
    target: str = typer.Option("k3s", "--target", help="k3s, or local (asks the registry)."),
    kubeconfig: str = typer.Option(None, "--kubeconfig"),
    context: str = typer.Option(None, "--context"),
    namespace: str = typer.Option("edgegen", "--namespace", "-n"),
    consul: str = typer.Option(None, "--consul",
                               help="The registry (Consul API) to ask (local: default "
                                    "http://127.0.0.1:8500; k3s: default the cluster's)."),
    consul_token: str = typer.Option(
        None, "--consul-token", envvar="CONSUL_HTTP_TOKEN", show_envvar=False,
        help="local: Consul ACL token to read with (default $CONSUL_HTTP_TOKEN; a literal "
             "here is visible in `ps`)."),
    consul_token_file: Path = typer.Option(
        None, "--consul-token-file", envvar="CONSUL_HTTP_TOKEN_FILE", show_envvar=False,
        dir_okay=False, help="local: file holding the Consul ACL token (default "
        "$CONSUL_HTTP_TOKEN_FILE); it wins over --consul-token."),
) -> None:
    """Every node: its tier, bundle digest and readiness."""
    if target == "local":
        from cloud_router.credentials import consul_token as read_token
        from manifests.local_status import registry_status

        rows = registry_status(consul or "http://127.0.0.1:8500",
                               token=read_token(consul_token, consul_token_file))
    elif target == "k3s":
        from manifests.deploy import cluster_status, read_deployed
        from manifests.fleet_rollout import RolloutOptions
        from manifests.kube import KubeClient

        client = KubeClient.connect(kubeconfig, context)
        state = read_deployed(client, namespace)
        fleet = None if state is None else _fleet(client, state.config, consul, consul_token,
                                                  consul_token_file, None, RolloutOptions())
        rows = cluster_status(client, namespace, fleet.kv if fleet else None)
    else:
        raise typer.BadParameter("--target must be k3s or local")
    t = Table(title=f"edgegen agents ({target})", title_justify="left")
    for col in ("node", "tier", "bundle", "ready", "address", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(r.node, r.tier, r.bundle, "[green]yes[/]" if r.ready else "[red]no[/]",
                  r.address, r.detail)
    console.print(t)
    if not rows:
        console.print("no agents found")


def register(app: typer.Typer) -> None:
    app.command("deploy")(deploy)
    app.command("rollback")(rollback)
    app.command("status")(status)
