"""The MQTT bridge over a real Mosquitto, with a fake serving object of the real signature.

The module's broker is locked as edgegen ships it (rendered password file and ACL): the bridge
logs in as the agents' user, devices as the devices' user. Device side: the project's own
client (v5 and 3.1.1), raw paho for malformed payloads, and Debian's mosquitto_pub/mosquitto_sub
as an independent v5 client."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import MqttConnectError, MqttReplyError
from edge_agent.mqtt.contract import DEVICE_USER, reply_topic
from edge_agent.mqtt.device_client import MqttChatClient
from edge_agent.settings import AgentSettings
from tests.support.mosquitto import Mosquitto, make_tls_files
from tests.support.mqtt_fakes import BridgeThread, FakeServing

pytestmark = [
    pytest.mark.timeout(120),
]

PROMPT = "the quick brown fox jumps over the lazy dog again and again"


def body(text=PROMPT, **kw):
    return {"messages": [{"role": "user", "content": text}], **kw}


def settings(url: str, node: str = "n1", **kw) -> AgentSettings:
    return AgentSettings(bundle="unused", node=node, mqtt=url, **kw)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), locked=True) as b:
        yield b


@pytest.fixture(scope="module")
def serving():
    return FakeServing()


@pytest.fixture(scope="module")
def bridge(broker, serving):
    b = BridgeThread(settings(broker.url, mqtt_coalesce_tokens=3, mqtt_coalesce_ms=1000,
                              mqtt_max_payload=4096, **broker.agent_login()), serving)
    b.wait_connected()
    yield b
    b.stop()


@pytest.fixture()
def device(broker, bridge):
    with MqttChatClient(broker.url, **broker.device_login()) as c:
        yield c


def test_v5_streaming_with_correlation_data_and_coalesced_chunks(device, bridge):
    before = bridge.requests("ok")
    replies = list(device.chat(body(stream=True), node="n1", timeout=30))
    chunks, final = replies[:-1], replies[-1]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in replies if c["choices"])
    assert text == PROMPT
    # 12 words: the first at once, then 3 tokens a message: 5 messages, not 14; only the last
    # one is final.
    assert len(replies) <= 5 and all(c["object"] == "chat.completion.chunk" for c in replies)
    assert all(c.get("usage") is None for c in chunks)
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["usage"]["completion_tokens"] == 12
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in replies}) == 1
    assert bridge.requests("ok") == before + 1
    assert bridge.metric("edgegen_mqtt_connected") == 1


def test_v5_non_streaming_gets_one_completion(device, serving):
    [reply] = list(device.chat(body("hello there"), node="n1", timeout=30))
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == "hello there"
    assert serving.calls[-1][1] == "mqtt"


def test_v311_client_routes_with_body_fields(broker, bridge, serving):
    with MqttChatClient(broker.url, v311=True, **broker.device_login()) as c:
        replies = list(c.chat(body("three little words", stream=True), node="n1", timeout=30))
    assert "".join(r["choices"][0]["delta"].get("content", "")
                   for r in replies if r["choices"]) == "three little words"
    assert replies[-1]["usage"]
    # The fields are routing, not part of the chat request the model sees.
    assert "reply_to" not in serving.calls[-1][0] and "correlation_id" not in serving.calls[-1][0]


def test_shared_topic_is_served(device):
    [reply] = list(device.chat(body("any agent"), timeout=30))
    assert reply["choices"][0]["message"]["content"] == "any agent"


def test_mosquitto_clients_as_an_independent_v5_client(broker, bridge):
    sub_id = f"mosq-sub-{uuid.uuid4().hex[:8]}"
    topic = reply_topic(sub_id)
    login = ["-u", DEVICE_USER, "-P", broker.creds.device_password()]
    sub = subprocess.Popen(
        ["mosquitto_sub", "-V", "5", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1",
         "-i", sub_id, *login, "-t", topic, "-C", "1", "-W", "60", "-F", "%D|%P|%p"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # mosquitto_sub has no "subscribed" signal: wait until the broker logs its SUBSCRIBE.
        deadline = time.monotonic() + 30
        while topic not in broker.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(
            ["mosquitto_pub", "-V", "5", "-p", str(broker.port), "-h", "127.0.0.1", "-q", "1",
             *login, "-t", "edgegen/v1/n1/chat", "-m", json.dumps(body("from mosquitto pub")),
             "-D", "publish", "response-topic", topic,
             "-D", "publish", "correlation-data", "req-42"],
            check=True, timeout=30)
        out, err = sub.communicate(timeout=60)
    finally:
        sub.kill()
    correlation, props, payload = out.strip().split("|", 2)
    assert correlation == "req-42"
    assert "x-edgegen-node:n1" in props
    reply = json.loads(payload)
    assert reply["choices"][0]["message"]["content"] == "from mosquitto pub"


class RawDevice:
    """A bare paho client (v5 by default) to publish payloads the project's client would never
    send; it reads its replies on its reply topic, as a device of a locked broker must."""

    def __init__(self, broker: Mosquitto, protocol=MQTTProtocolVersion.MQTTv5):
        self.client_id = f"raw-{uuid.uuid4().hex[:12]}"
        self.topic = reply_topic(self.client_id)
        self.v5 = protocol == MQTTProtocolVersion.MQTTv5
        self.messages: list[tuple[bytes | None, dict]] = []
        self.got = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=protocol)
        if broker.creds is not None:
            self.c.username_pw_set(DEVICE_USER, broker.creds.device_password())
        self.c.on_message = self._on_message
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert subscribed.wait(30)

    def _on_message(self, c, u, msg):
        with self.got:
            self.messages.append((getattr(msg.properties, "CorrelationData", None),
                                  json.loads(msg.payload)))
            self.got.notify_all()

    def publish(self, payload: bytes, correlation: bytes | None = None,
                topic="edgegen/v1/n1/chat", route=True):
        props = Properties(PacketTypes.PUBLISH)
        if route:
            props.ResponseTopic = route if isinstance(route, str) else self.topic
        if correlation:
            props.CorrelationData = correlation
        if not self.v5:
            props = None
        self.c.publish(topic, payload, qos=1, properties=props).wait_for_publish(30)

    def wait_for(self, n: int, timeout=60.0) -> list[tuple[bytes | None, dict]]:
        with self.got:
            assert self.got.wait_for(lambda: len(self.messages) >= n, timeout), \
                f"got {len(self.messages)} of {n} replies"
            return list(self.messages)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def test_200_malformed_messages_then_a_good_one_is_answered(broker, bridge):
    raw = RawDevice(broker)
    bad_before = bridge.requests("bad_request")
    kinds = [b"{not json", b"\xff\xfe\xfd", b"[1,2,3]", b'{"prompt": "no messages"}',
             b"x" * 5000]
    try:
        for i in range(200):
            raw.publish(kinds[i % len(kinds)], correlation=f"bad-{i}".encode())
        raw.publish(json.dumps(body("still alive")).encode(), correlation=b"good")
        replies = raw.wait_for(201)
    finally:
        raw.close()
    by_corr = {c: m for c, m in replies}
    assert by_corr[b"good"]["choices"][0]["message"]["content"] == "still alive"
    codes = [by_corr[f"bad-{i}".encode()]["error"]["code"] for i in range(200)]
    assert codes[:5] == ["invalid_json", "invalid_utf8", "not_a_chat_request",
                         "not_a_chat_request", "payload_too_large"]
    assert all(by_corr[f"bad-{i}".encode()]["error"]["type"] == "invalid_request_error"
               for i in range(200))
    assert bridge.requests("bad_request") == bad_before + 200


def test_request_without_reply_route_is_counted_and_logged_once(broker, bridge, caplog):
    raw = RawDevice(broker)
    before = bridge.requests("no_reply_route")
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt.bridge")
    try:
        for _ in range(5):
            raw.publish(json.dumps(body("nobody listens")).encode(), route=False,
                        topic="edgegen/v1/n1/chat")
        raw.publish(b"{broken", route=False, topic="edgegen/v1/n1/chat")
        deadline = time.monotonic() + 30
        while bridge.requests("no_reply_route") < before + 6 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        raw.close()
    assert bridge.requests("no_reply_route") == before + 6
    lines = [r for r in caplog.records if "without a reply route" in r.getMessage()]
    assert len(lines) == 1


def test_serving_errors_reach_the_device(device, serving):
    with pytest.raises(MqttReplyError, match="model 'unknown'") as err:
        list(device.chat(body(model="unknown"), node="n1", timeout=30))
    assert err.value.error["code"] == "model_not_found"


def test_failures_inside_serving_become_error_replies(device, bridge):
    before = bridge.requests("error")
    replies = list(device.replies(device.send(body("one two FAIL three", stream=True),
                                              node="n1"), timeout=30, raise_errors=False))
    assert "".join(r["choices"][0]["delta"].get("content", "")
                   for r in replies[:-1] if r["choices"]) == "one two"
    assert replies[-1]["error"]["type"] == "server_error"
    [crash] = list(device.replies(device.send(body(model="crash"), node="n1"), timeout=30,
                                  raise_errors=False))
    assert crash["error"]["code"] == "internal_error" and "bug" not in crash["error"]["message"]
    assert bridge.requests("error") == before + 2
    [ok] = list(device.chat(body("fine again"), node="n1", timeout=30))
    assert ok["choices"][0]["message"]["content"] == "fine again"


def test_full_queue_answers_rate_limited_not_silence(device, serving, bridge):
    before = bridge.requests("rate_limited")
    serving.full = True
    try:
        replies = list(device.replies(device.send(body(stream=True), node="n1"),
                                      timeout=30, raise_errors=False))
    finally:
        serving.full = False
    assert replies == [{"error": {"message": "the agent's queue is full, retry later",
                                  "type": "rate_limited", "param": None,
                                  "code": "rate_limited"}}]
    assert bridge.requests("rate_limited") == before + 1


def test_coalescing_by_time_on_a_slow_stream(broker, tmp_path):
    """Tokens every 30 ms with a 100 ms window: several tokens per message, and the first
    message leaves within the window rather than waiting for the token budget."""
    serving = FakeServing(token_delay=0.03)
    b = BridgeThread(settings(broker.url, node="slow", mqtt_coalesce_tokens=1000,
                              mqtt_coalesce_ms=100, **broker.agent_login()), serving)
    try:
        b.wait_connected()
        with MqttChatClient(broker.url, **broker.device_login()) as c:
            replies = list(c.chat(body(" ".join(["w"] * 20), stream=True), node="slow",
                                  timeout=30))
    finally:
        b.stop()
    contents = [r["choices"][0]["delta"].get("content", "") for r in replies if r["choices"]]
    assert "".join(contents) == " ".join(["w"] * 20)
    assert 2 <= len(replies) <= 12      # neither one per token (21) nor a single message


def test_two_bridges_split_the_shared_subscription(tmp_path):
    broker = Mosquitto(tmp_path / "share").start()
    a = BridgeThread(settings(broker.url, node="share-a"), FakeServing())
    b = BridgeThread(settings(broker.url, node="share-b"), FakeServing())
    try:
        a.wait_connected()
        b.wait_connected()
        with MqttChatClient(broker.url) as c:
            ids = [c.send(body(f"request {i}")) for i in range(20)]
            for i in ids:
                assert list(c.replies(i, timeout=30))[-1]["object"] == "chat.completion"
            nodes = [c.answered_by[i] for i in ids]
    finally:
        a.stop()
        b.stop()
        broker.stop()
    assert set(nodes) == {"share-a", "share-b"}, nodes
    assert nodes.count("share-a") >= 3 and nodes.count("share-b") >= 3
    # Each request went to exactly one of them.
    assert a.bridge.serving.received + b.bridge.serving.received == 20


def test_start_does_not_block_on_a_dead_broker_and_connects_later(tmp_path):
    broker = Mosquitto(tmp_path / "late")
    t0 = time.monotonic()
    b = BridgeThread(settings(broker.url, node="late"), FakeServing())
    try:
        assert time.monotonic() - t0 < 5 and not b.bridge.connected
        assert b.metric("edgegen_mqtt_connected") == 0
        time.sleep(1.5)             # a few refused attempts
        broker.start()
        b.wait_connected(60)
        with MqttChatClient(broker.url) as c:
            [reply] = list(c.chat(body("late but here"), node="late", timeout=30))
        assert reply["choices"][0]["message"]["content"] == "late but here"
    finally:
        b.stop()
        broker.stop()


def test_broker_restart_mid_request_is_answered_after_reconnect(tmp_path):
    """The request is acknowledged and being served when the broker goes down; the reply,
    produced while the link is down, reaches the device once both have reconnected."""
    broker = Mosquitto(tmp_path / "restart").start()
    gate = threading.Event()
    serving = FakeServing(gate=gate)
    b = BridgeThread(settings(broker.url, node="r1"), serving)
    device = MqttChatClient(broker.url, client_id="restart-device", session_expiry=600)
    try:
        b.wait_connected()
        device.connect()
        corr = device.send(body("survives a restart", stream=True), node="r1")
        deadline = time.monotonic() + 30
        while serving.received < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert serving.received == 1
        broker.stop()
        deadline = time.monotonic() + 30
        while b.bridge.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not b.bridge.connected
        assert b.metric("edgegen_mqtt_connected") == 0
        gate.set()                      # the answer is produced while the broker is down
        time.sleep(0.5)
        broker.start()
        replies = list(device.replies(corr, timeout=60))
        assert "".join(r["choices"][0]["delta"].get("content", "")
                       for r in replies if r["choices"]) == "survives a restart"
        assert replies[-1]["usage"]
        b.wait_connected(60)
        [again] = list(device.chat(body("and after"), node="r1", timeout=60))
        assert again["choices"][0]["message"]["content"] == "and after"
        assert b.metric("edgegen_mqtt_connected") == 1
    finally:
        device.close()
        b.stop()
        broker.stop()


def test_requests_queued_while_the_agent_is_away_are_answered_when_it_returns(tmp_path):
    """Persistent session: the broker keeps the agent's node subscription while it is down."""
    broker = Mosquitto(tmp_path / "away").start()
    b = BridgeThread(settings(broker.url, node="away"), FakeServing())
    try:
        b.wait_connected()
        b.stop()
        with MqttChatClient(broker.url) as c:
            corr = c.send(body("waited for you"), node="away")
            time.sleep(0.3)
            b = BridgeThread(settings(broker.url, node="away"), FakeServing())
            [reply] = list(c.replies(corr, timeout=60))
        assert reply["choices"][0]["message"]["content"] == "waited for you"
    finally:
        b.stop()
        broker.stop()


