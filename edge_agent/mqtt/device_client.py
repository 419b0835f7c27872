"""A device-side MQTT chat client: what `edgegen mqtt chat` uses, and an example for devices.

It owns the device's connection to the broker (paho) and translates paho's failures into
``MqttError``s. Requests carry their reply route as MQTT v5 properties (Response Topic +
Correlation Data), or, with ``v311=True``, as ``reply_to``/``correlation_id`` in the JSON body.
Replies for every request arrive on one topic per client, ``edgegen/v1/reply/<client id>``
(the only one the broker's ACL lets this client read), and are sorted by correlation id.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import uuid
from typing import Iterator

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import (
    MqttConfigError,
    MqttConnectError,
    MqttReplyError,
    MqttTimeout,
)
from edge_agent.mqtt.contract import (
    in_reply_namespace,
    is_final,
    parse_broker_url,
    reply_topic,
    request_topic,
    with_credentials,
)
from edge_agent.mqtt.transport import make_client

log = logging.getLogger(__name__)


class MqttChatClient:
    """Connect with ``connect()`` (or ``with``), then ``chat()``; or ``send()`` many requests and
    read each one's ``replies()``.

    ``session_expiry`` > 0 keeps the session (and the reply subscription) on the broker across
    reconnects, so replies sent while the link was down are delivered afterwards.
    ``username``/``password`` win over the broker URL's user info (which ``ps`` shows).
    """

    def __init__(self, broker: str, *, ca_file: str | None = None, v311: bool = False,
                 client_id: str | None = None, session_expiry: int = 0,
                 connect_timeout: float = 10.0, username: str | None = None,
                 password: str | None = None):
        self.broker = with_credentials(parse_broker_url(broker), username, password)
        self.v311 = v311
        self.client_id = client_id or f"edgegen-device-{uuid.uuid4().hex[:12]}"
        self.reply_topic = reply_topic(self.client_id)
        if not in_reply_namespace(self.reply_topic) or any(c in self.client_id for c in "+#"):
            raise MqttConfigError(f"client id {self.client_id!r} cannot name a reply topic "
                                  "(no '+' or '#', and not 'chat')")
        self.connect_timeout = connect_timeout
        persistent = session_expiry > 0
        self._client = make_client(self.broker, self.client_id, ca_file=ca_file, v311=v311,
                                   clean_session=not persistent)
        self._connect_args: dict = {}
        if not v311:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
            self._connect_args = {"clean_start": not persistent, "properties": props}
        self._client.reconnect_delay_set(1, 10)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._ready = threading.Event()
        self._refused: str | None = None
        self._waiting: dict[str, queue.Queue] = {}
        self.answered_by: dict[str, str] = {}   # correlation id -> node (v5 user property)
        self._lock = threading.Lock()

    # --- connection ---------------------------------------------------------------------------

    def connect(self) -> "MqttChatClient":
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=30,
                                 **self._connect_args)
        except (OSError, ssl.SSLError) as exc:
            raise MqttConnectError(
                f"cannot connect to MQTT broker {self.broker.redacted()}: {exc}") from exc
        self._client.loop_start()
        if not self._ready.wait(self.connect_timeout) or self._refused:
            self._client.disconnect()
            self._client.loop_stop()
            reason = self._refused or f"no answer within {self.connect_timeout:g}s"
            hint = (" (check the user name and password: --mqtt-username, "
                    "--mqtt-password-file or EDGEGEN_MQTT_PASSWORD)"
                    if reason in ("Not authorized", "Bad user name or password") else "")
            raise MqttConnectError(
                f"MQTT broker {self.broker.redacted()} refused the connection: {reason}{hint}")
        return self

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> "MqttChatClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- requests -----------------------------------------------------------------------------

    def send(self, body: dict, *, node: str | None = None) -> str:
        """Publish one chat request (QoS 1); return its correlation id for ``replies()``."""
        correlation = uuid.uuid4().hex
        with self._lock:
            self._waiting[correlation] = queue.Queue()
        if self.v311:
            payload = {**body, "reply_to": self.reply_topic, "correlation_id": correlation}
            props = None
        else:
            payload = body
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation.encode()
            props.UserProperty = ("client_id", self.client_id)
        info = self._client.publish(request_topic(node), json.dumps(payload), qos=1,
                                    properties=props)
        if info.rc == paho.MQTT_ERR_QUEUE_SIZE:
            raise MqttConnectError("the MQTT client's outgoing queue is full")
        return correlation

    def replies(self, correlation: str, *, timeout: float = 120.0,
                raise_errors: bool = True) -> Iterator[dict]:
        """Yield the replies to one request up to and including the final one. ``timeout`` is
        the longest wait for the next reply. An error reply raises MqttReplyError (or is
        yielded, with ``raise_errors=False``)."""
        q = self._waiting[correlation]
        try:
            while True:
                try:
                    message = q.get(timeout=timeout)
                except queue.Empty:
                    raise MqttTimeout(
                        f"no reply from an agent within {timeout:g}s (is an agent subscribed "
                        f"on {self.broker.redacted()}?)") from None
                if "error" in message and raise_errors:
                    raise MqttReplyError(message["error"] if isinstance(message["error"], dict)
                                         else {"message": str(message["error"])})
                yield message
                if is_final(message):
                    return
        finally:
            with self._lock:
                self._waiting.pop(correlation, None)

    def chat(self, body: dict, *, node: str | None = None,
             timeout: float = 120.0) -> Iterator[dict]:
        """Send one request and yield its replies (chunks, then the final one)."""
        return self.replies(self.send(body, node=node), timeout=timeout)

    # --- paho callbacks (paho's network thread) -----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
            self._ready.set()
            return
        client.subscribe(self.reply_topic, qos=1)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:     # a broker that checks subscriptions against its ACL says so here
            self._refused = f"subscription to {self.reply_topic} refused ({', '.join(refused)})"
        self._ready.set()

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        try:
            message = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            log.warning("unreadable MQTT reply ignored", extra={"topic": msg.topic})
            return
        if not isinstance(message, dict):
            return
        if self.v311:
            correlation = message.pop("correlation_id", None)
        else:
            data = getattr(msg.properties, "CorrelationData", None)
            correlation = data.decode("utf-8", "replace") if data else None
        with self._lock:
            q = self._waiting.get(str(correlation)) if correlation is not None else None
        if q is None:
            return
        node = dict(getattr(msg.properties, "UserProperty", None) or ()).get("x-edgegen-node")
        if node:
            self.answered_by[str(correlation)] = node
        q.put(message)

