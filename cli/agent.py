"""`edgegen agent`: serve one bundle on this node (OpenAI API, /metrics, Consul, MQTT)."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def agent(
    bundle: str = typer.Option(..., "--bundle", help="Bundle directory, or an http(s) URL to "
                               "fetch it from (cached in --store; works offline once cached)."),
    node: str = typer.Option(..., "--node", help="This node's name."),
    tier: str = typer.Option("edge", "--tier", help="edge or central."),
    region: str = typer.Option("", "--region"),
    zone: str = typer.Option("", "--zone"),
    lat: float = typer.Option(None, "--lat"),
    lon: float = typer.Option(None, "--lon"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or tensorrt."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads (default: all cores)."),
    max_concurrency: int = typer.Option(4, "--max-concurrency", help="Sequences decoded together."),
    queue_size: int = typer.Option(16, "--queue-size", help="Requests that may wait; more get 429."),
    max_tokens_default: int = typer.Option(256, "--max-tokens-default"),
    stream_interval_ms: int = typer.Option(
        20, "--stream-interval-ms", min=0,
        help="Streaming: after a sequence's first token, hand its new tokens to the client "
             "every this many ms (0: after every step). Each SSE event is still one token; "
             "fewer writes save CPU on small nodes."),
    prefix_cache_mb: int = typer.Option(
        256, "--prefix-cache-mb", min=0,
        help="RAM for the prefix cache: the KV of prompt prefixes (system prompts, chat "
             "history) that later requests starting with the same tokens reuse instead of "
             "reading again; least recently used blocks go first. 0 turns it off."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout",
                                        help="Seconds in-flight requests get on SIGTERM."),
    store: Path = typer.Option(None, "--store", help="Bundle cache (default: $EDGEGEN_STORE or "
                               "~/.cache/edgegen/bundles)."),
    admin_token: str = typer.Option(None, "--admin-token", envvar="EDGEGEN_ADMIN_TOKEN",
                                    help="Bearer token for POST /edgegen/v1/bundle (hot swap)."),
    consul: str = typer.Option(None, "--consul", help="Consul address to register in."),
    follow: bool = typer.Option(
        False, "--follow", help="Serve this node's desired bundle from Consul's KV store "
        "(fleet rollouts: fetched in the background, swapped when its wave says so); a "
        "restart serves the bundle served last, from the store. Needs --consul."),
    consul_token: str = typer.Option(
        None, "--consul-token", envvar="CONSUL_HTTP_TOKEN", show_envvar=False,
        help="Consul ACL token with service:write on this agent's service (default "
             "$CONSUL_HTTP_TOKEN). A literal here is visible in `ps`: prefer a file."),
    consul_token_file: Path = typer.Option(
        None, "--consul-token-file", envvar="CONSUL_HTTP_TOKEN_FILE", show_envvar=False,
        dir_okay=False, help="File holding the Consul ACL token (default "
        "$CONSUL_HTTP_TOKEN_FILE); it wins over --consul-token, as in Consul's CLI."),
    fleet_key_file: Path = typer.Option(
        None, "--fleet-key-file", envvar="EDGEGEN_FLEET_KEY_FILE", dir_okay=False,
        help="The fleet key routers check this agent with (GET /edgegen/v1/identity); "
             "$EDGEGEN_FLEET_KEY may hold the key itself."),
    fleet_key: str = typer.Option(None, "--fleet-key", envvar="EDGEGEN_FLEET_KEY", hidden=True,
                                  help="The fleet key itself (visible in `ps`)."),
    mqtt: str = typer.Option(None, "--mqtt", help="mqtt[s]://host:port of the device broker."),
    mqtt_ca_file: str = typer.Option(None, "--mqtt-ca-file"),
    mqtt_username: str = typer.Option(None, "--mqtt-username", envvar="EDGEGEN_MQTT_USERNAME",
                                      help="MQTT user (edgegen's brokers: edgegen-agent)."),
    mqtt_password_file: Path = typer.Option(
        None, "--mqtt-password-file",
        help="File holding the MQTT password (else $EDGEGEN_MQTT_PASSWORD; a password in the "
             "--mqtt URL shows in ps)."),
    mqtt_coalesce_ms: int = typer.Option(50, "--mqtt-coalesce-ms", min=0,
                                         help="MQTT streaming: send a message at least this often."),
    mqtt_coalesce_tokens: int = typer.Option(8, "--mqtt-coalesce-tokens", min=1,
                                             help="MQTT streaming: ... or after this many tokens."),
    mqtt_max_payload: int = typer.Option(256 * 1024, "--mqtt-max-payload", min=1,
                                         help="Largest MQTT request accepted, in bytes."),
    advertise_host: str = typer.Option(None, "--advertise-host",
                                       help="Address others reach this agent at."),
    max_body_bytes: int = typer.Option(2 * 1024 * 1024, "--max-body-bytes", min=1024,
                                       help="Largest HTTP request body accepted (larger: 413)."),
    trust_key: list[Path] = typer.Option(
        None, "--trust-key", help="Public key (PEM, from `edgegen bundle keygen`) or a directory "
        "of *.pub keys; repeatable. The bundle, and every hot-swapped one, must be signed by "
        "one of them. Without it bundles are not signature-checked."),
) -> None:
    """Serve a bundle with an OpenAI-compatible API."""
    from edge_agent.hugepages import reexec_with_hugepages

    reexec_with_hugepages()  # once, before anything is loaded (EDGEGEN_HUGEPAGES=0: off)
    from edge_agent.runner import prepare, run_agent
    from edge_agent.settings import AgentSettings

    if tier not in ("edge", "central"):
        raise typer.BadParameter("must be edge or central", param_hint="--tier")
    from edge_agent.mqtt.credentials import resolve_password

    mqtt_password = resolve_password(mqtt_password_file and str(mqtt_password_file), os.environ)
    extra = {"store": store} if store else {}
    from cloud_router.credentials import consul_token as read_token
    from cloud_router.credentials import fleet_key as read_fleet_key

    extra.update(consul_token=read_token(consul_token, consul_token_file),
                 fleet_key=read_fleet_key(fleet_key, fleet_key_file))
    settings = AgentSettings(
        bundle=bundle, node=node, tier=tier, region=region, zone=zone, lat=lat, lon=lon,
        host=host, port=port, device=device, threads=threads, max_concurrency=max_concurrency,
        queue_size=queue_size, max_tokens_default=max_tokens_default,
        stream_interval_ms=stream_interval_ms, prefix_cache_mb=prefix_cache_mb,
        drain_timeout=drain_timeout, admin_token=admin_token, consul=consul, follow=follow, mqtt=mqtt,
        mqtt_ca_file=mqtt_ca_file, mqtt_username=mqtt_username, mqtt_password=mqtt_password,
        mqtt_coalesce_ms=mqtt_coalesce_ms,
        mqtt_coalesce_tokens=mqtt_coalesce_tokens, mqtt_max_payload=mqtt_max_payload,
        advertise_host=advertise_host, max_body_bytes=max_body_bytes,
        trust_keys=tuple(str(k) for k in trust_key or ()), **extra)
    run_agent(prepare(settings))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `edgegen` app."""
    app.command("agent")(agent)
