"""Trust over MQTT, on a real Mosquitto locked the way edgegen ships it: the configuration,
password file and ACL rendered by the code of the K3s manifests and `edgegen up`
(``Mosquitto(locked=True)``), the bridge logged in as the agents' user, devices as the devices'.

Who may read and write where (README, "MQTT ACL contract"); wrong passwords and anonymous
clients; reply routes outside the reply namespace; REST's input limits on MQTT payloads."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from cli.main import app
from edge_agent.errors import MqttConnectError
from edge_agent.mqtt.contract import AGENT_USER, DEVICE_USER, reply_topic
from edge_agent.mqtt.device_client import MqttChatClient
from edge_agent.settings import AgentSettings
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_fakes import BridgeThread, FakeServing

pytestmark = [pytest.mark.timeout(120)]

NODE = "acl"


def body(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], **kw}


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("locked"), locked=True) as b:
        yield b


@pytest.fixture(scope="module")
def bridge(broker):
    b = BridgeThread(AgentSettings(bundle="unused", node=NODE, mqtt=broker.url,
                                   mqtt_max_payload=4096, **broker.agent_login()),
                     FakeServing())
    b.wait_connected()
    yield b
    b.stop()


class Client:
    """A bare paho client that records what reaches it and what the broker acknowledged."""

    def __init__(self, broker: Mosquitto, *, user: str | None = DEVICE_USER,
                 password: str | None = None, client_id: str | None = None, v5: bool = True):
        self.client_id = client_id or f"raw-{uuid.uuid4().hex[:12]}"
        self.got: list[tuple[str, dict, bytes | None]] = []
        self.acks: dict[int, str] = {}
        self.cond = threading.Condition()
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv5 if v5
                             else MQTTProtocolVersion.MQTTv311)
        self.v5 = v5
        if user is not None:
            if password is None:
                password = (broker.creds.agent_password() if user == AGENT_USER
                            else broker.creds.device_password())
            self.c.username_pw_set(user, password)
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = lambda *a: self._note("subscribed")
        self.c.on_connect = lambda c, u, f, rc, p: self._note("connected", str(rc))
        self.events: dict[str, str] = {}
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.wait(lambda: "connected" in self.events, "CONNACK")

    def _note(self, event: str, value: str = "") -> None:
        with self.cond:
            self.events[event] = value
            self.cond.notify_all()

    def _on_message(self, c, u, msg) -> None:
        with self.cond:
            self.got.append((msg.topic, json.loads(msg.payload),
                             getattr(msg.properties, "CorrelationData", None)))
            self.cond.notify_all()

    def _on_publish(self, c, u, mid, reason_code, properties) -> None:
        with self.cond:
            self.acks[mid] = str(reason_code)
            self.cond.notify_all()

    def wait(self, predicate, what: str, timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"no {what}"

    def subscribe(self, *topics: str) -> None:
        self.events.pop("subscribed", None)
        self.c.subscribe([(t, 1) for t in topics])
        self.wait(lambda: "subscribed" in self.events, "SUBACK")

    def publish(self, topic: str, payload: bytes, *, route: str | None = None,
                correlation: bytes | None = None) -> str:
        """Publish at QoS 1; return the PUBACK's reason (v3.1.1 PUBACKs have none)."""
        props = None
        if self.v5 and (route or correlation):
            props = Properties(PacketTypes.PUBLISH)
            if route:
                props.ResponseTopic = route
            if correlation:
                props.CorrelationData = correlation
        info = self.c.publish(topic, payload, qos=1, properties=props)
        self.wait(lambda: info.mid in self.acks, "PUBACK")
        return self.acks[info.mid]

    def replies(self, n: int, timeout: float = 30.0) -> list[tuple[str, dict, bytes | None]]:
        self.wait(lambda: len(self.got) >= n, f"{n} messages (got {len(self.got)})", timeout)
        return list(self.got)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


# --- who may read and write where ------------------------------------------------------------

