"""The MQTT contract as pure functions: broker URLs, topics, request parsing, reply routing,
error payloads, and how a reply stream ends. No sockets, no clock, no paho: the bridge
(``bridge``) and the device client (``device_client``) do the I/O and call these.

Contract (DESIGN.md): requests on ``edgegen/v1/<node>/chat`` or the shared
``$share/edgegen/edgegen/v1/any/chat``; replies go to the MQTT v5 Response Topic with its
Correlation Data, or, for MQTT 3.1.1 clients, to ``reply_to`` with ``correlation_id`` taken
from (and echoed back in) the JSON body.

Trust (the broker's ACL, ``broker_acl``): a reply route must lie in the reply namespace,
``edgegen/v1/reply/<client id>``, the one topic the requesting device (and nobody else) may
read; agents (user ``edgegen-agent``) alone may publish there. A route elsewhere is refused:
the broker would drop the agent's publish without a word.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote, urlsplit

from edge_agent.errors import MqttConfigError
from edge_agent.serving.bodies import decode_json
from edge_agent.serving.protocol import ErrorResult, error_body

TOPIC_PREFIX = "edgegen/v1"
SHARE_GROUP = "edgegen"
ANY_NODE = "any"
BODY_ROUTE_FIELDS = ("reply_to", "correlation_id")
REPLY_PREFIX = f"{TOPIC_PREFIX}/reply"
AGENT_USER = "edgegen-agent"      # the broker user of every agent (ACL: ``broker_acl``)
DEVICE_USER = "edgegen-device"    # the broker user `edgegen up` and the K3s Secret give devices


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


def valid_node_name(node: str) -> bool:
    """A node name that makes a request topic of its own: one topic level, no wildcard, and
    not ``reply`` (``edgegen/v1/reply/chat`` is in the reply namespace)."""
    return bool(node) and node != "reply" and not any(c in node for c in "/+#\x00")


def reply_topic(client_id: str) -> str:
    """The one topic a device reads its replies on (MQTT v5 Response Topic, 3.1.1 reply_to)."""
    return f"{REPLY_PREFIX}/{client_id}"


def in_reply_namespace(topic: Any) -> bool:
    """Whether agents may publish a reply to ``topic`` (ACL: ``broker_acl``):
    ``edgegen/v1/reply/<client id>``, a topic name without wildcards. ``edgegen/v1/reply/chat``
    is excluded: it is also the request topic of a node named ``reply``."""
    return (
        valid_publish_topic(topic) and topic.startswith(REPLY_PREFIX + "/")
        and len(topic) > len(REPLY_PREFIX) + 1 and topic != node_topic("reply")
    )


def broker_acl() -> str:
    """Mosquitto's ``acl_file`` for an edge broker (K3s manifests, `edgegen up`, the tests).

    Pattern lines apply to every client, anonymous ones included where they are allowed:
    ask on any request topic, read only the reply topic named by one's own client id (``%c``:
    an exact topic, not ``/#``, so a client id ``a`` cannot read the replies of ``a/b``;
    Mosquitto refuses pattern matches for client ids holding ``+`` or ``#``). Agents, by their
    user, read the request topics (their node's and, through ``$share/edgegen/``, the shared
    one) and alone write replies. Nothing else is granted: no client reads another's replies,
    nor any request but an agent.
    """
    return (
        "# edgegen edge broker ACL (README: MQTT ACL contract)\n"
        "# Every client: ask, and read the replies addressed to its own client id.\n"
        f"pattern write {TOPIC_PREFIX}/+/chat\n"
        f"pattern read {REPLY_PREFIX}/%c\n"
        f"# {node_topic('reply')} is a request topic and a reply topic at once: nobody's.\n"
        "# (Mosquitto warns that this pattern holds no %c or %u; that is intended.)\n"
        f"pattern deny {node_topic('reply')}\n"
        "# Agents: read every request topic (their node's, the shared group's), write replies.\n"
        f"user {AGENT_USER}\n"
        f"topic read {TOPIC_PREFIX}/+/chat\n"
        f"topic write {REPLY_PREFIX}/#\n"
    )


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


def with_credentials(broker: BrokerAddress, username: str | None,
                     password: str | None) -> BrokerAddress:
    """``broker`` with the user name and password given apart from its URL (flags, a password
    file, the environment): they win over the URL's own; a password needs a user name."""
    if username is not None and not username:
        raise MqttConfigError("the MQTT user name is empty")
    user = username if username is not None else broker.username
    secret = password if password is not None else (
        broker.password if user == broker.username else None)
    if secret is not None and user is None:
        raise MqttConfigError(f"an MQTT password was given for {broker.redacted()} but no user "
                              "name: add --mqtt-username (or user@ in the URL)")
    return replace(broker, username=user, password=secret)


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
    """A message that is not a servable request; answer ``error`` if ``reply`` is known.

    ``refused_route`` is the reply topic the request asked for when it lies outside the reply
    namespace (``code`` ``reply_route_forbidden``): nobody is answered, the agent counts it.
    """

    error: dict
    reply: ReplyRoute | None
    code: str
    refused_route: str | None = None