def test_password_auth_and_a_clear_log_line_for_a_wrong_password(tmp_path, caplog):
    broker = Mosquitto(tmp_path / "auth", users={"agent": "s3cret", "dev": "devpw"}).start()
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt.bridge")
    wrong = BridgeThread(settings(broker.url_for("agent", "wrong"), node="auth-x"),
                         FakeServing(), reconnect_delay=(1, 2))
    good = BridgeThread(settings(broker.url_for("agent", "s3cret"), node="auth-ok"),
                        FakeServing())
    try:
        good.wait_connected()
        deadline = time.monotonic() + 30
        while not any("refused" in r.getMessage() for r in caplog.records) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)                 # more refused retries: still one line
        refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1, refusals
        assert "127.0.0.1" in refusals[0] and "wrong" not in refusals[0]
        assert "Not authorized" in refusals[0] or "Bad user name or password" in refusals[0]
        assert "check the user name and password" in refusals[0]
        assert not wrong.bridge.connected
        with pytest.raises(MqttConnectError, match="refused"):
            MqttChatClient(broker.url_for("dev", "nope")).connect()
        with pytest.raises(MqttConnectError, match="refused"):
            MqttChatClient(broker.url).connect()          # anonymous
        with MqttChatClient(broker.url_for("dev", "devpw")) as c:
            [reply] = list(c.chat(body("authenticated"), node="auth-ok", timeout=30))
        assert reply["choices"][0]["message"]["content"] == "authenticated"
    finally:
        wrong.stop()
        good.stop()
        broker.stop()


def test_tls_with_a_ca_file(tmp_path):
    tls = make_tls_files(tmp_path / "pki")
    broker = Mosquitto(tmp_path / "tls", tls=tls).start()
    b = BridgeThread(settings(broker.url, node="tls", mqtt_ca_file=str(tls.ca)), FakeServing())
    try:
        assert broker.url.startswith("mqtts://")
        b.wait_connected()
        with MqttChatClient(broker.url, ca_file=str(tls.ca)) as c:
            [reply] = list(c.chat(body("over tls"), node="tls", timeout=30))
        assert reply["choices"][0]["message"]["content"] == "over tls"
        with pytest.raises(MqttConnectError):     # the system CAs do not trust our test CA
            MqttChatClient(broker.url).connect()
    finally:
        b.stop()
        broker.stop()
