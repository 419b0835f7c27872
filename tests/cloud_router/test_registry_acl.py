"""The registry's ACL decision, table-driven (pure: no process, no socket): Consul's rule
precedence, its access levels, its denial texts, where a request's token is read from, and
the ACL file's refusals."""

from __future__ import annotations

import pytest

from cloud_router.errors import AclNotFound, ConfigError, PermissionDenied
from cloud_router.registry.acl import (
    ANONYMOUS_ACCESSOR,
    access_for,
    allows,
    denial_message,
    load_acl_file,
    parse_acl,
    request_token,
)

SECRET = "s3cret-agent-token-0123456789"
READER = "s3cret-reader-token-0123456789"
ROOT = "s3cret-management-token-0123456789"

DOC = {
    "default_policy": "deny",
    "anonymous": {"service": {"public": {"policy": "read"}},
                  "node_prefix": {"": {"policy": "read"}}},
    "policies": {
        "edges": {"service": {"edgegen-edge": {"policy": "write"}}},
        "no-secret": {"service": {"edgegen-secret": {"policy": "deny"}}},
    },
    "tokens": [
        {"accessor_id": "a1b2c3d4-0000-4000-8000-000000000001", "secret_id": SECRET,
         "description": "agent", "policies": ["edges"],
         "rules": {"service_prefix": {"": {"policy": "read"}, "edgegen-": {"policy": "deny"},
                                      "edgegen-ed": {"policy": "write"}},
                   "node_prefix": {"": {"policy": "read"}}, "node": {"db": {"policy": "deny"}},
                   "key_prefix": {"edgegen/": {"policy": "list"}},
                   "agent_prefix": {"": {"policy": "read"}}}},
        {"accessor_id": "a1b2c3d4-0000-4000-8000-000000000002", "secret_id": READER,
         "policies": ["edges", "no-secret"],
         # deny beats write beats read when two policies name the same rule
         "rules": {"service": {"edgegen-edge": {"policy": "read"},
                               "edgegen-secret": {"policy": "write"}}}},
        {"accessor_id": "a1b2c3d4-0000-4000-8000-000000000003", "secret_id": ROOT,
         "management": True},
    ],
}
ACL = parse_acl(DOC)


@pytest.mark.parametrize("secret, resource, name, level, allowed", [
    # exact-name rules beat every prefix rule
    (SECRET, "service", "edgegen-edge", "write", True),      # policy "edges": exact write
    (SECRET, "service", "edgegen-edge", "read", True),       # write grants read
    # the longest matching prefix wins
    (SECRET, "service", "edgegen-edgy", "write", True),      # "edgegen-ed" write
    (SECRET, "service", "edgegen-central", "read", False),   # "edgegen-" deny
    (SECRET, "service", "web", "read", True),                # "" read
    (SECRET, "service", "web", "write", False),              # read does not grant write
    (SECRET, "node", "edge-1", "read", True),
    (SECRET, "node", "db", "read", False),                   # exact deny beats prefix read
    (SECRET, "node", "edge-1", "write", False),
    (SECRET, "key", "edgegen/rollout", "list", True),        # list grants list ...
    (SECRET, "key", "edgegen/rollout", "read", True),        # ... and read
    (SECRET, "key", "edgegen/rollout", "write", False),
    (SECRET, "key", "other", "read", False),                 # no rule: default deny
    (SECRET, "agent", "edge-1", "read", True),
    # several policies on one token: deny > write > read for the same rule
    (READER, "service", "edgegen-edge", "write", True),
    (READER, "service", "edgegen-secret", "read", False),
    (READER, "node", "edge-1", "read", False),               # no node rule: default deny
    # management may do everything
    (ROOT, "service", "anything", "write", True),
    (ROOT, "node", "anything", "write", True),
    # the anonymous token has the file's anonymous rules, else the default policy
    ("", "service", "public", "read", True),
    ("", "service", "public", "write", False),
    ("", "service", "edgegen-edge", "write", False),
    ("", "node", "edge-1", "read", True),
])
def test_decisions_follow_consuls_rules(secret, resource, name, level, allowed):
    assert allows(ACL, ACL.resolve(secret), resource, name, level) is allowed
    assert access_for(ACL, secret).allows(resource, name, level) is allowed


def test_default_policy_allow_applies_only_where_no_rule_matches():
    acl = parse_acl({"default_policy": "allow", "tokens": [
        {"secret_id": SECRET, "rules": {"service": {"db": {"policy": "deny"}}}}]})
    token = acl.resolve(SECRET)
    assert allows(acl, token, "service", "web", "write")
    assert not allows(acl, token, "service", "db", "read")
    assert allows(acl, acl.resolve(""), "node", "x", "write")


def test_acls_off_allow_everything():
    access = access_for(None, "whatever")
    assert access.allows("service", "edgegen-edge", "write")
    access.require("node", "n", "write")


def test_unknown_token_is_consuls_acl_not_found():
    with pytest.raises(AclNotFound) as e:
        ACL.resolve("not-a-known-token-at-all")
    assert (e.value.status_code, str(e.value)) == (403, "ACL not found")


def test_denials_carry_consuls_text():
    agent = ACL.resolve(SECRET)
    assert denial_message(agent, "service", "write", "edgegen-central") == (
        "Permission denied: token with AccessorID 'a1b2c3d4-0000-4000-8000-000000000001' "
        "lacks permission 'service:write' on \"edgegen-central\"")
    anonymous = ACL.resolve("")
    assert anonymous.accessor_id == ANONYMOUS_ACCESSOR == "00000000-0000-0000-0000-000000000002"
    assert denial_message(anonymous, "service", "write", "edgegen-edge") == (
        "Permission denied: anonymous token lacks permission 'service:write' on "
        "\"edgegen-edge\". The anonymous token is used implicitly when a request does not "
        "specify a token.")
    with pytest.raises(PermissionDenied) as e:
        access_for(ACL, READER).require("service", "edgegen-secret", "read")
    assert e.value.status_code == 403
    assert str(e.value).endswith("lacks permission 'service:read' on \"edgegen-secret\"")
    assert READER not in str(e.value)


@pytest.mark.parametrize("query, headers, token", [
    ({"token": "q"}, {"x-consul-token": "h", "authorization": "Bearer b"}, "q"),
    ({}, {"x-consul-token": "h", "authorization": "Bearer b"}, "h"),
    ({}, {"authorization": "Bearer b"}, "b"),
    ({}, {"authorization": "bearer   spaced  "}, "spaced"),
    ({}, {"authorization": "Basic dXNlcjpwYXNz"}, ""),
    ({}, {"authorization": "Bearer"}, ""),
    ({"token": ""}, {}, ""),
    ({}, {}, ""),
])
def test_the_token_is_read_where_consul_reads_it(query, headers, token):
    assert request_token(query, headers) == token


@pytest.mark.parametrize("doc, message", [
    ({"tokens": [{"secret_id": "short"}]}, "at least 16 characters"),
    ({"tokens": [{"secret_id": SECRET}, {"secret_id": SECRET}]}, "given twice"),
    ({"tokens": [{"secret_id": SECRET, "rules": {"services": {}}}]}, "unknown rule 'services'"),
    ({"tokens": [{"secret_id": SECRET, "rules": {"service": {"a": {"policy": "list"}}}}]},
     "policy must be read, write or deny"),
    ({"tokens": [{"secret_id": SECRET, "policies": ["nope"]}]}, "unknown policies ['nope']"),
    ({"tokens": [{"secret_id": SECRET, "secret": "x"}]}, "unknown keys ['secret']"),
    ({"default_policy": "maybe", "tokens": []}, "default_policy must be deny or allow"),
    ({"tokenz": []}, "unknown keys ['tokenz']"),
    ([], "expected a mapping"),
])
def test_a_file_that_cannot_work_is_refused_without_quoting_secrets(doc, message):
    with pytest.raises(ConfigError) as e:
        parse_acl(doc)
    assert message in str(e.value)
    assert SECRET not in str(e.value)


def test_rules_may_be_consuls_json_text_and_secrets_stay_out_of_reprs(tmp_path):
    path = tmp_path / "acl.yaml"
    path.write_text(f"""
tokens:
  - secret_id: {SECRET}
    description: json rules
    rules: '{{"service": {{"edgegen-edge": {{"policy": "write"}}}}}}'
""")
    path.chmod(0o600)
    acl = load_acl_file(path)
    assert allows(acl, acl.resolve(SECRET), "service", "edgegen-edge", "write")
    assert SECRET not in repr(acl) and SECRET not in repr(acl.resolve(SECRET))
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"tokens: [{{secret_id: {SECRET}\n")
    with pytest.raises(ConfigError) as e:
        load_acl_file(broken)
    assert "not valid YAML or JSON at line" in str(e.value) and SECRET not in str(e.value)
