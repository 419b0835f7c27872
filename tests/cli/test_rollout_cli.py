"""`edgegen rollout` against a real registry process: status before any rollout, control
commands, and bad input refused with a clear message before anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from manifests.consul_kv import ConsulKV
from tests.cloud_router.registry_support import start_registry
from tests.support.fake_engine import write_fake_bundle
from tests.support.procs import REPO


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    proc, url = start_registry(tmp_path_factory.mktemp("rollout-cli"))
    yield url
    proc.stop()


def edgegen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_status_before_any_rollout(registry):
    r = edgegen("rollout", "status", "--consul", registry)
    assert r.returncode == 0 and "no rollout has run" in r.stdout


def test_pause_and_abort_need_a_running_rollout(registry):
    r = edgegen("rollout", "abort", "--consul", registry)
    assert r.returncode != 0 and "no rollout is running" in r.stderr + r.stdout
    kv = ConsulKV(registry)
    assert kv.put("edgegen/rollout/lock", b"r-123", cas=0)
    try:
        r = edgegen("rollout", "pause", "--consul", registry)
        assert r.returncode == 0, r.stderr
        assert kv.get("edgegen/rollout/control") == b"pause"
        r = edgegen("rollout", "status", "--consul", registry)
        assert "no rollout has run" in r.stdout
        # a rollout whose process died holds the lock: --force releases it
        r = edgegen("rollout", "abort", "--force", "--consul", registry)
        assert r.returncode == 0 and kv.get("edgegen/rollout/lock") is None
    finally:
        kv.delete("edgegen/rollout/lock")
        kv.delete("edgegen/rollout/control")


@pytest.mark.parametrize("option, value, message", [
    ("--gates", "latency<=2", "latency"),
    ("--gates", "ttft_p95=<2", "=<"),
    ("--waves", "50%,10%", "10%"),
    ("--groups", "mars", "unknown group 'mars'"),
])
def test_bad_input_is_refused_before_anything_is_written(registry, bpe_tokenizer_dir, tmp_path,
                                                         option, value, message):
    bundle = write_fake_bundle(bpe_tokenizer_dir, tmp_path)
    r = edgegen("rollout", "start", str(bundle.path), "--bundle-url", "http://127.0.0.1:9/x/",
                "--consul", registry, option, value)
    assert r.returncode != 0
    assert message in r.stderr + r.stdout
    assert "Traceback" not in r.stderr
    kv = ConsulKV(registry)
    assert kv.get("edgegen/rollout/lock") is None
    assert kv.get_prefix("edgegen/nodes/") == {}
