"""Reading a Consul token and the fleet key as Consul's CLI reads a token (a named file wins,
an empty one falls back to the literal), and writing a fleet's secrets (0600 files, an ACL
file the registry accepts with the rules each role needs)."""

from __future__ import annotations

import stat

import pytest

from cloud_router.credentials import consul_token, fleet_key, write_fleet_secrets
from cloud_router.errors import ConfigError
from cloud_router.registry.acl import allows, load_acl_file


@pytest.mark.parametrize("literal, file_text, expected", [
    (None, None, None),
    ("", None, None),
    ("  lit  ", None, "lit"),
    ("lit", "from-file\n", "from-file"),      # the file wins, as in Consul's api.NewClient
    ("lit", "\n", "lit"),                     # an empty file falls back to the literal
    (None, "from-file", "from-file"),
])
def test_consul_token(tmp_path, literal, file_text, expected):
    path = None
    if file_text is not None:
        path = tmp_path / "token"
        path.write_text(file_text)
    assert consul_token(literal, path) == expected


def test_an_unreadable_token_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the Consul token file .*missing"):
        consul_token("lit", tmp_path / "missing")


def test_fleet_key(tmp_path):
    assert fleet_key(None, None) is None
    assert fleet_key("k" * 16, None) == b"k" * 16
    path = tmp_path / "key"
    path.write_text("f" * 64 + "\n")
    assert fleet_key("ignored-literal-key", path) == b"f" * 64
    path.write_text("short")
    with pytest.raises(ConfigError, match="shorter than 16") as e:
        fleet_key(None, path)
    assert "short" not in str(e.value).replace("shorter", "")
    path.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        fleet_key(None, path)


@pytest.mark.parametrize("anonymous_read", [False, True])
def test_a_fleets_secrets(tmp_path, anonymous_read):
    s = write_fleet_secrets(tmp_path / "secrets", anonymous_read=anonymous_read)
    for p in s.directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    acl = load_acl_file(s.acl_file)
    agent, router, root = (acl.resolve(s.token_file(r).read_text().strip())
                           for r in ("agent", "router", "management"))
    assert root.management
    for service in ("edgegen-edge", "edgegen-central"):
        assert allows(acl, agent, "service", service, "write")
        assert allows(acl, router, "service", service, "read")
        assert not allows(acl, router, "service", service, "write")
        assert allows(acl, acl.resolve(""), "service", service, "read") is anonymous_read
        assert not allows(acl, acl.resolve(""), "service", service, "write")
    assert allows(acl, router, "node", "edge-1", "read")
    assert not allows(acl, agent, "service", "something-else", "write")
    # the fleet's KV keys (rollout state): agents and the router write under edgegen/ only
    for token in (agent, router):
        assert allows(acl, token, "key", "edgegen/rollout/wave", "write")
        assert not allows(acl, token, "key", "other/key", "read")
    assert not allows(acl, acl.resolve(""), "key", "edgegen/rollout/wave", "read")
    env = s.env("router")
    assert env["CONSUL_HTTP_TOKEN"] == s.token_file("router").read_text().strip()
    assert env["EDGEGEN_FLEET_KEY"].encode() == fleet_key(None, s.fleet_key_file)