@pytest.mark.parametrize("v311", [False, True], ids=["v5", "v3.1.1"])
def test_a_device_asks_and_reads_its_own_replies(broker, bridge, v311):
    with MqttChatClient(broker.url, v311=v311, **broker.device_login()) as device:
        assert device.reply_topic == reply_topic(device.client_id)
        replies = list(device.chat(body("only for me", stream=True), node=NODE, timeout=30))
        [answer] = list(device.chat(body("and by any agent"), timeout=30))
    assert "".join(r["choices"][0]["delta"].get("content", "")
                   for r in replies if r["choices"]) == "only for me"
    assert replies[-1]["usage"]
    assert answer["choices"][0]["message"]["content"] == "and by any agent"


def test_no_device_reads_another_devices_replies_or_requests(broker, bridge):
    victim = MqttChatClient(broker.url, **broker.device_login()).connect()
    victim_311 = MqttChatClient(broker.url, v311=True, **broker.device_login()).connect()
    spy = Client(broker)
    try:
        # (Not "$share/edgegen/...": Mosquitto's acl_file checks no subscription, so a device
        # may join the agents' group, and the requests handed to it are dropped, unread. The
        # README says so under "MQTT ACL contract".)
        spy.subscribe("#", victim.reply_topic, victim_311.reply_topic, "edgegen/v1/reply/+",
                      f"$share/spies/{victim.reply_topic}", "edgegen/v1/+/chat",
                      "$share/spies/edgegen/v1/any/chat")
        for device in (victim, victim_311):
            assert list(device.chat(body("secret answer", stream=True), node=NODE, timeout=30))
            assert list(device.chat(body("secret too"), timeout=30))
        # The spy's subscriptions are live: its own request's reply reaches it (through '#').
        assert spy.publish(f"edgegen/v1/{NODE}/chat", json.dumps(body("mine")).encode(),
                           route=reply_topic(spy.client_id), correlation=b"spy") == "Success"
        spy.replies(1)
        time.sleep(0.5)              # anything else on its way would have arrived by now
    finally:
        victim.close()
        victim_311.close()
        spy.close()
    # Its own reply, once per matching subscription ('#', 'edgegen/v1/reply/+'), and nothing else.
    assert {(topic, correlation) for topic, _, correlation in spy.got} == {
        (reply_topic(spy.client_id), b"spy")}
    assert all(reply["choices"][0]["message"]["content"] == "mine" for _, reply, _ in spy.got)


@pytest.mark.parametrize("v5", [True, False], ids=["v5", "v3.1.1"])
def test_a_device_cannot_publish_where_only_agents_may(broker, bridge, v5):
    """Replies are the agents' to write: a forged one is not delivered (the victim, which may
    read that topic and does get the agent's real reply there, sees no other message)."""
    victim = Client(broker)
    forger = Client(broker, v5=v5)
    try:
        victim.subscribe(reply_topic(victim.client_id))
        forged = json.dumps({"object": "chat.completion", "forged": True}).encode()
        reasons = [forger.publish(t, forged) for t in (
            reply_topic(victim.client_id), reply_topic(forger.client_id),
            "edgegen/v1/reply/chat", "elsewhere/topic")]
        assert victim.publish(f"edgegen/v1/{NODE}/chat", json.dumps(body("real")).encode(),
                              route=reply_topic(victim.client_id),
                              correlation=b"real") == "Success"
        [(_, reply, correlation)] = victim.replies(1)
        time.sleep(0.5)
    finally:
        victim.close()
        forger.close()
    assert correlation == b"real" and "forged" not in reply and len(victim.got) == 1
    if v5:       # v3.1.1 has no reason codes: the broker acknowledges and drops
        assert reasons == ["Not authorized"] * 4
    assert broker.log().count(f"Denied PUBLISH from {forger.client_id}") == 4


def test_agents_read_requests_and_write_replies_but_read_no_reply(broker, bridge):
    """A client with the agents' user is the other side: it sees the devices' requests (as
    agents must) and still reads nobody's replies."""
    agent = Client(broker, user=AGENT_USER, client_id="edgegen-agent-witness")
    device = Client(broker)
    try:
        agent.subscribe(f"edgegen/v1/{NODE}/chat", "edgegen/v1/reply/#")
        device.subscribe(reply_topic(device.client_id))
        device.publish(f"edgegen/v1/{NODE}/chat", json.dumps(body("seen")).encode(),
                       route=reply_topic(device.client_id), correlation=b"c")
        device.replies(1)            # the bridge answered, on a topic the witness may not read
        assert agent.publish(reply_topic(device.client_id),
                             json.dumps({"object": "x"}).encode()) == "Success"
        device.replies(2)
        time.sleep(0.3)
    finally:
        agent.close()
        device.close()
    assert [t for t, _, _ in agent.got] == [f"edgegen/v1/{NODE}/chat"]


