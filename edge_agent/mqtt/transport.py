"""A paho client set up for a broker address: protocol, credentials, TLS, TCP_NODELAY. Shared
by the bridge (agent side) and the device client so both connect the same way and translate
TLS set-up failures into ``MqttConfigError`` in one place."""

from __future__ import annotations

import socket
import ssl

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edge_agent.errors import MqttConfigError
from edge_agent.mqtt.contract import BrokerAddress


def make_client(broker: BrokerAddress, client_id: str, *, ca_file: str | None = None,
                v311: bool = False, clean_session: bool = True) -> paho.Client:
    """A paho client (callback API v2) for ``broker``; MQTT v5 unless ``v311``.
    ``clean_session`` applies to 3.1.1 only (v5 sets clean_start when connecting)."""
    if v311:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv311, clean_session=clean_session)
    else:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv5)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        try:
            client.tls_set(ca_certs=ca_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise MqttConfigError(
                f"cannot use CA file {ca_file!r} for {broker.redacted()}: {exc}") from exc
    elif ca_file:
        raise MqttConfigError(f"a CA file was given but {broker.redacted()} is not mqtts://")
    client.on_socket_open = _no_delay
    return client


def _no_delay(client, userdata, sock) -> None:
    """Turn Nagle off: a PUBACK followed by a small reply would otherwise wait for the peer's
    delayed ACK (~40 ms on Linux) before the first chunk leaves."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass
