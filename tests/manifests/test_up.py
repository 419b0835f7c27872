"""`edgegen up` without the processes: which bundle it serves, and what it prints for a fleet
that stays up (the "try it" commands) or stops after the demo (none). The whole fleet runs
for real in tests/e2e/test_up.py."""

import signal
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from cli.main import app
from edge_agent.bundle import staging_dir, write_bundle
from manifests import demo, fleet
from manifests.render import BundleRef

MANIFEST = {
    "task": "text-generation", "runtime": "onnxruntime", "exporter": "test",
    "source": {"kind": "test", "reference": "none", "sha256": "0" * 64},
    "precision": "int8", "signature": {}, "context_length": 128, "validation": {},
}


def store_bundle(store: Path, name: str, created: str):
    stage = staging_dir(store)
    (stage / "model.onnx").write_bytes(f"not a real model: {name} {created}".encode())
    return write_bundle(stage, {**MANIFEST, "name": name, "created": created}, store)


def test_up_serves_the_newest_bundle_whatever_its_name(tmp_path, monkeypatch):
    store_bundle(tmp_path, "zeta", "2025-01-01T00:00:00+00:00")
    newest = store_bundle(tmp_path, "alpha", "2025-06-01T09:00:00+00:00")
    store_bundle(tmp_path, "zeta", "2025-06-01T08:59:59+00:00")
    started = []
    monkeypatch.setattr(fleet, "run_fleet", lambda opts, **kw: started.append(opts))
    r = CliRunner().invoke(app, ["up"], env={"EDGEGEN_STORE": str(tmp_path)})
    assert r.exit_code == 0, r.output
    assert [opts.bundle for opts in started] == [str(newest.path)]


class CtrlC:
    """A fleet process; polling it is when the user presses Ctrl-C."""

    def poll(self):
        raise KeyboardInterrupt


class FakeFleet:
    """What run_fleet reads of a started fleet."""

    router_url = "http://127.0.0.1:18080"
    registry_url = "http://127.0.0.1:18500"
    mqtt_url = "mqtt://127.0.0.1:11883"
    bundle = BundleRef("tiny", "0" * 64, "file:///tiny")
    workdir = Path("/nowhere")

    def __init__(self):
        self.procs = [("router", CtrlC())]
        self.stopped = False

    def stop(self, keep_logs=False):
        self.stopped = True


@pytest.fixture
def fake_fleet(monkeypatch):
    """run_fleet over a FakeFleet, with canned demo answers; SIGTERM's handler restored."""
    started = FakeFleet()
    monkeypatch.setattr(fleet, "start_fleet", lambda opts, console=None: started)
    monkeypatch.setattr(demo, "ask_rest", lambda url, model: ("Edge is near.", "edge-eu-west"))
    monkeypatch.setattr(demo, "ask_mqtt", lambda broker: "Edge is near.")
    handler = signal.getsignal(signal.SIGTERM)
    yield started
    signal.signal(signal.SIGTERM, handler)


def run(demo_flag: bool) -> str:
    console = Console(record=True, width=300)
    fleet.run_fleet(fleet.FleetOptions(), console=console, demo=demo_flag)
    return console.export_text()


def test_a_fleet_that_stays_up_says_how_to_try_it(fake_fleet):
    out = run(demo_flag=False)
    assert "try it:" in out
    for line in fleet.try_it(fake_fleet):
        assert f"  {line}\n" in out
    assert "curl -s http://127.0.0.1:18080/v1/chat/completions" in out
    assert "edgegen mqtt chat --broker mqtt://127.0.0.1:11883 'Hello!'" in out
    assert out.endswith("stopping ...\n") and fake_fleet.stopped


def test_the_demo_prints_no_commands_for_the_fleet_it_stops(fake_fleet):
    out = run(demo_flag=True)
    assert "try it" not in out and "curl" not in out and "edgegen status" not in out
    assert "REST answer (router → edge-eu-west): Edge is near.\n" in out
    assert ("MQTT question: edgegen mqtt chat --broker mqtt://127.0.0.1:11883 --max-tokens 48 "
            f"--temperature 0 --no-stream '{demo.PROMPT}'\n") in out
    assert "MQTT answer: Edge is near.\n" in out
    assert fake_fleet.stopped


def fleet_workdir(tmp_path: Path) -> fleet.Fleet:
    """A stopped fleet's temporary workdir: logs, a node's bundle copy, the broker's config."""
    workdir = tmp_path / "edgegen-fleet-x"
    (workdir / "logs").mkdir(parents=True)
    (workdir / "logs" / "router.log").write_text("router exited\n")
    (workdir / "nodes" / "edge-1" / "bundles").mkdir(parents=True)
    (workdir / "nodes" / "edge-1" / "bundles" / "model.onnx").write_bytes(b"x" * 1024)
    (workdir / "mosquitto.conf").write_text("listener 1883\n")
    return fleet.Fleet(fleet.FleetOptions(), workdir, temporary=True)


def test_a_stopped_fleet_deletes_its_temporary_workdir(tmp_path):
    f = fleet_workdir(tmp_path)
    f.stop()
    assert not f.workdir.exists()


def test_a_failed_fleet_keeps_only_the_logs_its_error_points_at(tmp_path):
    f = fleet_workdir(tmp_path)
    f.stop(keep_logs=True)
    assert [p.name for p in f.workdir.iterdir()] == ["logs"]
    assert (f.workdir / "logs" / "router.log").read_text() == "router exited\n"


def test_a_fleet_never_deletes_a_workdir_it_was_given(tmp_path):
    f = fleet_workdir(tmp_path)
    f.temporary = False
    f.stop()
    assert (f.workdir / "nodes" / "edge-1" / "bundles" / "model.onnx").exists()