# --- credentials -------------------------------------------------------------------------------

def test_a_wrong_password_is_refused_with_one_clear_line(broker, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="edge_agent.mqtt.bridge")
    wrong = BridgeThread(AgentSettings(bundle="unused", node="wrong", mqtt=broker.url,
                                       mqtt_username=AGENT_USER, mqtt_password="not-it-42"),
                         FakeServing(), reconnect_delay=(1, 2))
    try:
        deadline = time.monotonic() + 30
        while not any("refused" in r.getMessage() for r in caplog.records) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.5)                      # retried: still one line
    finally:
        wrong.stop()
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert f"mqtt://{AGENT_USER}@127.0.0.1:{broker.port}" in line
    assert "Not authorized" in line and "--mqtt-password-file" in line
    assert "not-it-42" not in caplog.text
    with pytest.raises(MqttConnectError, match="refused the connection: Not authorized "
                       r"\(check the user name and password") as err:
        MqttChatClient(broker.url, username=DEVICE_USER, password="not-it-43").connect()
    assert "not-it-43" not in str(err.value)
    # The device CLI: the password from a file, one error line without it.
    pw = tmp_path / "pw"
    pw.write_text("not-it-44\n")
    r = CliRunner().invoke(app, ["mqtt", "chat", "hi", "--broker", broker.url,
                                 "--mqtt-username", DEVICE_USER, "--mqtt-password-file",
                                 str(pw)])
    assert r.exit_code != 0 and "Not authorized" in str(r.exception)
    assert "not-it-44" not in str(r.exception) + r.output


def test_the_cli_device_logs_in_from_a_file_or_the_environment(broker, bridge, tmp_path):
    pw = tmp_path / "device.password"
    pw.write_text(broker.creds.device_password() + "\n")
    runner = CliRunner()
    r = runner.invoke(app, ["mqtt", "chat", "from a file", "--broker", broker.url, "--node",
                            NODE, "--mqtt-username", DEVICE_USER, "--mqtt-password-file",
                            str(pw)])
    assert r.exit_code == 0, r.output
    assert r.stdout == "from a file\n"
    r = runner.invoke(app, ["mqtt", "chat", "from the environment", "--broker", broker.url,
                            "--v311", "--client-id", "cli-device-1"],
                      env={"EDGEGEN_MQTT_USERNAME": DEVICE_USER,
                           "EDGEGEN_MQTT_PASSWORD": broker.creds.device_password()})
    assert r.exit_code == 0, r.output
    assert r.stdout == "from the environment\n"


def test_anonymous_devices_are_refused_unless_opted_in(broker, bridge, tmp_path):
    with pytest.raises(MqttConnectError, match="Not authorized"):
        MqttChatClient(broker.url).connect()
    with Mosquitto(tmp_path / "open", locked=True, anonymous=True) as open_broker:
        b = BridgeThread(AgentSettings(bundle="unused", node="open", mqtt=open_broker.url,
                                       **open_broker.agent_login()), FakeServing())
        spy = Client(open_broker, user=None)
        try:
            b.wait_connected()
            spy.subscribe("#")
            with MqttChatClient(open_broker.url) as anonymous:      # allowed here
                [reply] = list(anonymous.chat(body("no password"), node="open", timeout=30))
            time.sleep(0.3)
        finally:
            spy.close()
            b.stop()
    assert reply["choices"][0]["message"]["content"] == "no password"
    assert spy.got == []             # the ACL still holds for anonymous clients


# --- reply routes outside the namespace --------------------------------------------------------

