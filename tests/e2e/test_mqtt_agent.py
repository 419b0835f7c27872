"""Real `edgegen agent --mqtt` processes on the tiny genai bundle and a real Mosquitto, locked
as edgegen ships it (rendered password file and ACL; the agents log in as edgegen-agent with
the password in their environment, devices as edgegen-device): devices over MQTT v5 and 3.1.1
(the project's client, `edgegen mqtt chat`, Debian's mosquitto_pub and mosquitto_sub), the
shared subscription splitting load between two agents, the queue shared with REST, malformed
input, a broker restart, password auth and where the password never shows."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.errors import MqttConnectError
from edge_agent.mqtt.contract import AGENT_USER, DEVICE_USER, answer_text, reply_topic
from edge_agent.mqtt.device_client import MqttChatClient
from tests.e2e.agent_support import start_agent
from tests.support.mosquitto import Mosquitto
from tests.support.procs import REPO

pytestmark = [
    pytest.mark.timeout(300),
]


def chat_body(text: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 24,
            "temperature": 0, **kw}


def metric(agent, name: str, **labels) -> float | None:
    """One sample from the agent's /metrics."""
    text = httpx.get(agent.url + "/metrics", timeout=10).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    m = re.search(r"^" + pattern + "$", text, re.M)
    return float(m.group(1)) if m else None


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_mqtt_connected(agent, timeout: float = 60.0) -> None:
    wait_until(lambda: metric(agent, "edgegen_mqtt_connected") == 1, timeout,
               "the agent's MQTT connection and subscriptions")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), locked=True) as b:
        yield b


def start_mqtt_agent(bundle, log_dir, name: str, broker: Mosquitto, *extra: str):
    """An agent of ``broker``, its password in the environment as the manifests give it."""
    return start_agent(bundle, log_dir, name, "--mqtt", broker.url, "--mqtt-username",
                       AGENT_USER, *extra,
                       env={"EDGEGEN_MQTT_PASSWORD": broker.creds.agent_password()})


def device_cli_login(broker: Mosquitto) -> list[str]:
    return ["--mqtt-username", DEVICE_USER, "--mqtt-password-file",
            str(broker.creds.device_password_file)]


def mosquitto_login(broker: Mosquitto, client_id: str) -> list[str]:
    """mosquitto_pub/sub options of a device (tests only: -P puts the password in argv)."""
    return ["-u", DEVICE_USER, "-P", broker.creds.device_password(), "-i", client_id]


@pytest.fixture(scope="module")
def agent(tiny_genai_bundle, broker, tmp_path_factory):
    a = start_mqtt_agent(tiny_genai_bundle.path, tmp_path_factory.mktemp("mqtt-agent"), "mq1",
                         broker)
    wait_mqtt_connected(a)
    yield a
    assert a.stop() == 0


@pytest.fixture()
def device(broker, agent):
    with MqttChatClient(broker.url, **broker.device_login()) as c:
        yield c


def rest_answer(agent, body: dict) -> str:
    r = httpx.post(agent.url + "/v1/chat/completions", json=body, timeout=120)
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


