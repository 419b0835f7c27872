"""Signed bundles end to end: `edgegen export --sign-key` on a real tiny model, an agent with
`--trust-key` that refuses to start on an unsigned or foreign-signed bundle, and one that keeps
serving its bundle (checked with a real request) when a hot swap is refused for each of:
unsigned, signed by another key, a tampered file, a tampered manifest, an unsigned URL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from edge_agent.bundle import MANIFEST_NAME, SIGNATURES_NAME, open_bundle
from edge_agent.bundle.signing import generate_keypair, load_private_key, sign_bundle
from tests.e2e.agent_support import start_agent
from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http

ADMIN = "s3cret"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {n: generate_keypair(d / f"{n}.key") for n in ("a", "b")}


def copy_of(bundle_path, dest, sign_with=None):
    shutil.copytree(bundle_path, dest)
    (dest / SIGNATURES_NAME).unlink(missing_ok=True)
    if sign_with is not None:
        sign_bundle(dest, load_private_key(sign_with))
    return dest


@pytest.fixture(scope="module")
def signed_export(tiny_llama_dir, keys, tmp_path_factory):
    """`edgegen export --sign-key` on the tiny llama: the bundle is signed as it is written."""
    store = tmp_path_factory.mktemp("signed-store")
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "export", str(tiny_llama_dir), "--precision", "fp32",
         "--exporter", "genai", "--out", str(store), "--name", "tiny-signed", "--threads", "2",
         "--sign-key", str(keys["a"][0]), "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout[r.stdout.index("{"):])
    return open_bundle(m["path"])


def test_export_signs_as_it_writes(signed_export, keys):
    sig = json.loads((signed_export.path / SIGNATURES_NAME).read_text())
    [entry] = sig["signatures"]
    assert entry["key_id"] == keys["a"][2] and entry["digest"] == signed_export.digest
    assert SIGNATURES_NAME not in signed_export.manifest["files"]


def test_export_with_a_bad_sign_key_fails_before_any_work(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "export", str(tmp_path / "no-such-model"),
         "--out", str(tmp_path / "store"), "--sign-key", str(tmp_path / "missing.key")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "--sign-key: cannot read the private key" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def _agent_refuses(bundle, tmp_path, name, *trust) -> str:
    port = free_port()
    r = subprocess.run(
        [sys.executable, "-m", "cli.main", "agent", "--bundle", str(bundle), "--node", name,
         "--port", str(port), "--threads", "2", *trust],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
    return errors[0]


def test_agent_refuses_to_start_on_an_unsigned_or_foreign_bundle(tiny_genai_bundle, keys,
                                                                 tmp_path):
    unsigned = copy_of(tiny_genai_bundle.path, tmp_path / "unsigned")
    line = _agent_refuses(unsigned, tmp_path, "unsigned", "--trust-key", str(keys["a"][1]))
    assert f"{tiny_genai_bundle.digest12} is not signed" in line and keys["a"][2] in line
    foreign = copy_of(tiny_genai_bundle.path, tmp_path / "foreign", sign_with=keys["b"][0])
    line = _agent_refuses(foreign, tmp_path, "foreign", "--trust-key", str(keys["a"][1]))
    assert f"untrusted keys {keys['b'][2]}" in line and keys["a"][2] in line


def _completes(url: str, model: str) -> None:
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={"model": model, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_agent_keeps_serving_when_a_hot_swap_is_refused(signed_export, tiny_genai_bundle, keys,
                                                         tmp_path):
    a_key, a_pub, a_id = keys["a"]
    b_key, _, b_id = keys["b"]
    unsigned = copy_of(tiny_genai_bundle.path, tmp_path / "unsigned")
    foreign = copy_of(tiny_genai_bundle.path, tmp_path / "foreign", sign_with=b_key)
    tampered = copy_of(tiny_genai_bundle.path, tmp_path / "tampered", sign_with=a_key)
    data = bytearray((tampered / "model.onnx.data").read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte, same size
    (tampered / "model.onnx.data").write_bytes(bytes(data))
    edited = copy_of(tiny_genai_bundle.path, tmp_path / "edited", sign_with=a_key)
    m = json.loads((edited / MANIFEST_NAME).read_text())
    m["context_length"] = 64
    (edited / MANIFEST_NAME).write_text(json.dumps(m))
    good = copy_of(tiny_genai_bundle.path, tmp_path / "good", sign_with=a_key)

    # the trusted key given as a directory of keys, as the K3s ConfigMap mounts it
    keydir = tmp_path / "trusted"
    keydir.mkdir()
    shutil.copy(a_pub, keydir / "release.pub")
    store = tmp_path / "agent-store"
    a = start_agent(signed_export.path, tmp_path, "trusting", "--admin-token", ADMIN,
                    "--trust-key", str(keydir), "--store", str(store))
    server = None
    try:
        url = a.url + "/edgegen/v1/bundle"
        auth = {"authorization": f"Bearer {ADMIN}"}
        assert httpx.get(url).json()["digest"] == signed_export.digest
        _completes(a.url, signed_export.name)

        cases = [
            (unsigned, [f"{tiny_genai_bundle.digest12} is not signed", a_id]),
            (foreign, [f"untrusted keys {b_id}", a_id]),
            (tampered, ["model.onnx.data: sha256 mismatch"]),
            (edited, [a_id, "does not verify"]),
        ]
        for path, needles in cases:
            r = httpx.post(url, json={"path": str(path)}, headers=auth, timeout=120)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert err["code"] == "bad_bundle" and err["type"] == "invalid_request_error"
            for n in needles:
                assert n in err["message"], err["message"]
            assert "\n" not in err["message"]
            assert httpx.get(url).json()["digest"] == signed_export.digest
            _completes(a.url, signed_export.name)

        # an unsigned bundle URL is refused before anything lands in the agent's store
        published = tmp_path / "published"
        copy_of(tiny_genai_bundle.path,
                published / tiny_genai_bundle.name / tiny_genai_bundle.digest12)
        port = free_port()
        server = EdgegenProcess(["bundle", "serve", str(published), "--port", str(port)],
                                tmp_path, "bundle-serve")
        wait_http(f"http://127.0.0.1:{port}/index.json", proc=server.proc)
        bundle_url = (f"http://127.0.0.1:{port}/{tiny_genai_bundle.name}/"
                      f"{tiny_genai_bundle.digest12}/")
        r = httpx.post(url, json={"url": bundle_url}, headers=auth, timeout=120)
        assert r.status_code == 400 and "is not signed" in r.json()["error"]["message"]
        assert not store.exists() or not any(store.iterdir())
        assert httpx.get(url).json()["digest"] == signed_export.digest
        _completes(a.url, signed_export.name)

        # a bundle signed by the trusted key is swapped in
        r = httpx.post(url, json={"path": str(good)}, headers=auth, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["digest"] == tiny_genai_bundle.digest
        _completes(a.url, tiny_genai_bundle.name)
    finally:
        if server is not None:
            server.stop()
        a.stop()
    assert "not signature-checked" not in a.proc.log_path.read_text()


def test_agent_without_trusted_keys_says_so_once(tiny_genai_bundle, tmp_path):
    a = start_agent(tiny_genai_bundle.path, tmp_path, "untrusting")
    try:
        _completes(a.url, tiny_genai_bundle.name)
    finally:
        a.stop()
    assert a.proc.log_path.read_text().count("bundles are not signature-checked") == 1
