"""The secrets edgegen processes are given: Consul ACL tokens and the fleet key.

A Consul token is read as Consul's own CLI reads one (``api.NewClient``,
``command/flags/http.go``): a literal (``--consul-token`` or ``CONSUL_HTTP_TOKEN``) or a file
(``--consul-token-file`` or ``CONSUL_HTTP_TOKEN_FILE``); when a file is named it wins, and an
empty file falls back to the literal. The fleet key is read the same way (``--fleet-key-file``
or ``EDGEGEN_FLEET_KEY_FILE``, else ``EDGEGEN_FLEET_KEY``).

A literal given on the command line is visible to every user of the machine in ``ps``; the
environment of a process is readable only by its owner, and a file by whom its mode allows.
No message here ever holds a secret: they name the file, never its content.

``write_fleet_secrets`` makes the secrets of a fleet that has none yet (`edgegen up`): an ACL
file for the registry with a management token, a token for the agents (``service:write`` on
the two edgegen services) and one for the router (read on the edgegen services and every
node, what discovery needs), and a fleet key; every file mode 0600. Both the agents and the
router may also write the KV keys under ``edgegen/`` (the fleet's rollout state). A local
fleet lets the anonymous token read what discovery reads (``anonymous_read``; no KV keys), so
that `edgegen status` works without a token: reading the fleet is not the threat, writing to
it is.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from dataclasses import dataclass
from pathlib import Path

from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE
from cloud_router.errors import ConfigError

MIN_FLEET_KEY_LENGTH = 16
# The variables that name secret files: a fleet that hands its processes secrets in the
# environment clears these, so that a file named in the user's shell cannot win.
SECRET_FILE_VARIABLES = ("CONSUL_HTTP_TOKEN_FILE", "EDGEGEN_FLEET_KEY_FILE")

# What each role of an edgegen fleet may do in Consul (Consul's JSON rule syntax).
# The fleet's KV keys (rollout state) live under KV_PREFIX; agents and the router write them.
KV_PREFIX = "edgegen/"
KV_RULES = {"key_prefix": {KV_PREFIX: {"policy": "write"}}}
AGENT_RULES = {"service": {EDGE_SERVICE: {"policy": "write"},
                           CENTRAL_SERVICE: {"policy": "write"}}, **KV_RULES}
# Consul's health and catalog answers drop entries whose node the token may not read.
DISCOVERY_RULES = {"service_prefix": {"edgegen-": {"policy": "read"}},
                   "node_prefix": {"": {"policy": "read"}}}
ROUTER_RULES = {**DISCOVERY_RULES, **KV_RULES}


def read_secret_file(path: str | os.PathLike, what: str) -> str:
    """The file's content without surrounding whitespace (ConfigError naming the file)."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise ConfigError(f"cannot read the {what} file {path}: {reason}") from None


def consul_token(token: str | None, token_file: str | os.PathLike | None) -> str | None:
    """The Consul ACL token to send, or None (anonymous): the file's when a file is named
    and not empty, else the literal."""
    if token_file:
        from_file = read_secret_file(token_file, "Consul token")
        if from_file:
            return from_file
    token = (token or "").strip()
    return token or None


def fleet_key(key: str | None, key_file: str | os.PathLike | None) -> bytes | None:
    """The fleet key shared by agents and routers (the file's, else the literal), or None
    when none is configured; ConfigError when it is too short to be a secret."""
    value = read_secret_file(key_file, "fleet key") if key_file else (key or "").strip()
    if not value:
        if key_file:
            raise ConfigError(f"the fleet key file {key_file} is empty")
        return None
    if len(value) < MIN_FLEET_KEY_LENGTH:
        source = f"the fleet key file {key_file}" if key_file else "EDGEGEN_FLEET_KEY"
        raise ConfigError(f"{source} holds a key shorter than {MIN_FLEET_KEY_LENGTH} "
                          "characters; generate one with `openssl rand -hex 32`")
    return value.encode()


def write_secret_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner alone (0600, set before anything is
    written, so the secret is never in a file others may read)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return p


def fleet_acl(management: str, agent: str, router: str, anonymous_read: bool = False) -> dict:
    """The registry's ACL document for an edgegen fleet (README: the ACL file)."""
    return {
        "default_policy": "deny",
        **({"anonymous": DISCOVERY_RULES} if anonymous_read else {}),
        "tokens": [
            {"description": "management", "management": True, "secret_id": management},
            {"description": "edgegen agents", "rules": AGENT_RULES, "secret_id": agent},
            {"description": "edgegen router", "rules": ROUTER_RULES, "secret_id": router},
        ],
    }


@dataclass(frozen=True)
class FleetSecrets:
    """The secret files of one fleet, in ``directory`` (mode 0700, every file 0600)."""

    directory: Path

    @property
    def acl_file(self) -> Path:
        return self.directory / "registry-acl.json"

    def token_file(self, role: str) -> Path:
        """management | agent | router."""
        return self.directory / f"consul-{role}.token"

    @property
    def fleet_key_file(self) -> Path:
        return self.directory / "fleet.key"

    def env(self, role: str) -> dict[str, str]:
        """What a process of ``role`` (agent | router) is given in its environment."""
        return {"CONSUL_HTTP_TOKEN": read_secret_file(self.token_file(role), "Consul token"),
                "EDGEGEN_FLEET_KEY": read_secret_file(self.fleet_key_file, "fleet key")}


def write_fleet_secrets(directory: str | os.PathLike, anonymous_read: bool = False
                        ) -> FleetSecrets:
    """New tokens (random UUIDs, as Consul's), a new fleet key and the registry's ACL file."""
    out = FleetSecrets(Path(directory))
    tokens = {role: str(uuid.uuid4()) for role in ("management", "agent", "router")}
    for role, secret in tokens.items():
        write_secret_file(out.token_file(role), secret + "\n")
    write_secret_file(out.fleet_key_file, secrets.token_hex(32) + "\n")
    acl = fleet_acl(**tokens, anonymous_read=anonymous_read)
    write_secret_file(out.acl_file, json.dumps(acl, indent=2) + "\n")
    return out
