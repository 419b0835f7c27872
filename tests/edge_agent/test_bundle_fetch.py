"""Bundle URLs against a real `edgegen bundle serve` process: fetch, resume, tamper, offline."""

from __future__ import annotations

import json
import shutil

import pytest

from edge_agent.bundle.fetch import fetch_bundle, resolve_bundle
from edge_agent.errors import BundleFetchError, BundleIntegrityError
from tests.support.procs import EdgegenProcess, free_port, wait_http


@pytest.fixture(scope="module")
def served(tiny_genai_bundle, tmp_path_factory):
    """A copy of the tiny bundle's store published over HTTP."""
    store = tmp_path_factory.mktemp("published")
    dest = store / tiny_genai_bundle.name / tiny_genai_bundle.digest12
    shutil.copytree(tiny_genai_bundle.path, dest)
    port = free_port()
    proc = EdgegenProcess(["bundle", "serve", str(store), "--port", str(port)],
                          tmp_path_factory.mktemp("logs"), "bundle-serve")
    wait_http(f"http://127.0.0.1:{port}/index.json", proc=proc.proc)
    yield f"http://127.0.0.1:{port}", store
    proc.stop()


def _url(base, b):
    return f"{base}/{b.name}/{b.digest12}/"


def test_fetch_verifies_and_lands_content_addressed(served, tiny_genai_bundle, tmp_path):
    base, _ = served
    b = fetch_bundle(_url(base, tiny_genai_bundle), tmp_path)
    assert b.digest == tiny_genai_bundle.digest
    assert b.path == (tmp_path / b.name / b.digest12).resolve()
    assert not list((tmp_path / ".partial").iterdir())


def test_fetch_resumes_a_partial_file(served, tiny_genai_bundle, tmp_path):
    base, _ = served
    big = max(tiny_genai_bundle.manifest["files"].items(), key=lambda kv: kv[1]["size"])[0]
    partial = tmp_path / ".partial" / tiny_genai_bundle.digest / big
    partial.parent.mkdir(parents=True)
    data = tiny_genai_bundle.file(big).read_bytes()
    partial.write_bytes(data[: len(data) // 2])
    seen = []
    b = fetch_bundle(_url(base, tiny_genai_bundle), tmp_path,
                     progress=lambda name, done, total: seen.append((name, done)))
    assert b.digest == tiny_genai_bundle.digest
    first_big = next(done for name, done in seen if name == big.split("/")[-1])
    assert first_big > len(data) // 2  # continued from the half already there


def test_tampered_file_on_the_server_is_refused(served, tiny_genai_bundle, tmp_path):
    base, store = served
    target = store / tiny_genai_bundle.name / tiny_genai_bundle.digest12 / "tokenizer_config.json"
    original = target.read_bytes()
    try:
        target.write_bytes(original.replace(b"}", b' , "x": 1}', 1))
        with pytest.raises(BundleFetchError, match="sha256"):
            fetch_bundle(_url(base, tiny_genai_bundle), tmp_path)
        assert not (tmp_path / tiny_genai_bundle.name).exists()
    finally:
        target.write_bytes(original)


def test_unreachable_url_is_a_clear_error_and_a_cached_digest_needs_no_network(served, tiny_genai_bundle, tmp_path):
    base, _ = served
    url = f"{base}/{tiny_genai_bundle.name}/{tiny_genai_bundle.digest12}"
    fetch_bundle(url, tmp_path)
    dead = f"http://127.0.0.1:{free_port()}/latest/"
    with pytest.raises(BundleFetchError, match="cannot reach"):
        fetch_bundle(dead, tmp_path)
    # a URL naming a cached digest needs no network at all
    assert resolve_bundle(url.replace(base, f"http://127.0.0.1:{free_port()}"),
                          tmp_path).digest == tiny_genai_bundle.digest


def test_local_tampered_bundle_is_refused(tiny_genai_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_genai_bundle.path, copy)
    (copy / "config.json").write_text(json.dumps({"evil": True})) if (copy / "config.json").exists() \
        else (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleIntegrityError):
        resolve_bundle(str(copy), tmp_path)


def test_fetch_with_a_trust_policy_refuses_before_downloading(served, tiny_genai_bundle, tmp_path):
    from edge_agent.bundle.signing import (
        BundleSignatureError,
        generate_keypair,
        load_private_key,
        load_trust,
        sign_bundle,
    )

    base, store = served
    priv, pub, kid = generate_keypair(tmp_path / "k.key")
    trust = load_trust([pub])
    cache = tmp_path / "cache"
    with pytest.raises(BundleSignatureError, match=f"{tiny_genai_bundle.digest12} is not signed"):
        fetch_bundle(_url(base, tiny_genai_bundle), cache, trust=trust)
    assert not cache.exists()
    published = store / tiny_genai_bundle.name / tiny_genai_bundle.digest12
    sign_bundle(published, load_private_key(priv))
    try:
        b = fetch_bundle(_url(base, tiny_genai_bundle), cache, trust=trust)
        assert trust.check_bundle(b) == kid
        # offline, the cached copy is still held to the policy
        dead = _url(f"http://127.0.0.1:{free_port()}", tiny_genai_bundle)
        assert fetch_bundle(dead, cache, trust=trust).digest == b.digest
        other = load_trust([generate_keypair(tmp_path / "other.key")[1]])
        with pytest.raises(BundleSignatureError, match="untrusted keys"):
            fetch_bundle(dead, cache, trust=other)
    finally:
        (published / "edgegen.sig").unlink()


def test_a_bundle_that_does_not_fit_the_disk_is_refused_before_downloading(
        served, tiny_genai_bundle, tmp_path, monkeypatch):
    import edge_agent.bundle.fetch as fetch

    total = sum(e["size"] for e in tiny_genai_bundle.manifest["files"].values())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: usage._replace(
        free=fetch.DISK_MARGIN + total - 1))
    base, _ = served
    with pytest.raises(BundleFetchError, match="MiB free"):
        fetch_bundle(_url(base, tiny_genai_bundle), tmp_path)
    partial = tmp_path / ".partial" / tiny_genai_bundle.digest   # no model file was fetched
    assert {p.name for p in partial.iterdir()} <= {"edgegen.json", "edgegen.sig"}
    assert not (tmp_path / tiny_genai_bundle.name).exists()