def test_a_reply_route_outside_the_namespace_is_refused_logged_once_and_counted(
        broker, bridge, caplog):
    caplog.set_level(logging.WARNING, logger="edge_agent.mqtt.bridge")
    before = bridge.requests("forbidden_reply_route")
    served = bridge.bridge.serving.received
    v5, v311 = Client(broker), Client(broker, v5=False)
    try:
        for _ in range(3):
            v5.publish(f"edgegen/v1/{NODE}/chat", json.dumps(body("x")).encode(),
                       route="devices/mine")
            v5.publish(f"edgegen/v1/{NODE}/chat", b"{broken", route="devices/mine")
            v311.publish(f"edgegen/v1/{NODE}/chat",
                         json.dumps({**body("x"), "reply_to": "devices/other"}).encode())
        deadline = time.monotonic() + 30
        while bridge.requests("forbidden_reply_route") < before + 9 \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        v5.close()
        v311.close()
    assert bridge.requests("forbidden_reply_route") == before + 9
    assert bridge.bridge.serving.received == served        # none reached serving
    lines = [r for r in caplog.records if "outside the reply namespace" in r.getMessage()]
    assert sorted(r.reply_route for r in lines) == ["devices/mine", "devices/other"]


# --- REST's limits on MQTT payloads --------------------------------------------------------------

DEEP = b'{"messages": ' + b"[" * 200 + b"]" * 200 + b"}"
SURROGATE = b'{"messages": [{"role": "user", "content": "\\ud83d"}]}'
NOT_UTF8 = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
NAN = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'


def v311(payload: bytes, route: str, correlation: str) -> bytes:
    """``payload`` (a JSON object's bytes) with a 3.1.1 route first in it."""
    head = json.dumps({"reply_to": route, "correlation_id": correlation})[:-1].encode()
    return head + b", " + payload[1:]


def test_malformed_payloads_get_rests_errors_and_the_bridge_keeps_serving(broker, bridge):
    bad_before = bridge.requests("bad_request")
    device, old = Client(broker), Client(broker, v5=False)
    oversize = json.dumps(body("y" * 6000)).encode()          # over the bridge's 4096
    oversize_route_last = oversize[:-1] + json.dumps(
        {"reply_to": reply_topic(old.client_id), "correlation_id": 77})[1:].encode()
    try:
        device.subscribe(reply_topic(device.client_id))
        old.subscribe(reply_topic(old.client_id))
        cases = {"deep": DEEP, "surrogate": SURROGATE, "utf8": NOT_UTF8, "nan": NAN,
                 "oversize": oversize}
        for name, payload in cases.items():
            device.publish(f"edgegen/v1/{NODE}/chat", payload,
                           route=reply_topic(device.client_id), correlation=name.encode())
            old.publish(f"edgegen/v1/{NODE}/chat",
                        v311(payload, reply_topic(old.client_id), name))
        old.publish(f"edgegen/v1/{NODE}/chat", oversize_route_last)
        device.publish(f"edgegen/v1/{NODE}/chat", json.dumps(body("still serving")).encode(),
                       route=reply_topic(device.client_id), correlation=b"good")
        v5_replies = {c.decode(): m for _, m, c in device.replies(len(cases) + 1)}
        v311_replies = {m.pop("correlation_id"): m for _, m, _ in old.replies(len(cases) + 1)}
    finally:
        device.close()
        old.close()
    assert v5_replies.pop("good")["choices"][0]["message"]["content"] == "still serving"
    expected = {"deep": "invalid_json", "surrogate": "invalid_utf8", "utf8": "invalid_utf8",
                "nan": "invalid_json", "oversize": "payload_too_large"}
    for replies in (v5_replies, {k: v for k, v in v311_replies.items() if k != 77}):
        assert {k: m["error"]["code"] for k, m in replies.items()} == expected
        assert all(m["error"]["type"] == "invalid_request_error" for m in replies.values())
    assert "nested deeper than 64" in v5_replies["deep"]["error"]["message"]
    assert v5_replies["surrogate"]["error"]["param"] == "messages.0.content"
    assert v311_replies[77]["error"]["code"] == "payload_too_large"    # route found at the end
    assert bridge.requests("bad_request") == bad_before + 2 * len(cases) + 1