def test_v5_streaming_matches_rest_and_ends_with_usage(agent, device, tiny_genai_bundle):
    body = chat_body("Tell me about the sea", model=tiny_genai_bundle.name)
    expected = rest_answer(agent, body)
    ok_before = metric(agent, "edgegen_mqtt_requests_total", status="ok")
    replies = list(device.chat({**body, "stream": True}, node="mq1", timeout=120))
    assert "".join(answer_text(r) for r in replies) == expected
    final = replies[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    assert final["usage"]["completion_tokens"] >= 1 and final["usage"]["prompt_tokens"] > 5
    assert all(r["object"] == "chat.completion.chunk" for r in replies)
    assert len({r["id"] for r in replies}) == 1
    # Coalesced: fewer messages than tokens (8 tokens or 50 ms per message by default).
    assert len(replies) < final["usage"]["completion_tokens"] + 2
    assert metric(agent, "edgegen_mqtt_requests_total", status="ok") == ok_before + 1


def test_v5_non_streaming_and_shared_topic(agent, device):
    body = chat_body("Hello")
    [reply] = list(device.chat(body, timeout=120))            # edgegen/v1/any/chat
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == rest_answer(agent, body)


def test_mqtt_requests_share_the_prefix_cache_with_rest(agent, device):
    system = {"role": "system", "content": "You answer questions about the sea. " * 12}
    rest = {"messages": [system, {"role": "user", "content": "Why is it salty?"}],
            "max_tokens": 8, "temperature": 0}
    r = httpx.post(agent.url + "/v1/chat/completions", json=rest, timeout=120).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    mqtt = {**rest, "messages": [system, {"role": "user", "content": "Why is it blue?"}]}
    [reply] = list(device.chat(mqtt, timeout=120))
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 64 and cached % 16 == 0   # the system prompt's whole blocks
    assert reply["choices"][0]["message"]["content"] == rest_answer(agent, mqtt)


def test_v311_device_with_body_fields(agent, broker):
    body = chat_body("Count to three")
    with MqttChatClient(broker.url, v311=True, **broker.device_login()) as c:
        replies = list(c.chat({**body, "stream": True}, node="mq1", timeout=120))
    assert "".join(answer_text(r) for r in replies) == rest_answer(agent, body)
    assert replies[-1]["usage"]


def test_mosquitto_pub_and_sub_v311_body_route(agent, broker):
    """Debian's clients speaking 3.1.1: the route and correlation id travel in the JSON."""
    sub_id = f"sub311-{uuid.uuid4().hex[:8]}"
    topic = reply_topic(sub_id)
    sub = subprocess.Popen(["mosquitto_sub", "-V", "311", "-h", "127.0.0.1", "-p",
                            str(broker.port), *mosquitto_login(broker, sub_id), "-q", "1",
                            "-t", topic, "-C", "1", "-W", "120"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: topic in broker.log(), 30, "mosquitto_sub's subscription")
        body = {**chat_body("Hi"), "reply_to": topic, "correlation_id": "c-311"}
        subprocess.run(["mosquitto_pub", "-V", "311", "-h", "127.0.0.1", "-p",
                        str(broker.port), *mosquitto_login(broker, f"pub-{sub_id}"),
                        "-q", "1", "-t", "edgegen/v1/mq1/chat",
                        "-m", json.dumps(body)], check=True, timeout=30)
        out, _ = sub.communicate(timeout=150)
    finally:
        sub.kill()
    reply = json.loads(out)
    assert reply["correlation_id"] == "c-311" and reply["object"] == "chat.completion"


def test_mosquitto_pub_and_sub_v5_properties(agent, broker):
    sub_id = f"sub5-{uuid.uuid4().hex[:8]}"
    topic = reply_topic(sub_id)
    sub = subprocess.Popen(["mosquitto_sub", "-V", "5", "-h", "127.0.0.1", "-p",
                            str(broker.port), *mosquitto_login(broker, sub_id), "-q", "1",
                            "-t", topic, "-C", "1", "-W", "120", "-F", "%D|%p"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: topic in broker.log(), 30, "mosquitto_sub's subscription")
        subprocess.run(["mosquitto_pub", "-V", "5", "-h", "127.0.0.1", "-p", str(broker.port),
                        *mosquitto_login(broker, f"pub-{sub_id}"),
                        "-q", "1", "-t", "edgegen/v1/mq1/chat", "-m", json.dumps(chat_body("Hi")),
                        "-D", "publish", "response-topic", topic,
                        "-D", "publish", "correlation-data", "corr-5"], check=True, timeout=30)
        out, _ = sub.communicate(timeout=150)
    finally:
        sub.kill()
    correlation, payload = out.strip().split("|", 1)
    assert correlation == "corr-5"
    assert json.loads(payload)["choices"][0]["message"]["content"]


def test_cli_chat_streams_the_answer(agent, broker):
    body = chat_body("Say something")
    expected = rest_answer(agent, body)
    r = subprocess.run([sys.executable, "-m", "cli.main", "mqtt", "chat", "Say something",
                        "--broker", broker.url, *device_cli_login(broker), "--node", "mq1",
                        "--max-tokens", "24",
                        "--temperature", "0", "--usage"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "completion tokens" in r.stderr


def test_cli_reports_an_agent_error(agent, broker):
    r = subprocess.run([sys.executable, "-m", "cli.main", "mqtt", "chat", "x", "--broker",
                        broker.url, *device_cli_login(broker), "--node", "mq1", "--model",
                        "no-such-model"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "no-such-model" in r.stderr, r.stderr


def test_200_malformed_messages_then_a_good_one(agent, broker):
    got: dict[bytes, dict] = {}
    client_id = f"raw-{uuid.uuid4().hex[:12]}"
    topic = reply_topic(client_id)
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(DEVICE_USER, broker.creds.device_password())
    subscribed = threading.Event()
    c.on_message = lambda cl, u, m: got.__setitem__(m.properties.CorrelationData,
                                                    json.loads(m.payload))
    c.on_subscribe = lambda *args: subscribed.set()
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        c.subscribe(topic, qos=1)
        assert subscribed.wait(30)
        bad = [b"{oops", b"\xc3\x28", b"42", b'{"messages": 5}', b"z" * (300 * 1024),
               json.dumps({"messages": [{"role": "user"}], "max_tokens": -3}).encode()]
        for i in range(200):
            p = Properties(PacketTypes.PUBLISH)
            p.ResponseTopic, p.CorrelationData = topic, f"b{i}".encode()
            c.publish("edgegen/v1/mq1/chat", bad[i % len(bad)], qos=1, properties=p)
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic, p.CorrelationData = topic, b"good"
        c.publish("edgegen/v1/mq1/chat", json.dumps(chat_body("Still there?")), qos=1,
                  properties=p)
        wait_until(lambda: len(got) >= 201, 120, "201 replies")
    finally:
        c.disconnect()
        c.loop_stop()
    assert got[b"good"]["object"] == "chat.completion"
    errors = [got[f"b{i}".encode()]["error"] for i in range(200)]
    assert all(e["type"] == "invalid_request_error" and e["message"] for e in errors)
    assert [e["code"] for e in errors[:5]] == ["invalid_json", "invalid_utf8",
                                               "not_a_chat_request", "not_a_chat_request",
                                               "payload_too_large"]
    assert errors[5]["param"]           # serving's own validation names the parameter
    assert metric(agent, "edgegen_mqtt_requests_total", status="bad_request") >= 200
    assert httpx.get(agent.url + "/healthz").status_code == 200


def test_full_queue_answers_rate_limited(tiny_genai_bundle, broker, tmp_path):
    """MQTT shares the agent's queue: one slot, no waiting room, a burst of requests."""
    a = start_mqtt_agent(tiny_genai_bundle.path, tmp_path, "busy", broker,
                         "--max-concurrency", "1", "--queue-size", "0")
    try:
        wait_mqtt_connected(a)
        with MqttChatClient(broker.url, **broker.device_login()) as c:
            ids = [c.send(chat_body("Write a long story", max_tokens=400, stream=True),
                          node="busy") for _ in range(8)]
            outcomes = [list(c.replies(i, timeout=120, raise_errors=False))[-1] for i in ids]
        limited = [o for o in outcomes if "error" in o]
        assert limited and all(o["error"]["type"] == "rate_limited" for o in limited)
        assert len(limited) < 8                      # the one in the slot was served
        assert metric(a, "edgegen_mqtt_requests_total", status="rate_limited") == len(limited)
    finally:
        a.stop()


def test_two_agents_split_the_shared_subscription(tiny_genai_bundle, tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    agents = [start_agent(tiny_genai_bundle.path, tmp_path, name, "--mqtt", broker.url)
              for name in ("split-a", "split-b")]
    try:
        for a in agents:
            wait_mqtt_connected(a)
        with MqttChatClient(broker.url) as c:
            ids = [c.send(chat_body(f"Question {i}")) for i in range(12)]
            for i in ids:
                assert list(c.replies(i, timeout=120))[-1]["object"] == "chat.completion"
            nodes = [c.answered_by[i] for i in ids]
        counts = [metric(a, "edgegen_mqtt_requests_total", status="ok") for a in agents]
    finally:
        for a in agents:
            a.stop()
        broker.stop()
    assert set(nodes) == {"split-a", "split-b"}
    assert counts == [nodes.count("split-a"), nodes.count("split-b")]
    assert min(counts) >= 3 and sum(counts) == 12


def test_broker_restart_agent_reconnects_and_answers(tiny_genai_bundle, tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    a = start_agent(tiny_genai_bundle.path, tmp_path, "restart", "--mqtt", broker.url)
    try:
        wait_mqtt_connected(a)
        with MqttChatClient(broker.url) as c:
            assert list(c.chat(chat_body("before"), node="restart", timeout=120))
        broker.stop()
        wait_until(lambda: metric(a, "edgegen_mqtt_connected") == 0, 60, "disconnect seen")
        assert httpx.get(a.url + "/healthz").status_code == 200    # REST carries on
        time.sleep(1.0)
        broker.start()
        wait_mqtt_connected(a, 90)
        with MqttChatClient(broker.url) as c:
            [reply] = list(c.chat(chat_body("after"), node="restart", timeout=120))
        assert reply["object"] == "chat.completion"
        assert "connection lost" in a.proc.log()
    finally:
        a.stop()
        broker.stop()


def test_password_auth_the_password_never_shows_and_a_wrong_one_is_one_log_line(
        tiny_genai_bundle, broker, tmp_path):
    """The agent's password from the environment or a file: never in its argv (what `ps`
    shows), never in its log; a wrong one is one clear error line; devices too."""
    password = broker.creds.agent_password()
    wrong = start_agent(tiny_genai_bundle.path, tmp_path, "authbad", "--mqtt", broker.url,
                        "--mqtt-username", AGENT_USER,
                        env={"EDGEGEN_MQTT_PASSWORD": "pw-bad-123"})
    good = start_agent(tiny_genai_bundle.path, tmp_path, "authok", "--mqtt", broker.url,
                       "--mqtt-username", AGENT_USER, "--mqtt-password-file",
                       str(broker.creds.agent_password_file))
    try:
        wait_until(lambda: "refused the connection" in wrong.proc.log(), 60, "refusal log")
        line = next(json.loads(l) for l in wrong.proc.log().splitlines()
                    if "refused the connection" in l)
        assert line["level"] == "error" and "pw-bad-123" not in json.dumps(line)
        assert "user name and password" in line["msg"] and AGENT_USER in line["msg"]
        assert metric(wrong, "edgegen_mqtt_connected") == 0
        assert httpx.get(wrong.url + "/readyz").status_code == 200  # REST unaffected
        wait_mqtt_connected(good)
        for agent, secret in ((wrong, "pw-bad-123"), (good, password)):
            argv = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().decode()
            assert secret not in argv and "--mqtt" in argv
            assert secret not in agent.proc.log()
        with pytest.raises(MqttConnectError, match="refused.*user name and password"):
            MqttChatClient(broker.url, username=DEVICE_USER, password="nope").connect()
        with pytest.raises(MqttConnectError, match="Not authorized"):
            MqttChatClient(broker.url).connect()                    # anonymous
        with MqttChatClient(broker.url, **broker.device_login()) as c:
            [reply] = list(c.chat(chat_body("secret"), node="authok", timeout=120))
        assert reply["object"] == "chat.completion"
    finally:
        wrong.stop()
        good.stop()
