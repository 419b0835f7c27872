"""`edgegen mqtt chat` in-process with Typer's CliRunner: help, option errors, a broker that is
not there, and a real answer through a real Mosquitto and bridge (fake serving)."""

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_agent.settings import AgentSettings
from tests.support.mosquitto import Mosquitto
from tests.support.mqtt_fakes import BridgeThread, FakeServing
from tests.support.procs import free_port

runner = CliRunner()


def test_help_names_the_options():
    r = runner.invoke(app, ["mqtt", "chat", "--help"])
    assert r.exit_code == 0
    for option in ("--broker", "--node", "--v311", "--no-stream", "--ca-file", "--timeout"):
        assert option in r.output


def test_a_bad_broker_url_is_one_clear_error():
    r = runner.invoke(app, ["mqtt", "chat", "hi", "--broker", "http://x"])
    assert r.exit_code != 0 and "mqtt:// or mqtts://" in str(r.exception)


def test_no_broker_listening_is_a_connect_error():
    r = runner.invoke(app, ["mqtt", "chat", "hi", "--broker",
                            f"mqtt://127.0.0.1:{free_port()}"])
    assert r.exit_code != 0 and "cannot connect to MQTT broker" in str(r.exception)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags", [[], ["--no-stream"], ["--v311"], ["--node", "cli"]])
def test_chat_prints_the_answer(tmp_path, flags):
    with Mosquitto(tmp_path / "broker") as broker:
        bridge = BridgeThread(AgentSettings(bundle="unused", node="cli", mqtt=broker.url),
                              FakeServing())
        try:
            bridge.wait_connected()
            r = runner.invoke(app, ["mqtt", "chat", "words come back in order", "--broker",
                                    broker.url, *flags])
        finally:
            bridge.stop()
    assert r.exit_code == 0, r.output
    assert r.stdout == "words come back in order\n"


def test_help_names_the_login_options():
    wide = {"COLUMNS": "200"}
    r = runner.invoke(app, ["mqtt", "chat", "--help"], env=wide)
    for option in ("--mqtt-username", "--mqtt-password-file", "--client-id"):
        assert option in r.output
    r = runner.invoke(app, ["agent", "--help"], env=wide)
    assert "--mqtt-username" in r.output and "--mqtt-password-file" in r.output
    r = runner.invoke(app, ["mqtt", "credentials", "--help"], env=wide)
    assert r.exit_code == 0 and "--out" in r.output and "--namespace" in r.output


def test_credentials_writes_private_files_and_the_secret(tmp_path):
    import base64
    import stat

    import kubernetes_validate.utils as kv
    import yaml

    from edge_agent.mqtt.credentials import BrokerCredentials
    from manifests.render import K3S_KUBERNETES_VERSION, MQTT_SECRET

    out = tmp_path / "creds"
    r = runner.invoke(app, ["mqtt", "credentials", "--out", str(out), "-n", "edge-prod"])
    assert r.exit_code == 0, r.output
    creds = BrokerCredentials(out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for f in (creds.passwd, creds.acl, creds.agent_password_file, creds.device_password_file,
              out / "secret.yaml"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    agent, device = creds.agent_password(), creds.device_password()
    assert len(agent) >= 32 and agent != device
    passwd = creds.passwd.read_text()
    assert passwd.startswith("edgegen-agent:$7$") and "\nedgegen-device:$7$" in passwd
    assert agent not in passwd and device not in passwd
    assert agent not in r.output and device not in r.output
    assert f"kubectl apply -f {out / 'secret.yaml'}" in r.stdout
    assert str(creds.device_password_file) in r.output
    secret = yaml.safe_load((out / "secret.yaml").read_text())
    kv.validate(secret, K3S_KUBERNETES_VERSION, strict=True)
    assert secret["metadata"] == {**secret["metadata"], "name": MQTT_SECRET,
                                  "namespace": "edge-prod"}
    assert base64.b64decode(secret["data"]["passwd"]).decode() == passwd
    assert base64.b64decode(secret["data"]["agent-password"]).decode() == agent
    again = runner.invoke(app, ["mqtt", "credentials", "--out", str(out)])
    assert again.exit_code != 0 and "--force" in again.output
    assert creds.agent_password() == agent
    assert runner.invoke(app, ["mqtt", "credentials", "--out", str(out), "--force"]).exit_code == 0
    assert creds.agent_password() != agent


def test_a_password_file_that_cannot_be_read_is_one_clear_error(tmp_path):
    r = runner.invoke(app, ["mqtt", "chat", "hi", "--broker", "mqtt://127.0.0.1:1",
                            "--mqtt-username", "u", "--mqtt-password-file",
                            str(tmp_path / "missing")])
    assert r.exit_code != 0 and "cannot read the MQTT password file" in str(r.exception)
