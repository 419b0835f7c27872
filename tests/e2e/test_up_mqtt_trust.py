"""`edgegen up`'s broker is locked: fresh random credentials in 0600 files, the agents' password
in their environment and never in their argv, anonymous devices refused, and the fleet says
how a device logs in. A one-node fleet, started in-process as `edgegen up` starts it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from rich.console import Console

from edge_agent.errors import MqttConnectError
from edge_agent.mqtt.contract import DEVICE_USER
from edge_agent.mqtt.credentials import BrokerCredentials
from edge_agent.mqtt.device_client import MqttChatClient
from manifests.fleet import FleetOptions, device_login, start_fleet, try_it
from tests.support.procs import free_port

pytestmark = [pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fleet(tiny_genai_bundle, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trusted-fleet")
    cluster = tmp / "cluster.yaml"
    cluster.write_text("nodes:\n- {name: edge-solo, region: eu-west, zone: eu-west-1a}\n")
    console = Console(record=True, width=400)
    f = start_fleet(FleetOptions(cluster=cluster, bundle=str(tiny_genai_bundle.path),
                                 router_port=free_port(), registry_port=free_port(),
                                 mqtt_port=free_port(), workdir=tmp / "work"), console)
    f.printed = console.export_text()
    yield f
    f.stop()


def test_credentials_are_private_files(fleet):
    creds = BrokerCredentials(fleet.workdir / "mqtt")
    for path in (creds.passwd, creds.acl, creds.agent_password_file,
                 creds.device_password_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert creds.agent_password() not in creds.passwd.read_text()
    conf = (fleet.workdir / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf
    assert f"password_file {creds.passwd}" in conf and f"acl_file {creds.acl}" in conf


def test_the_agents_password_is_in_their_environment_never_their_argv(fleet):
    password = BrokerCredentials(fleet.workdir / "mqtt").agent_password()
    [agent] = [p for n, p in fleet.procs if n == "edge-solo/agent"]
    argv = Path(f"/proc/{agent.pid}/cmdline").read_bytes().split(b"\0")
    environ = Path(f"/proc/{agent.pid}/environ").read_bytes().split(b"\0")
    assert b"--mqtt-username" in argv and not any(password.encode() in a for a in argv)
    assert f"EDGEGEN_MQTT_PASSWORD={password}".encode() in environ
    for proc_name, _ in fleet.procs:
        assert password not in fleet.log_tail(proc_name, lines=10_000)
    assert password not in fleet.printed


def test_a_device_logs_in_as_told_and_anonymous_ones_are_refused(fleet):
    creds = BrokerCredentials(fleet.workdir / "mqtt")
    assert DEVICE_USER in fleet.printed and str(creds.device_password_file) in fleet.printed
    assert "edgegen/v1/reply/<its client id>" in fleet.printed
    login = device_login(fleet)
    assert login == ["--mqtt-username", DEVICE_USER, "--mqtt-password-file",
                     str(creds.device_password_file)]
    assert any(line.endswith(" ".join(login)) for line in try_it(fleet))
    with pytest.raises(MqttConnectError, match="Not authorized"):
        MqttChatClient(fleet.mqtt_url).connect()
    with MqttChatClient(fleet.mqtt_url, username=DEVICE_USER,
                        password=creds.device_password()) as device:
        [reply] = list(device.chat({"messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 4}, node="edge-solo", timeout=120))
    assert reply["object"] == "chat.completion"
