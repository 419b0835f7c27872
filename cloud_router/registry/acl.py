"""Consul's ACL system, the part the embedded registry enforces (`edgegen registry --acl-file`).

Pure: a parsed ACL file, the token a request presents, and the decision whether it may do
something. Semantics follow Consul's (docs/security/acl/acl-rules.mdx, acl/policy_authorizer.go,
acl/errors.go):

- Rules use Consul's JSON rule syntax: ``service`` / ``service_prefix``, ``node`` /
  ``node_prefix``, ``agent`` / ``agent_prefix``, ``key`` / ``key_prefix``, each mapping a
  name (or prefix) to ``{"policy": "read" | "write" | "deny"}`` (``list`` too for keys).
- An exact-name rule beats every prefix rule; among prefix rules the longest wins; a rule
  for nothing falls through to ``default_policy`` (``deny`` unless the file says ``allow``).
- ``write`` grants read, list and write; ``list`` grants list and read; ``read`` grants read;
  ``deny`` grants nothing. When two policies of one token name the same rule, deny beats
  write beats list beats read.
- ``DELETE /v1/kv/<prefix>?recurse`` needs write on the whole prefix (Consul's
  KeyWritePrefix): the rule covering the prefix grants write and no rule under it grants less.
- ``list`` matters only with Consul's ``acl.enable_key_list_policy``, which this registry does
  not have: KV listings are filtered by ``key:read``, as Consul filters them by default.
- A ``management`` token may do everything.
- A request without a token is the anonymous token (its rules are the file's ``anonymous``);
  a token that is not in the file is refused with 403 ``ACL not found``.

The token comes from ``?token=``, then ``X-Consul-Token``, then ``Authorization: Bearer``, in
Consul's order. Secrets are never part of a message, a log record or a ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import yaml

from cloud_router.errors import AclNotFound, ConfigError, PermissionDenied

logger = logging.getLogger(__name__)

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"   # Consul's anonymous token
RESOURCES = ("service", "node", "agent", "key")
POLICIES = ("read", "write", "deny", "list")
LEVELS = ("read", "list", "write")
# What each policy grants (Consul's enforce()).
_GRANTS = {"write": {"read", "list", "write"}, "list": {"read", "list"}, "read": {"read"},
           "deny": set()}
# When two policies of one token set the same rule (Consul's takesPrecedenceOver).
_PRECEDENCE = {"deny": 3, "write": 2, "list": 1, "read": 0}
MIN_SECRET_LENGTH = 16
_ANONYMOUS_SENTENCE = (". The anonymous token is used implicitly when a request does not "
                       "specify a token.")


@dataclass(frozen=True)
class Rules:
    """One token's rules, merged from its policies: exact names and prefixes per resource."""

    exact: Mapping[tuple[str, str], str] = field(default_factory=dict)
    prefix: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def policy_for(self, resource: str, name: str) -> str | None:
        """The policy that applies to ``name``: its exact rule, else the longest matching
        prefix rule, else None (the default policy decides)."""
        exact = self.exact.get((resource, name))
        if exact is not None:
            return exact
        for prefix, policy in self.prefix.get(resource, ()):   # longest prefix first
            if name.startswith(prefix):
                return policy
        return None


@dataclass(frozen=True)
class Token:
    accessor_id: str
    description: str = ""
    management: bool = False
    rules: Rules = field(default_factory=Rules)
    secret_id: str = field(default="", repr=False, compare=False)

    @property
    def anonymous(self) -> bool:
        return self.accessor_id == ANONYMOUS_ACCESSOR


@dataclass(frozen=True)
class AclConfig:
    """An ACL file, parsed: the default policy, the anonymous token and every token by
    secret."""

    default_policy: str = "deny"
    anonymous: Token = field(default_factory=lambda: Token(ANONYMOUS_ACCESSOR, "anonymous"))
    by_secret: Mapping[str, Token] = field(default_factory=dict, repr=False)

    def resolve(self, secret: str) -> Token:
        """The token a request presented ("" → anonymous); AclNotFound when unknown."""
        if not secret:
            return self.anonymous
        token = self.by_secret.get(secret)
        if token is None:
            raise AclNotFound()
        return token


def allows(config: AclConfig, token: Token, resource: str, name: str, level: str) -> bool:
    """Whether ``token`` has ``resource:level`` on ``name`` (e.g. service:write on
    "edgegen-edge")."""
    if level not in LEVELS or resource not in RESOURCES:
        raise ValueError(f"unknown permission {resource}:{level}")
    if token.management:
        return True
    policy = token.rules.policy_for(resource, name)
    if policy is None:
        return config.default_policy == "allow"
    return level in _GRANTS[policy]


