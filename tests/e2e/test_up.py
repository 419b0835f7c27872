"""`edgegen up --demo`: the whole local fleet answers once over REST and once over MQTT."""

import os
import subprocess
import sys

from tests.support.procs import REPO, free_port


def test_up_demo_answers_over_rest_and_mqtt(tiny_genai_bundle, tmp_path):
    ports = [str(free_port()) for _ in range(3)]
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--bundle", str(tiny_genai_bundle.path),
         "--router-port", ports[0], "--registry-port", ports[1], "--mqtt-port", ports[2],
         "--demo"],
        cwd=REPO, capture_output=True, text=True, timeout=540,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for node in ("edge-eu-west", "edge-us-east", "edge-ap-south", "central-1"):
        assert node in out
    rest = [line for line in out.splitlines() if line.startswith("REST answer (router → edge-")]
    mqtt = [line for line in out.splitlines() if line.startswith("MQTT answer: ")]
    assert rest and len(rest[0].split(":", 1)[1].strip()) > 0
    assert mqtt and len(mqtt[0].split(":", 1)[1].strip()) > 0
    # Both questions are greedy on the same bundle: the same answer, whichever agent gave it.
    assert rest[0].split(":", 1)[1].strip() == mqtt[0].split(":", 1)[1].strip()
    assert f"edgegen mqtt chat --broker mqtt://127.0.0.1:{ports[2]}" in out
    # The fleet stops after the demo: no "try it" commands for it.
    assert "try it" not in out and "curl" not in out and "edgegen status" not in out
    # ... and deletes its workdir: four copies of the bundle, one per node.
    assert not list(tmp_path.glob("edgegen-fleet-*"))


def test_up_without_a_bundle_says_how_to_export_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cli.main", "up"], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env={**os.environ,
                                                   "EDGEGEN_STORE": str(tmp_path / "empty")})
    assert r.returncode == 1
    assert "edgegen export" in r.stderr
