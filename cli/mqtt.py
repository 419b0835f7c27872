"""`edgegen mqtt`: talk to edge agents over MQTT the way a device would."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

mqtt_app = typer.Typer(help="Talk to edge agents over MQTT, as a device would.",
                       no_args_is_help=True)
err = Console(stderr=True, highlight=False)


@mqtt_app.command("chat")
def chat(
    prompt: str = typer.Argument(..., help="The user message."),
    broker: str = typer.Option(..., "--broker", envvar="EDGEGEN_MQTT_BROKER",
                               help="mqtt\\[s]://\\[user:pass@]host:port of the edge's broker."),
    node: str = typer.Option(None, "--node", help="Ask this node (default: any agent on the "
                             "broker, through the shared subscription)."),
    system: str = typer.Option(None, "--system", help="A system message first."),
    model: str = typer.Option(None, "--model", help="Model name (default: the agent's)."),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1),
    temperature: float = typer.Option(None, "--temperature", min=0.0),
    stream: bool = typer.Option(True, "--stream/--no-stream",
                                help="Print tokens as they arrive, or the whole answer at once."),
    v311: bool = typer.Option(False, "--v311", help="Speak MQTT 3.1.1 (reply route in the "
                              "JSON body) instead of v5."),
    ca_file: str = typer.Option(None, "--ca-file", help="CA certificate for mqtts://."),
    username: str = typer.Option(None, "--mqtt-username", envvar="EDGEGEN_MQTT_USERNAME",
                                 help="MQTT user (edgegen's brokers: edgegen-device)."),
    password_file: Path = typer.Option(
        None, "--mqtt-password-file", envvar="EDGEGEN_MQTT_PASSWORD_FILE",
        help="File holding the MQTT password (else $EDGEGEN_MQTT_PASSWORD; a password in the "
             "--broker URL shows in ps)."),
    client_id: str = typer.Option(None, "--client-id", help="MQTT client id (default: a new "
                                  "random one); replies come on edgegen/v1/reply/<client id>."),
    timeout: float = typer.Option(120.0, "--timeout", min=0.1,
                                  help="Seconds to wait for each reply message."),
    show_usage: bool = typer.Option(False, "--usage", help="Print token usage at the end."),
) -> None:
    """Send one chat request over MQTT and print the answer as it streams in."""
    from edge_agent.mqtt.contract import answer_text
    from edge_agent.mqtt.credentials import resolve_password
    from edge_agent.mqtt.device_client import MqttChatClient

    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    body: dict = {"messages": messages, "stream": stream}
    for key, value in (("model", model), ("max_tokens", max_tokens),
                       ("temperature", temperature)):
        if value is not None:
            body[key] = value
    usage = None
    password = resolve_password(password_file and str(password_file), os.environ)
    with MqttChatClient(broker, ca_file=ca_file, v311=v311, client_id=client_id,
                        username=username, password=password) as client:
        try:
            for reply in client.chat(body, node=node, timeout=timeout):
                sys.stdout.write(answer_text(reply))
                sys.stdout.flush()
                usage = reply.get("usage") or usage
        finally:            # end the answer's line, also before an error is printed
            sys.stdout.write("\n")
            sys.stdout.flush()
    if show_usage and usage:
        err.print(f"[dim]usage: {usage.get('prompt_tokens')} prompt + "
                  f"{usage.get('completion_tokens')} completion tokens[/]")


@mqtt_app.command("credentials")
def credentials(
    out: Path = typer.Option(..., "--out", "-o", help="Directory to write the files to "
                             "(created, mode 0700)."),
    namespace: str = typer.Option("edgegen", "--namespace", "-n",
                                  help="Namespace of the Secret (as `edgegen deploy`'s)."),
    force: bool = typer.Option(False, "--force", help="Replace credentials already there."),
) -> None:
    """New broker credentials for `edgegen deploy --target k3s`: random passwords for the
    agents and the devices, Mosquitto's hashed password file, the ACL, and the Secret
    edgegen-mqtt to apply before deploying. Every file is mode 0600."""
    from edge_agent.mqtt.credentials import (
        BrokerCredentials,
        device_instructions,
        write_broker_credentials,
    )
    from manifests.render import write_mqtt_secret

    if BrokerCredentials(out).agent_password_file.exists() and not force:
        raise typer.BadParameter(f"{out} already holds credentials (--force replaces them, "
                                 "and the devices then need the new password)",
                                 param_hint="--out")
    creds = write_broker_credentials(out)
    secret = write_mqtt_secret(creds, namespace)
    err.print(f"wrote {creds.passwd}, {creds.acl}, {creds.agent_password_file}, "
              f"{creds.device_password_file}", markup=False, soft_wrap=True)
    typer.echo(f"kubectl apply -f {secret}")
    for line in device_instructions(creds):
        err.print(line, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `edgegen` app."""
    app.add_typer(mqtt_app, name="mqtt")
