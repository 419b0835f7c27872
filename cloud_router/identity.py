"""Whether a registered endpoint is an edgegen agent of this fleet: the identity protocol and
the router's decisions about it. Pure: no clock, no I/O, no randomness (``verifier`` does
those and calls these).

Anyone who may register in Consul can register an address with a copied Meta. ACLs narrow
who may, but a leaked write token (or a Consul without ACLs) still lets an impostor in. So
agents and routers share a **fleet key** and, before the router sends a prompt to an endpoint,
the endpoint proves it holds the key:

    router → endpoint   GET /edgegen/v1/identity?nonce=<64 hex characters, fresh per check>
    endpoint → router   200 {"object": "edgegen.identity", "service_id", "node", "address",
                             "port", "nonce", "mac"}

    mac = hex HMAC-SHA256(fleet key, "edgegen-identity-v1\\n<nonce>\\n<service ID>\\n<node>\\n
                                      <address>\\n<port>")

The router computes the MAC over what *it* read in Consul (the endpoint's service ID, its
Meta node, and the address and port it would send prompts to) and compares in constant time.
The key never crosses the wire; a fresh nonce makes an old answer useless; binding the
address and port means an impostor that relays the nonce to a real agent gets a MAC for the
real agent's address, which does not match its own registration. The agent's copy of this
message is in ``edge_agent/rest/identity.py``; a contract test pins the two.

Decisions, per endpoint (``IdentityState``):

    unverified   new, or its address changed, or never answered: not routed to
    verified     answered correctly at this address: routed to; re-checked every recheck_s
    failed       answered wrongly (bad MAC, no fleet key, not an identity answer): not
                 routed to; re-checked every retry_s, and verified again once it answers right

A re-check that gets no answer at all (connection refused, timeout) leaves a verified
endpoint verified, since whoever answers there must still prove the key on the next check,
and is retried every retry_s; Consul's health check and the router's ejection take a dead
endpoint out of routing.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, replace

from cloud_router.endpoints import Endpoint

IDENTITY_PATH = "/edgegen/v1/identity"
PROTOCOL = "edgegen-identity-v1"

UNVERIFIED, VERIFIED, FAILED = "unverified", "verified", "failed"
STATES = (UNVERIFIED, VERIFIED, FAILED)
# What a check found (the edgegen_router_identity_checks_total outcome label).
OUTCOMES = ("verified", "rejected", "unreachable")
# Why an endpoint is not a candidate (the `skipped` of a route explanation).
SKIP_UNVERIFIED, SKIP_FAILED = "identity-unverified", "identity-failed"


def identity_message(nonce: str, service_id: str, node: str, address: str, port: int) -> bytes:
    """The bytes both sides MAC (one field per line, so no two field lists collide)."""
    return "\n".join((PROTOCOL, nonce, service_id, node, address, str(port))).encode()


def identity_mac(key: bytes, nonce: str, service_id: str, node: str, address: str,
                 port: int) -> str:
    return hmac.new(key, identity_message(nonce, service_id, node, address, port),
                    hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class IdentityConfig:
    recheck_s: float = 30.0   # a verified endpoint proves itself again this often
    retry_s: float = 5.0      # an endpoint that did not prove itself is asked again this often
    timeout_s: float = 2.0    # for one identity request


@dataclass(frozen=True)
class Answer:
    """What one identity request got back, undecided: an HTTP status and JSON body, or no
    answer (``status`` None) and the transport error."""

    status: int | None = None
    body: object = None
    error: str = ""


@dataclass(frozen=True)
class Verdict:
    outcome: str   # verified | rejected | unreachable
    reason: str


def judge(key: bytes, nonce: str, endpoint: Endpoint, answer: Answer) -> Verdict:
    """Whether ``answer`` to ``nonce`` proves that ``endpoint`` holds ``key``."""
    if answer.status is None:
        return Verdict("unreachable", f"no answer: {answer.error}" if answer.error
                       else "no answer")
    if answer.status in (502, 503, 504):
        return Verdict("unreachable", f"HTTP {answer.status} from the identity endpoint")
    if answer.status == 404:
        return Verdict("rejected", "no identity endpoint (HTTP 404): not an edgegen agent, "
                       "or an agent started without the fleet key")
    if answer.status != 200:
        return Verdict("rejected", f"HTTP {answer.status} from the identity endpoint")
    body = answer.body
    if not isinstance(body, dict) or not isinstance(body.get("mac"), str):
        return Verdict("rejected", "not an identity answer (no mac)")
    if body.get("nonce") != nonce:
        return Verdict("rejected", "answered a different nonce")
    expected = identity_mac(key, nonce, endpoint.id, endpoint.node, endpoint.address,
                            endpoint.port)
    if not hmac.compare_digest(body["mac"].encode(), expected.encode()):
        said = (f"{body.get('service_id')!s}/{body.get('node')!s} at "
                f"{body.get('address')!s}:{body.get('port')!s}")
        return Verdict("rejected", f"wrong MAC: it does not hold this fleet's key, or it is "
                       f"not {endpoint.id}/{endpoint.node} at {endpoint.address}:"
                       f"{endpoint.port} (it says it is {said})")
    return Verdict("verified", "proved the fleet key")


@dataclass(frozen=True)
class IdentityState:
    state: str                          # unverified | verified | failed
    url: str                            # the address it was (to be) checked at
    reason: str
    checked_at: float | None = None     # the last check's time (None: never checked)
    verified_at: float | None = None    # the last successful check's time
    last_outcome: str | None = None     # the last check's outcome
    checks: int = 0


def current(previous: IdentityState | None, endpoint: Endpoint) -> IdentityState:
    """The endpoint's state before any new check: what was known, unless it is new or its
    address changed, which makes it unverified (and routes nothing there until checked)."""
    if previous is None:
        return IdentityState(UNVERIFIED, endpoint.url, "not checked yet")
    if previous.url != endpoint.url:
        return IdentityState(UNVERIFIED, endpoint.url,
                             f"its address changed from {previous.url}; not checked yet")
    return previous


def due(state: IdentityState, now: float, config: IdentityConfig) -> bool:
    """Whether to check now: never checked, or the interval since the last check is over
    (recheck_s after a success, retry_s after anything else)."""
    if state.checked_at is None:
        return True
    interval = config.recheck_s if state.last_outcome == "verified" else config.retry_s
    return now - state.checked_at >= interval


def after(state: IdentityState, verdict: Verdict, now: float) -> IdentityState:
    """The state once a check of ``state``'s address returned ``verdict``."""
    checked = replace(state, checked_at=now, last_outcome=verdict.outcome,
                      checks=state.checks + 1)
    if verdict.outcome == "verified":
        return replace(checked, state=VERIFIED, reason=verdict.reason, verified_at=now)
    if verdict.outcome == "rejected":
        return replace(checked, state=FAILED, reason=verdict.reason)
    if state.state == VERIFIED:
        return replace(checked, reason=f"verified; the last re-check got {verdict.reason}")
    return replace(checked, reason=verdict.reason)


def admission(state: IdentityState) -> str | None:
    """None when requests may go to the endpoint, else why not (a route explanation's
    `skipped` value)."""
    if state.state == VERIFIED:
        return None
    return SKIP_FAILED if state.state == FAILED else SKIP_UNVERIFIED