def allows_prefix_write(config: AclConfig, token: Token, resource: str, prefix: str) -> bool:
    """Consul's KeyWritePrefix (what ``DELETE /v1/kv/<prefix>?recurse`` needs): write on
    everything under ``prefix``. The longest prefix rule covering ``prefix`` must grant write
    (none: the default policy decides), and no rule, exact or prefix, for a name under
    ``prefix`` may grant less."""
    if token.management:
        return True
    rules = token.rules
    prefixes = rules.prefix.get(resource, ())   # longest first
    under = [p for (r, n), p in rules.exact.items() if r == resource and n.startswith(prefix)]
    under += [p for n, p in prefixes if n.startswith(prefix)]
    if any("write" not in _GRANTS[p] for p in under):
        return False
    covering = next((p for n, p in prefixes if prefix.startswith(n)), None)
    if covering is None:
        return config.default_policy == "allow"
    return "write" in _GRANTS[covering]


def denial_message(token: Token, resource: str, level: str, name: str) -> str:
    """Consul's text for a denial (acl/errors.go, PermissionDeniedError.Error)."""
    who = "anonymous token" if token.anonymous else \
        f"token with AccessorID '{token.accessor_id}'"
    message = f"Permission denied: {who} lacks permission '{resource}:{level}' on \"{name}\""
    return message + _ANONYMOUS_SENTENCE if token.anonymous else message


@dataclass(frozen=True)
class Access:
    """What one request may do: the token it presented under the registry's ACL config.
    ``config`` None means ACLs are off and everything is allowed."""

    config: AclConfig | None = None
    token: Token | None = None
    presented: bool = False   # a token was sent (Consul reports filtering only then)

    def allows(self, resource: str, name: str, level: str) -> bool:
        if self.config is None or self.token is None:
            return True
        return allows(self.config, self.token, resource, name, level)

    def require(self, resource: str, name: str, level: str) -> None:
        """PermissionDenied (403, Consul's text) unless allowed."""
        if not self.allows(resource, name, level):
            self._deny(resource, name, level)

    def require_prefix_write(self, resource: str, prefix: str) -> None:
        """PermissionDenied unless the token may write everything under ``prefix``."""
        if self.config is not None and self.token is not None and \
                not allows_prefix_write(self.config, self.token, resource, prefix):
            self._deny(resource, prefix, "write")

    def _deny(self, resource: str, name: str, level: str) -> None:
        raise PermissionDenied(denial_message(self.token, resource, level, name),
                               self.token.accessor_id, f"{resource}:{level}", name)


def access_for(config: AclConfig | None, secret: str) -> Access:
    """The request's access; AclNotFound for a token the registry does not know."""
    if config is None:
        return Access()
    return Access(config, config.resolve(secret), presented=bool(secret))


def request_token(query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The token of a request, as Consul reads it: ``?token=``, then ``X-Consul-Token``, then
    ``Authorization: Bearer <token>``; "" when none."""
    if query.get("token"):
        return query["token"]
    if headers.get("x-consul-token"):
        return headers["x-consul-token"]
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return ""


# ---- the ACL file ---------------------------------------------------------------------------

def _rules(raw: object, where: str) -> list[tuple[str, str, bool, str]]:
    """Consul's JSON rules → (resource, name, is_prefix, policy) entries."""
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: rules must be Consul's JSON rule syntax: {exc}") \
                from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: rules must be a mapping such as "
                          "{\"service\": {\"web\": {\"policy\": \"write\"}}}")
    out = []
    for kind, entries in raw.items():
        resource, is_prefix = (kind[:-7], True) if kind.endswith("_prefix") else (kind, False)
        if resource not in RESOURCES:
            raise ConfigError(f"{where}: unknown rule {kind!r}; edgegen's registry knows "
                              + ", ".join(f"{r}, {r}_prefix" for r in RESOURCES))
        if not isinstance(entries, dict):
            raise ConfigError(f"{where}: {kind} must map names to {{\"policy\": ...}}")
        for name, body in entries.items():
            policy = body.get("policy") if isinstance(body, dict) else None
            if policy not in POLICIES or (policy == "list" and resource != "key"):
                allowed = "read, list, write or deny" if resource == "key" else \
                    "read, write or deny"
                raise ConfigError(f"{where}: {kind} {name!r}: policy must be {allowed} "
                                  f"(got {policy!r})")
            out.append((resource, str(name), is_prefix, policy))
    return out


