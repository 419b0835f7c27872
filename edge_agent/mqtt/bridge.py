"""The MQTT bridge: answers device chat requests from a Mosquitto broker with the agent's model.

This module owns the agent's connection to the broker (``transport`` builds the paho
client for it and for the device client). paho's network thread receives messages and acknowledges them; each request is handed
to the agent's asyncio loop, served through the same ``serving`` object (and so the same queue
and limits) as REST, and answered on the request's reply route.

Reliability: the session is persistent (clean_start false + a session expiry), so the broker
keeps our subscriptions and queues requests while we are away; paho reconnects with
exponential backoff and re-sends QoS 1 replies that were published while the link was down.
A request that was acknowledged before a disconnect is therefore still answered after it.

Trust: the bridge logs in as its own user (``settings.mqtt_username``/``mqtt_password``, or the
URL's user info; the password never reaches a log line) and answers only on routes of the reply
namespace (``contract.in_reply_namespace``); a request routed elsewhere is refused, logged once
per client and counted (``forbidden_reply_route``), as the broker's ACL would drop the reply.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent.errors import MqttConfigError
from edge_agent.mqtt.coalescer import ChunkCoalescer
from edge_agent.mqtt.contract import (
    ChatRequest,
    RejectedRequest,
    ReplyRoute,
    error_payload,
    node_topic,
    parse_broker_url,
    parse_request,
    reply_bytes,
    shared_subscription,
    valid_node_name,
    with_credentials,
)
from edge_agent.mqtt.metrics import MqttMetrics
from edge_agent.mqtt.transport import make_client
from edge_agent.serving.protocol import ErrorResult
from edge_agent.settings import AgentSettings

log = logging.getLogger(__name__)

KEEPALIVE_S = 30
SESSION_EXPIRY_S = 3600      # how long the broker keeps our session (and queues) while we are away
_REFUSED_AUTH = {"Bad user name or password", "Not authorized"}
AUTH_HINT = (" (check the user name and password: --mqtt-username, --mqtt-password-file or "
             "EDGEGEN_MQTT_PASSWORD, or the user info of the broker URL)")


def _status_of(result: ErrorResult) -> str:
    """The metrics label of a request that serving refused."""
    if result.status == 429 or result.body.get("error", {}).get("type") == "rate_limited":
        return "rate_limited"
    return "bad_request" if 400 <= result.status < 500 else "error"


class FirstSeen:
    """Remembers keys (bounded, oldest forgotten first) to log a problem once per sender."""

    def __init__(self, capacity: int = 1024):
        self.capacity = capacity
        self._keys: dict[Any, None] = {}

    def first(self, key: Any) -> bool:
        if key in self._keys:
            return False
        if len(self._keys) >= self.capacity:
            self._keys.pop(next(iter(self._keys)))
        self._keys[key] = None
        return True


class MqttBridge:
    """Subscribes to this node's chat topic and the shared one, answers over MQTT.

    ``start()`` returns at once: the connection is made (and remade) in the background.
    Metrics go to ``metrics``, by default into the registry of ``serving.metrics`` (the
    agent's ``/metrics``).
    """

    def __init__(self, settings: AgentSettings, serving, *,
                 metrics: MqttMetrics | None = None,
                 session_expiry: int = SESSION_EXPIRY_S,
                 reconnect_delay: tuple[int, int] = (1, 30)):
        if not settings.mqtt:
            raise MqttConfigError("the MQTT bridge needs settings.mqtt (a broker URL)")
        self.settings = settings
        self.serving = serving
        self.metrics = metrics or MqttMetrics(
            getattr(getattr(serving, "metrics", None), "registry", None))
        if not valid_node_name(settings.node):
            raise MqttConfigError(f"node name {settings.node!r} cannot be an MQTT topic level "
                                  "(no '/', '+', '#', and not 'reply')")
        self.broker = with_credentials(parse_broker_url(settings.mqtt), settings.mqtt_username,
                                       settings.mqtt_password)
        self.session_expiry = session_expiry
        self.reconnect_delay = reconnect_delay
        self.client_id = f"edgegen-agent-{settings.node}"
        self.topics = (node_topic(settings.node), shared_subscription())
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._unacked: set[int] = set()      # mids of replies the broker has not acked
        self._acked_early: set[int] = set()  # PUBACKs that beat publish() returning
        self._acks = threading.Lock()
        self._no_route_seen = FirstSeen()
        self._forbidden_seen = FirstSeen()
        self._last_refusal: str | None = None
        self._connected = False
        self._subscribed = False
        self._stopping = False
        self._left_shared = False

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def subscribed(self) -> bool:
        """Connected and the broker acknowledged our subscriptions: requests will reach us."""
        return self._connected and self._subscribed

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        client = make_client(self.broker, self.client_id, ca_file=self.settings.mqtt_ca_file)
        client.reconnect_delay_set(*self.reconnect_delay)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry
        client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S,
                             clean_start=False, properties=props)
        self._client = client
        client.loop_start()
        log.info("MQTT bridge started", extra={"broker": self.broker.redacted(),
                                               "topics": list(self.topics)})

    async def leave_shared(self) -> None:
        """Stop taking requests from the shared group, so the other agents on the broker take
        them (a drain has begun); this node's own topic still answers."""
        if self._client is not None and self._connected and not self._left_shared:
            self._left_shared = True
            self._client.unsubscribe(shared_subscription())

    async def stop(self, timeout: float | None = None) -> None:
        """Leave the shared group (so others take its share), finish in-flight requests (up to
        ``timeout``, default the drain timeout), flush replies, disconnect."""
        if self._client is None or self._stopping:
            return
        self._stopping = True
        timeout = self.settings.drain_timeout if timeout is None else timeout
        client = self._client
        await self.leave_shared()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        deadline = time.monotonic() + 5
        while self._connected and self._unacked and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self._shutdown_client, client)
        self._connected = False
        self.metrics.connected.set(0)
        log.info("MQTT bridge stopped", extra={"broker": self.broker.redacted()})

    @staticmethod
    def _shutdown_client(client: paho.Client) -> None:
        client.disconnect()
        client.loop_stop()

    # --- paho callbacks (paho's network thread) -----------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            reason = str(reason_code)
            if reason != self._last_refusal:      # once per reason, not once per retry
                self._last_refusal = reason
                hint = AUTH_HINT if reason in _REFUSED_AUTH else ""
                log.error(f"MQTT broker {self.broker.redacted()} refused the connection: "
                          f"{reason}{hint}",
                          extra={"broker": self.broker.redacted(), "reason": reason})
            return
        self._last_refusal = None
        self._connected = True
        options = SubscribeOptions(qos=1)
        topics = self.topics[:1] if self._stopping else self.topics
        client.subscribe([(t, options) for t in topics])
        log.info("MQTT connected", extra={"broker": self.broker.redacted(),
                                          "session_present": flags.session_present})

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [str(rc) for rc in reason_codes if rc.is_failure]
        if refused:
            log.error("MQTT broker refused our subscriptions", extra={"reasons": refused})
            return
        self._subscribed = True
        self.metrics.connected.set(1)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._acks:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._acked_early.add(mid)

    def _on_connect_fail(self, client, userdata) -> None:
        reason = "broker unreachable"
        if reason != self._last_refusal:
            self._last_refusal = reason
            log.warning(f"MQTT broker {self.broker.redacted()} unreachable; retrying with "
                        "backoff", extra={"broker": self.broker.redacted()})

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected
        self._connected = self._subscribed = False
        self.metrics.connected.set(0)
        if was and not self._stopping:
            log.warning("MQTT connection lost; reconnecting with backoff",
                        extra={"broker": self.broker.redacted(), "reason": str(reason_code)})

    def _on_message(self, client, userdata, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        try:
            parsed = parse_request(
                msg.payload,
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None),
                max_payload=self.settings.mqtt_max_payload,
            )
            sender = dict(getattr(props, "UserProperty", None) or ()).get("client_id")
        except Exception:     # noqa: BLE001 - a bug here must not stop paho's network thread
            log.exception("MQTT message could not be read", extra={"topic": msg.topic})
            self.metrics.count("error")
            return
        try:
            self._loop.call_soon_threadsafe(self._dispatch, parsed, msg.topic, sender)
        except RuntimeError:      # the loop is closed: the agent is going away
            log.warning("MQTT request dropped: the agent is shutting down")

    # --- requests (the agent's event loop) ----------------------------------------------------

    def _dispatch(self, parsed: ChatRequest | RejectedRequest, topic: str,
                  sender: str | None) -> None:
        if isinstance(parsed, RejectedRequest) and parsed.refused_route is not None:
            self.metrics.count("forbidden_reply_route")
            client = sender or parsed.refused_route
            if self._forbidden_seen.first(client):
                log.warning(
                    "MQTT request refused: its reply route lies outside the reply namespace "
                    "edgegen/v1/reply/<client id>, where the broker lets no agent publish; "
                    "further ones from this client are only counted",
                    extra={"topic": topic, "sender": sender,
                           "reply_route": parsed.refused_route[:200]})
            return
        if parsed.reply is None:
            self.metrics.count("no_reply_route")
            if self._no_route_seen.first((topic, sender)):
                log.warning(
                    "MQTT request without a reply route (no v5 Response Topic, no reply_to "
                    "in the body) ignored; further ones from this sender are only counted",
                    extra={"topic": topic, "sender": sender,
                           "problem": getattr(parsed, "code", None)})
            return
        if isinstance(parsed, RejectedRequest):
            self.metrics.count("bad_request")
            log.info("MQTT request rejected", extra={"topic": topic, "code": parsed.code})
            self._publish(parsed.reply, parsed.error)
            return
        task = asyncio.ensure_future(self._serve(parsed))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request: ChatRequest) -> None:
        body, route = request.body, request.reply
        if body.get("stream") is True:
            options = body.get("stream_options")
            if options is None or isinstance(options, dict):
                # The final message must carry usage (the contract), whatever the device asked.
                body["stream_options"] = {**(options or {}), "include_usage": True}
        try:
            result = await self.serving.create_chat_completion(body, source="mqtt")
            if isinstance(result, ErrorResult):
                self.metrics.count(_status_of(result))
                self._publish(route, result.body)
            elif isinstance(result, dict):
                self.metrics.count("ok")
                self._publish(route, result)
            else:
                # Count before the last message goes out: once a device holds its answer, the
                # metrics already show it.
                status, last = await self._stream(result, route)
                self.metrics.count(status)
                self._publish(route, last)
        except asyncio.CancelledError:
            self.metrics.count("error")  # counted before the device holds its answer, as above
            self._publish(route, error_payload(503, "the agent is shutting down",
                                               "shutting_down"))
            raise
        except Exception:
            log.exception("MQTT request failed")
            self.metrics.count("error")
            self._publish(route, error_payload(500, "internal error while serving the request",
                                               "internal_error"))

    async def _stream(self, stream, route: ReplyRoute) -> tuple[str, dict]:
        """Publish a chunk stream coalesced by size and time; return the outcome's status and
        the last message, which the caller publishes."""
        loop = asyncio.get_running_loop()
        coalescer = ChunkCoalescer(self.settings.mqtt_coalesce_tokens,
                                   self.settings.mqtt_coalesce_ms / 1000)
        iterator = stream.__aiter__()
        next_chunk: asyncio.Future | None = None
        try:
            while True:
                if next_chunk is None:
                    next_chunk = asyncio.ensure_future(iterator.__anext__())
                deadline = coalescer.deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                done, _ = await asyncio.wait({next_chunk}, timeout=timeout)
                if not done:                       # nothing new for max_delay: send what waits
                    self._publish(route, coalescer.flush())
                    continue
                try:
                    chunk = next_chunk.result()
                except StopAsyncIteration:
                    break
                finally:
                    next_chunk = None
                if "error" in chunk:               # the stream failed after it began
                    pending = coalescer.flush()
                    if pending is not None:
                        self._publish(route, pending)
                    return "error", {"error": chunk["error"]}
                message = coalescer.add(chunk, loop.time())
                if message is not None:
                    self._publish(route, message)
        finally:
            if next_chunk is not None:       # let the generator unwind before closing it
                next_chunk.cancel()
                await asyncio.wait({next_chunk})
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except Exception:            # noqa: BLE001 - closing must not mask the outcome
                    log.warning("closing a chat stream failed", exc_info=True)
        final = coalescer.finish()
        if final is None:
            return "error", error_payload(500, "the model produced no output", "empty_stream")
        return "ok", final

    def _publish(self, route: ReplyRoute, message: dict | None) -> None:
        if message is None:
            return
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = ("x-edgegen-node", self.settings.node)
        if not route.in_body and route.correlation is not None:
            props.CorrelationData = route.correlation
        try:
            info = self._client.publish(route.topic, reply_bytes(message, route), qos=1,
                                        properties=props)
        except (ValueError, TypeError) as exc:   # a reply topic paho refuses
            log.warning("MQTT reply not sent", extra={"topic": route.topic, "reason": str(exc)})
            return
        # Replies published while disconnected stay queued in paho and go out on reconnect;
        # stop() waits for the broker to acknowledge them.
        with self._acks:
            if info.mid in self._acked_early:
                self._acked_early.discard(info.mid)
            else:
                self._unacked.add(info.mid)
