"""The MQTT contract as pure functions: broker URLs, topics, request parsing, reply routing,
error payloads, and how a reply stream ends. No sockets, no clock, no paho: the bridge
(``bridge``) and the device client (``device_client``) do the I/O and call these.

Contract (DESIGN.md): requests on ``edgegen/v1/<node>/chat`` or the shared
``$share/edgegen/edgegen/v1/any/chat``; replies go to the MQTT v5 Response Topic with its
Correlation Data, or, for MQTT 3.1.1 clients, to ``reply_to`` with ``correlation_id`` taken
from (and echoed back in) the JSON body.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from edge_agent.errors import MqttConfigError
from edge_agent.serving.protocol import error_body

TOPIC_PREFIX = "edgegen/v1"
SHARE_GROUP = "edgegen"
ANY_NODE = "any"
BODY_ROUTE_FIELDS = ("reply_to", "correlation_id")


def node_topic(node: str) -> str:
    """Where requests for one node are published."""
    return f"{TOPIC_PREFIX}/{node}/chat"


def shared_topic() -> str:
    """The topic devices publish to when any agent on the broker may answer."""
    return node_topic(ANY_NODE)


def shared_subscription() -> str:
    """What agents subscribe to so the broker splits ``shared_topic()`` among them."""
    return f"$share/{SHARE_GROUP}/{shared_topic()}"


def request_topic(node: str | None) -> str:
    return node_topic(node) if node else shared_topic()


def valid_publish_topic(topic: Any) -> bool:
    """A topic a message may be published to: non-empty UTF-8 text without wildcards."""
    return (
        isinstance(topic, str) and 0 < len(topic.encode("utf-8", "surrogatepass")) <= 65535
        and not any(c in topic for c in "+#\x00")
    )


# --- broker URLs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerAddress:
    """A parsed ``mqtt[s]://[user:pass@]host[:port]``."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """The URL for logs: never the password."""
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse a broker URL; raise MqttConfigError naming what is wrong."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise MqttConfigError(f"bad MQTT broker URL {url!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise MqttConfigError(
            f"bad MQTT broker URL {url!r}: the scheme must be mqtt:// or mqtts://"
        )
    if not parts.hostname:
        raise MqttConfigError(f"bad MQTT broker URL {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise MqttConfigError(f"bad MQTT broker URL {url!r}: no path or query is allowed")
    tls = parts.scheme == "mqtts"
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


# --- requests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplyRoute:
    """Where the answers to one request go.

    ``in_body`` is true for MQTT 3.1.1 style routing: the correlation id is then echoed in
    every reply's JSON, since a 3.1.1 receiver sees no properties.
    """

    topic: str
    correlation: Any = None           # bytes (v5 Correlation Data) or a JSON value (3.1.1)
    in_body: bool = False


@dataclass(frozen=True)
class ChatRequest:
    body: dict
    reply: ReplyRoute | None


@dataclass(frozen=True)
class RejectedRequest:
    """A message that is not a servable request; answer ``error`` if ``reply`` is known."""

    error: dict
    reply: ReplyRoute | None
    code: str


def error_payload(status: int, message: str, code: str, *, param: str | None = None) -> dict:
    """OpenAI's error body, typed as the HTTP status ``status`` would be over REST (the same
    ``error_body`` as REST's, so a device and an HTTP client see the same error)."""
    return error_body(status, message, param=param, code=code)


def parse_request(payload: bytes, *, response_topic: str | None = None,
                  correlation_data: bytes | None = None,
                  max_payload: int) -> ChatRequest | RejectedRequest:
    """Turn one received message into a chat request, or a rejection with its reply route.

    A v5 Response Topic wins over body fields. Payloads over ``max_payload`` are not parsed at
    all, so only a v5 client (whose route is in the properties) hears about them.
    """
    reply = ReplyRoute(response_topic, correlation_data) if response_topic else None

    def reject(message: str, code: str, param: str | None = None, *,
               status: int = 400) -> RejectedRequest:
        return RejectedRequest(error_payload(status, message, code, param=param), reply, code)

    if len(payload) > max_payload:
        return reject(f"payload of {len(payload)} bytes is over this agent's limit of "
                      f"{max_payload} bytes", "payload_too_large", status=413)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return reject(f"payload is not valid UTF-8 (byte {exc.start})", "invalid_utf8")
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return reject(f"payload is not valid JSON: {exc}", "invalid_json")
    if not isinstance(body, dict):
        return reject("payload must be a JSON object (an OpenAI chat completion request)",
                      "not_a_chat_request")

    if reply is None and "reply_to" in body:
        if not valid_publish_topic(body["reply_to"]):
            # No usable route: nobody can be told, the caller counts it.
            return RejectedRequest(
                error_payload(400, "reply_to must be a topic name without wildcards",
                              "invalid_reply_to", param="reply_to"),
                None, "invalid_reply_to")
        correlation = body.get("correlation_id")
        if isinstance(correlation, (dict, list)):
            correlation = None
        reply = ReplyRoute(body["reply_to"], correlation, in_body=True)
    for key in BODY_ROUTE_FIELDS:
        body.pop(key, None)

    if not isinstance(body.get("messages"), list):
        return reject("not a chat completion request: 'messages' must be a list of messages",
                      "not_a_chat_request", "messages")
    return ChatRequest(body, reply)


def reply_bytes(message: dict, route: ReplyRoute) -> bytes:
    """Serialise one reply; 3.1.1 routes get their correlation id in the body."""
    if route.in_body and route.correlation is not None:
        message = {**message, "correlation_id": route.correlation}
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


# --- streaming -------------------------------------------------------------------------------

def is_final(message: dict) -> bool:
    """Whether a reply ends its request: an error, a whole completion, or the stream's last
    chunk (the only one the bridge sends with ``usage``)."""
    return (
        "error" in message
        or message.get("object") == "chat.completion"
        or message.get("usage") is not None
    )


def answer_text(message: dict) -> str:
    """The text a reply adds to the answer (first choice): a chunk's delta, or a whole
    completion's message."""
    choices = message.get("choices") or ()
    if not choices:
        return ""
    part = choices[0].get("delta") or choices[0].get("message") or {}
    return part.get("content") or ""