def _merge(entries: list[tuple[str, str, bool, str]]) -> Rules:
    exact: dict[tuple[str, str], str] = {}
    prefix: dict[tuple[str, str], str] = {}
    for resource, name, is_prefix, policy in entries:
        table = prefix if is_prefix else exact
        old = table.get((resource, name))
        if old is None or _PRECEDENCE[policy] > _PRECEDENCE[old]:
            table[(resource, name)] = policy
    by_resource: dict[str, list[tuple[str, str]]] = {}
    for (resource, name), policy in prefix.items():
        by_resource.setdefault(resource, []).append((name, policy))
    return Rules(
        exact=MappingProxyType(exact),
        prefix=MappingProxyType({r: tuple(sorted(ps, key=lambda p: -len(p[0])))
                                 for r, ps in by_resource.items()}))


def parse_acl(doc: object, source: str = "the ACL file") -> AclConfig:
    """An ACL document (see the module docstring and the README) → AclConfig; ConfigError
    naming the entry when it cannot work. Secrets never appear in the messages."""
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping with 'tokens'")
    unknown = set(doc) - {"default_policy", "anonymous", "policies", "tokens"}
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; expected default_policy, "
                          "anonymous, policies, tokens")
    default_policy = doc.get("default_policy", "deny")
    if default_policy not in ("deny", "allow"):
        raise ConfigError(f"{source}: default_policy must be deny or allow")
    policies_raw = doc.get("policies") or {}
    if not isinstance(policies_raw, dict):
        raise ConfigError(f"{source}: policies must map a name to its rules")
    policies = {str(name): _rules(rules, f"{source}: policy {name!r}")
                for name, rules in policies_raw.items()}
    anonymous = Token(ANONYMOUS_ACCESSOR, "anonymous",
                      rules=_merge(_rules(doc.get("anonymous"), f"{source}: anonymous")))
    tokens_raw = doc.get("tokens") or []
    if not isinstance(tokens_raw, list):
        raise ConfigError(f"{source}: tokens must be a list")
    by_secret: dict[str, Token] = {}
    accessors = {ANONYMOUS_ACCESSOR}
    for i, raw in enumerate(tokens_raw):
        where = f"{source}: token #{i + 1}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping")
        if raw.get("description"):
            where += f" ({raw['description']})"
        extra = set(raw) - {"secret_id", "accessor_id", "description", "management",
                            "policies", "rules"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
        secret = raw.get("secret_id")
        if not isinstance(secret, str) or len(secret.strip()) < MIN_SECRET_LENGTH \
                or secret != secret.strip():
            raise ConfigError(f"{where}: secret_id must be a string of at least "
                              f"{MIN_SECRET_LENGTH} characters without surrounding spaces "
                              "(a guessable token is no token)")
        if secret in by_secret:
            raise ConfigError(f"{where}: the same secret_id is given twice")
        accessor = str(raw.get("accessor_id") or uuid.uuid4())
        if accessor in accessors:
            raise ConfigError(f"{where}: accessor_id {accessor} is used twice")
        accessors.add(accessor)
        names = raw.get("policies") or []
        if not isinstance(names, list) or any(n not in policies for n in names):
            missing = [n for n in names if n not in policies] if isinstance(names, list) else names
            raise ConfigError(f"{where}: unknown policies {missing}; define them under "
                              "'policies'")
        entries = [e for n in names for e in policies[n]] + _rules(raw.get("rules"), where)
        by_secret[secret] = Token(accessor, str(raw.get("description") or ""),
                                  management=raw.get("management") is True,
                                  rules=_merge(entries), secret_id=secret)
    return AclConfig(default_policy, anonymous, MappingProxyType(by_secret))


def load_acl_file(path: str | os.PathLike) -> AclConfig:
    """Read and parse an ACL file (YAML, or JSON, which is YAML). Warns when others may read
    it: it holds every secret."""
    p = Path(path)
    try:
        text = p.read_text()
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the ACL file {p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("the ACL file can be read by other users; chmod 600 it",
                       extra={"path": str(p), "mode": oct(mode & 0o777)})
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Only the position: the parser's message may quote a line, and lines hold secrets.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"the ACL file {p} is not valid YAML or JSON{where}") from None
    return parse_acl(doc, f"the ACL file {p}")
