"""`edgegen bundle keygen / sign / verify --trust / pull --trust` as real processes: exit codes,
one-line errors without tracebacks, and a refused pull that leaves nothing in the store."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cli.main import app
from edge_agent.bundle import MANIFEST_NAME, SIGNATURES_NAME
from tests.support.procs import REPO, EdgegenProcess, free_port, wait_http
from tests.test_bundle import toy_bundle

runner = CliRunner()


def edgegen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def key_id_of(r: subprocess.CompletedProcess) -> str:
    return r.stdout.split("key ", 1)[1].split(":", 1)[0]


@pytest.fixture
def keys(tmp_path):
    out = {}
    for name in ("a", "b"):
        r = edgegen("bundle", "keygen", tmp_path / f"{name}.key")
        assert r.returncode == 0, r.stderr
        out[name] = (tmp_path / f"{name}.key", tmp_path / f"{name}.pub", key_id_of(r))
    return out


def test_help_of_the_signing_commands():
    for cmd, flags in ((["keygen"], ["--pub"]), (["sign"], ["--key"]),
                       (["verify"], ["--trust"]), (["pull"], ["--trust", "--store"])):
        r = runner.invoke(app, ["bundle", *cmd, "--help"])
        assert r.exit_code == 0, r.output
        for f in flags:
            assert f in r.output


def test_keygen_sign_verify_round_trip_and_refusals(tmp_path, keys):
    a_key, a_pub, a_id = keys["a"]
    b_key, b_pub, b_id = keys["b"]
    assert stat.S_IMODE(a_key.stat().st_mode) == 0o600
    one_line_error(edgegen("bundle", "keygen", a_key), "already exists")
    bundle = toy_bundle(tmp_path / "store")
    path = bundle.path

    ok = edgegen("bundle", "verify", path)
    assert ok.returncode == 0 and "unsigned" in ok.stdout
    one_line_error(edgegen("bundle", "verify", path, "--trust", a_pub),
                   f"bundle toy {bundle.digest12} is not signed", a_id)

    r = edgegen("bundle", "sign", path, "--key", a_key)
    assert r.returncode == 0, r.stderr
    assert a_id in r.stdout and bundle.digest12 in r.stdout
    ok = edgegen("bundle", "verify", path, "--trust", a_pub)
    assert ok.returncode == 0, ok.stderr
    assert f"signed by trusted key {a_id}" in ok.stdout
    one_line_error(edgegen("bundle", "verify", path, "--trust", b_pub),
                   bundle.digest12, f"untrusted keys {a_id}", f"trusted keys: {b_id}")

    # a second signature by b: either key is enough; a directory of keys works too
    assert edgegen("bundle", "sign", path, "--key", b_key).returncode == 0
    assert edgegen("bundle", "verify", path, "--trust", b_pub).returncode == 0
    keydir = tmp_path / "trusted"
    keydir.mkdir()
    shutil.copy(b_pub, keydir / "b.pub")
    assert edgegen("bundle", "verify", path, "--trust", keydir).returncode == 0
    insp = json.loads(edgegen("bundle", "inspect", path, "--json").stdout)
    assert sorted(insp["signed_by"]) == sorted([a_id, b_id])


def test_tampered_file_and_tampered_manifest_are_refused(tmp_path, keys):
    a_key, a_pub, a_id = keys["a"]
    bundle = toy_bundle(tmp_path / "store")
    assert edgegen("bundle", "sign", bundle.path, "--key", a_key).returncode == 0

    flipped = tmp_path / "flipped"
    shutil.copytree(bundle.path, flipped)
    data = bytearray((flipped / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (flipped / "model.onnx.data").write_bytes(bytes(data))
    one_line_error(edgegen("bundle", "verify", flipped, "--trust", a_pub),
                   "model.onnx.data: sha256 mismatch")

    edited = tmp_path / "edited"
    shutil.copytree(bundle.path, edited)
    m = json.loads((edited / MANIFEST_NAME).read_text())
    m["context_length"] = 4096
    (edited / MANIFEST_NAME).write_text(json.dumps(m))
    one_line_error(edgegen("bundle", "verify", edited, "--trust", a_pub), a_id,
                   "does not verify")
    # the signature is checked with the key it carries even without --trust
    one_line_error(edgegen("bundle", "verify", edited), "does not verify")


def test_bad_key_files_are_one_line_errors(tmp_path, keys):
    bundle = toy_bundle(tmp_path / "store")
    one_line_error(edgegen("bundle", "sign", bundle.path, "--key", tmp_path / "nope.key"),
                   "cannot read the private key")
    one_line_error(edgegen("bundle", "sign", bundle.path, "--key", keys["a"][1]),
                   "not an unencrypted PEM private key")
    one_line_error(edgegen("bundle", "verify", bundle.path, "--trust", tmp_path / "nope.pub"),
                   "cannot read the public key")
    assert not (bundle.path / SIGNATURES_NAME).exists()


@pytest.fixture
def published(tmp_path):
    """A store with one unsigned toy bundle, published by `edgegen bundle serve`."""
    store = tmp_path / "published"
    bundle = toy_bundle(store)
    port = free_port()
    server = EdgegenProcess(["bundle", "serve", str(store), "--port", str(port)], tmp_path,
                            "serve")
    try:
        wait_http(f"http://127.0.0.1:{port}/index.json", proc=server.proc)
        yield bundle, f"http://127.0.0.1:{port}/{bundle.name}/{bundle.digest12}/"
    finally:
        server.stop()


def test_pull_with_trust_refuses_unsigned_and_other_keys_leaving_nothing(tmp_path, keys,
                                                                         published):
    bundle, url = published
    a_key, a_pub, a_id = keys["a"]
    cache = tmp_path / "cache"
    one_line_error(edgegen("bundle", "pull", url, "--store", cache, "--trust", a_pub),
                   f"bundle toy {bundle.digest12} is not signed", a_id)
    assert not cache.exists() or not any(cache.iterdir())

    assert edgegen("bundle", "sign", bundle.path, "--key", keys["b"][0]).returncode == 0
    one_line_error(edgegen("bundle", "pull", url, "--store", cache, "--trust", a_pub),
                   f"untrusted keys {keys['b'][2]}")
    assert not cache.exists() or not any(cache.iterdir())

    assert edgegen("bundle", "sign", bundle.path, "--key", a_key).returncode == 0
    r = edgegen("bundle", "pull", url, "--store", cache, "--trust", a_pub)
    assert r.returncode == 0, r.stderr
    got = cache / bundle.name / bundle.digest12
    assert (got / SIGNATURES_NAME).is_file()
    assert edgegen("bundle", "verify", got, "--trust", a_pub).returncode == 0


def test_pull_with_trust_refuses_a_cached_unsigned_copy_and_picks_up_its_signature(
        tmp_path, keys, published):
    """Pulled unsigned first (no policy), signed at the origin later: a pull with --trust gets
    the signature into the cached copy without downloading the bundle again."""
    bundle, url = published
    a_key, a_pub, _ = keys["a"]
    cache = tmp_path / "cache"
    assert edgegen("bundle", "pull", url, "--store", cache).returncode == 0
    got = cache / bundle.name / bundle.digest12
    assert not (got / SIGNATURES_NAME).exists()
    one_line_error(edgegen("bundle", "pull", url, "--store", cache, "--trust", a_pub),
                   "is not signed")
    assert edgegen("bundle", "sign", bundle.path, "--key", a_key).returncode == 0
    r = edgegen("bundle", "pull", url, "--store", cache, "--trust", a_pub)
    assert r.returncode == 0, r.stderr
    assert (got / SIGNATURES_NAME).is_file()