def error_payload(status: int, message: str, code: str, *, param: str | None = None) -> dict:
    """OpenAI's error body, typed as the HTTP status ``status`` would be over REST (the same
    ``error_body`` as REST's, so a device and an HTTP client see the same error)."""
    return error_body(status, message, param=param, code=code)


# An oversize or undecodable 3.1.1 payload is never parsed, but its sender still deserves an
# answer: its route is looked for in the raw bytes, in the first and the last SCAN_WINDOW bytes
# only (where JSON writers put the fields they add: first, or last as `{**body, "reply_to": …}`
# does). Only a plain string value (no escapes) that is a topic of the reply namespace is
# trusted, and the correlation id only as a plain string or an integer.
SCAN_WINDOW = 64 * 1024
_SCANNED_REPLY_TO = re.compile(rb'"reply_to"[ \t\r\n]*:[ \t\r\n]*"([^"\\]{1,1024})"')
_SCANNED_CORRELATION = re.compile(
    rb'"correlation_id"[ \t\r\n]*:[ \t\r\n]*(?:"([^"\\]{0,1024})"|(-?[0-9]{1,18})(?![0-9.eE]))')


def scan_reply_route(payload: bytes) -> ReplyRoute | None:
    """The 3.1.1 reply route of a payload that is not parsed (too large, or not decodable),
    found by a bounded scan of its bytes; None if no trustworthy one is there."""
    windows = ([payload] if len(payload) <= 2 * SCAN_WINDOW
               else [payload[:SCAN_WINDOW], payload[-SCAN_WINDOW:]])
    topic = correlation = None
    for window in windows:
        match = _SCANNED_REPLY_TO.search(window)
        if match is not None:
            try:
                topic = match.group(1).decode("utf-8")
            except UnicodeDecodeError:
                return None
            break
    if topic is None or not in_reply_namespace(topic):
        return None
    for window in windows:
        match = _SCANNED_CORRELATION.search(window)
        if match is not None:
            text, number = match.groups()
            try:
                correlation = text.decode("utf-8") if text is not None else int(number)
            except UnicodeDecodeError:
                correlation = None
            break
    return ReplyRoute(topic, correlation, in_body=True)


def parse_request(payload: bytes, *, response_topic: str | None = None,
                  correlation_data: bytes | None = None,
                  max_payload: int) -> ChatRequest | RejectedRequest:
    """Turn one received message into a chat request, or a rejection with its reply route.

    A v5 Response Topic wins over body fields. The payload is read with REST's own
    ``decode_json`` (UTF-8, JSON without NaN, nesting depth, no lone surrogates), so a device
    gets the error a REST client gets. Payloads over ``max_payload`` are not parsed at all;
    like undecodable ones, a 3.1.1 sender's route is then looked for by ``scan_reply_route``.
    A route outside the reply namespace is refused (``reply_route_forbidden``, no reply).
    """
    v5 = ReplyRoute(response_topic, correlation_data) if response_topic else None

    def reject(reply: ReplyRoute | None, status: int, message: str, code: str,
               param: str | None = None) -> RejectedRequest:
        return _routed(RejectedRequest(error_payload(status, message, code, param=param),
                                       reply, code))

    if len(payload) > max_payload:
        return reject(v5 or scan_reply_route(payload), 413,
                      f"payload of {len(payload)} bytes is over this agent's limit of "
                      f"{max_payload} bytes", "payload_too_large")
    body = decode_json(payload)
    if isinstance(body, ErrorResult):
        return _routed(RejectedRequest(body.body, v5 or scan_reply_route(payload),
                                       body.body["error"]["code"] or "invalid_json"))
    if not isinstance(body, dict):
        return reject(v5, 400, "payload must be a JSON object (an OpenAI chat completion "
                      "request)", "not_a_chat_request")

    reply = v5
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
        return reject(reply, 400, "not a chat completion request: 'messages' must be a list "
                      "of messages", "not_a_chat_request", "messages")
    if reply is not None and not in_reply_namespace(reply.topic):
        return _forbidden(reply)
    return ChatRequest(body, reply)


def _routed(rejected: RejectedRequest) -> RejectedRequest:
    """A rejection whose route lies outside the reply namespace cannot be answered either."""
    if rejected.reply is not None and not in_reply_namespace(rejected.reply.topic):
        return _forbidden(rejected.reply)
    return rejected


def _forbidden(route: ReplyRoute) -> RejectedRequest:
    param = "reply_to" if route.in_body else None
    return RejectedRequest(
        error_payload(403, f"replies may only go to {REPLY_PREFIX}/<client id>",
                      "reply_route_forbidden", param=param),
        None, "reply_route_forbidden", refused_route=route.topic)


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
