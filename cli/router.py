"""`edgegen router`: run the cloud router, or write a Traefik configuration for the fleet.

A Typer group whose callback runs the router when no subcommand is given, so both
`edgegen router --consul URL --port P` and `edgegen router traefik-config` work.
"""

from __future__ import annotations

from pathlib import Path

import typer

router_app = typer.Typer(help="The cloud router: nearest healthy edge, retries, central "
                              "fallback.", invoke_without_command=True)

# Consul's own names (CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE) for the token, as its CLI.
CONSUL_TOKEN_HELP = ("Consul ACL token for every read (default $CONSUL_HTTP_TOKEN). A literal "
                     "here is visible in `ps`: prefer --consul-token-file or the variable.")
CONSUL_TOKEN_FILE_HELP = ("File holding the Consul ACL token (default $CONSUL_HTTP_TOKEN_FILE); "
                          "it wins over --consul-token, as in Consul's CLI.")


@router_app.callback()
def router(
    ctx: typer.Context,
    consul: str = typer.Option("http://127.0.0.1:8500", "--consul", envvar="EDGEGEN_CONSUL",
                               help="Consul (or `edgegen registry`) HTTP address."),
    port: int = typer.Option(8080, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    region: str = typer.Option("", "--region",
                               help="Region hint for requests that carry none."),
    api_keys: Path = typer.Option(None, "--api-keys", exists=True, dir_okay=False,
                                  help="File of API keys, one per line; without it, no auth."),
    near: str = typer.Option(None, "--near", help="Consul node to sort endpoints by RTT from."),
    nearest_few: int = typer.Option(2, "--nearest-few", min=1,
                                    help="How many near endpoints to balance load among."),
    placement: str = typer.Option(
        "cache", "--placement",
        help="cache: among the nearest endpoints, weigh each one's reported queue and the "
             "prompt prefix it last served (README: Discovery and routing); nearest: nearness "
             "and in-flight requests only."),
    max_attempts: int = typer.Option(3, "--max-attempts", min=1,
                                     help="Tries per request, each on another endpoint."),
    retry_budget: float = typer.Option(0.2, "--retry-budget", min=0.0, max=1.0,
                                       help="Retries as a share of recent requests."),
    max_ejection_share: float = typer.Option(0.5, "--max-ejection-share", min=0.0, max=1.0,
                                             help="Most of a tier outlier ejection may take "
                                                  "out of service."),
    consul_token: str = typer.Option(None, "--consul-token", envvar="CONSUL_HTTP_TOKEN",
                                     show_envvar=False, help=CONSUL_TOKEN_HELP),
    consul_token_file: Path = typer.Option(None, "--consul-token-file",
                                           envvar="CONSUL_HTTP_TOKEN_FILE", show_envvar=False,
                                           dir_okay=False, help=CONSUL_TOKEN_FILE_HELP),
    fleet_key_file: Path = typer.Option(
        None, "--fleet-key-file", envvar="EDGEGEN_FLEET_KEY_FILE", dir_okay=False,
        help="The fleet key the agents were given: route only to endpoints that prove they "
             "hold it (GET /edgegen/v1/identity). Without it, every endpoint in Consul is "
             "trusted. $EDGEGEN_FLEET_KEY may hold the key itself."),
    fleet_key: str = typer.Option(None, "--fleet-key", envvar="EDGEGEN_FLEET_KEY",
                                  hidden=True, help="The fleet key itself (visible in `ps`)."),
    identity_recheck: float = typer.Option(30.0, "--identity-recheck", min=1.0,
                                           help="Seconds between identity re-checks of a "
                                                "verified endpoint (with a fleet key)."),
    workers: int = typer.Option(
        1, "--workers", min=1, max=64,
        help="Router processes on the port (SO_REUSEPORT), one per core to use; each keeps "
             "its own table and policy state, the metrics count them all."),
) -> None:
    """Serve the OpenAI API and forward each request to the best endpoint in Consul."""
    if ctx.invoked_subcommand is not None:
        return
    from cloud_router.auth import load_api_keys
    from cloud_router.credentials import consul_token as read_token
    from cloud_router.credentials import fleet_key as read_fleet_key
    from cloud_router.forwarding import ForwardConfig
    from cloud_router.identity import IdentityConfig
    from cloud_router.policy import PLACEMENTS, PolicyConfig
    from cloud_router.server import serve
    from cloud_router.settings import RouterSettings
    from cloud_router.stats import EjectionConfig

    if placement not in PLACEMENTS:
        raise typer.BadParameter(f"must be one of {', '.join(PLACEMENTS)}",
                                 param_hint="--placement")
    settings = RouterSettings(
        consul=consul, host=host, port=port, region=region, near=near,
        api_keys=load_api_keys(api_keys) if api_keys else frozenset(),
        policy=PolicyConfig(nearest_few=nearest_few, placement=placement),
        ejection=EjectionConfig(max_ejection_share=max_ejection_share),
        forward=ForwardConfig(max_attempts=max_attempts), retry_budget_ratio=retry_budget,
        consul_token=read_token(consul_token, consul_token_file),
        fleet_key=read_fleet_key(fleet_key, fleet_key_file),
        identity=IdentityConfig(recheck_s=identity_recheck))
    if workers == 1:
        serve(settings)
        return
    import functools
    import logging

    from cli.logs import setup_logging
    from cloud_router.workers import run_workers

    level = logging.getLevelName(logging.getLogger().level)   # as the parent's, set by main
    run_workers(settings, workers, functools.partial(setup_logging, level))


@router_app.command("traefik-config")
def traefik_config(
    consul: str = typer.Option("http://127.0.0.1:8500", "--consul", envvar="EDGEGEN_CONSUL",
                               help="Consul (or `edgegen registry`) HTTP address."),
    output: Path = typer.Option(None, "--output", "-o",
                                help="Write the YAML here (default: standard output)."),
    consul_token: str = typer.Option(None, "--consul-token", envvar="CONSUL_HTTP_TOKEN",
                                     show_envvar=False, help=CONSUL_TOKEN_HELP),
    consul_token_file: Path = typer.Option(None, "--consul-token-file",
                                           envvar="CONSUL_HTTP_TOKEN_FILE", show_envvar=False,
                                           dir_okay=False, help=CONSUL_TOKEN_FILE_HELP),
) -> None:
    """Write a Traefik dynamic configuration (YAML) for the endpoints in Consul now."""
    import asyncio

    from cloud_router.credentials import consul_token as read_token
    from cloud_router.discovery import read_endpoints
    from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE
    from cloud_router.traefik import traefik_yaml

    text = traefik_yaml(asyncio.run(read_endpoints(
        consul, (EDGE_SERVICE, CENTRAL_SERVICE),
        token=read_token(consul_token, consul_token_file))))
    if output:
        output.write_text(text)
    else:
        typer.echo(text, nl=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `edgegen` app."""
    app.add_typer(router_app, name="router")
