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
