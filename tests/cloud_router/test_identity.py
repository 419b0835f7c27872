"""The identity decision, table-driven (pure), the table that withholds what is not verified,
and the verifier against real HTTP servers: one that answers as an edgegen agent does (the
agent's own code), impostors that answer wrongly or relay a real agent's answer."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cloud_router.endpoints import Endpoint
from cloud_router.identity import (
    FAILED,
    SKIP_FAILED,
    SKIP_UNVERIFIED,
    UNVERIFIED,
    VERIFIED,
    Answer,
    IdentityConfig,
    IdentityState,
    Verdict,
    admission,
    after,
    current,
    due,
    identity_mac,
    judge,
)
from cloud_router.policy import RequestHints
from cloud_router.table import EndpointTable
from cloud_router.verifier import IdentityVerifier
from edge_agent.rest.identity import identity_answer
from edge_agent.settings import AgentSettings

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
NONCE = "ab" * 32
EP = Endpoint(id="edgegen-edge-edge-1-8001", service="edgegen-edge", node="edge-1",
              address="127.0.0.1", port=8001, model="tiny", region="eu-west")


def good_body(endpoint: Endpoint = EP, key: bytes = KEY, nonce: str = NONCE) -> dict:
    return {"object": "edgegen.identity", "service_id": endpoint.id, "node": endpoint.node,
            "address": endpoint.address, "port": endpoint.port, "nonce": nonce,
            "mac": identity_mac(key, nonce, endpoint.id, endpoint.node, endpoint.address,
                                endpoint.port)}


def moved(endpoint: Endpoint, **kw) -> Endpoint:
    return Endpoint(**{**vars(endpoint), **kw})


@pytest.mark.parametrize("answer, outcome, why", [
    (Answer(200, good_body()), "verified", "proved the fleet key"),
    (Answer(200, good_body(key=OTHER_KEY)), "rejected", "wrong MAC"),
    # a real agent's answer for another registration (a relay) does not fit this one
    (Answer(200, good_body(moved(EP, port=9999))), "rejected", "wrong MAC"),
    (Answer(200, good_body(moved(EP, address="10.0.0.9"))), "rejected", "wrong MAC"),
    (Answer(200, good_body(moved(EP, id="edgegen-edge-edge-1-9999"))), "rejected", "wrong MAC"),
    (Answer(200, good_body(moved(EP, node="edge-2"))), "rejected", "wrong MAC"),
    (Answer(200, good_body(nonce="cd" * 32)), "rejected", "a different nonce"),
    (Answer(200, {"mac": 7}), "rejected", "not an identity answer"),
    (Answer(200, ["not", "a", "dict"]), "rejected", "not an identity answer"),
    (Answer(200, None), "rejected", "not an identity answer"),
    (Answer(404, {"error": {}}), "rejected", "HTTP 404"),
    (Answer(401, None), "rejected", "HTTP 401"),
    (Answer(503, None), "unreachable", "HTTP 503"),
    (Answer(None, error="ConnectError: refused"), "unreachable", "ConnectError"),
])
def test_judge(answer, outcome, why):
    verdict = judge(KEY, NONCE, EP, answer)
    assert verdict.outcome == outcome and why in verdict.reason
    assert KEY.decode() not in verdict.reason


CONFIG = IdentityConfig(recheck_s=30.0, retry_s=5.0)
NEW = IdentityState(UNVERIFIED, EP.url, "not checked yet")
OK = Verdict("verified", "proved the fleet key")
BAD = Verdict("rejected", "wrong MAC")
GONE = Verdict("unreachable", "no answer: ConnectError")


@pytest.mark.parametrize("steps, state, admitted", [
    ([], UNVERIFIED, SKIP_UNVERIFIED),
    ([OK], VERIFIED, None),
    ([BAD], FAILED, SKIP_FAILED),
    ([GONE], UNVERIFIED, SKIP_UNVERIFIED),            # never proved anything
    ([OK, GONE], VERIFIED, None),                     # whoever answers must prove it again
    ([OK, BAD], FAILED, SKIP_FAILED),                 # a wrong answer ends the trust at once
    ([BAD, OK], VERIFIED, None),                      # ... and a right one restores it
    ([BAD, GONE], FAILED, SKIP_FAILED),
])
def test_state_after_checks(steps, state, admitted):
    s = NEW
    for i, verdict in enumerate(steps):
        s = after(s, verdict, now=float(i))
    assert (s.state, admission(s), s.checks) == (state, admitted, len(steps))


@pytest.mark.parametrize("checked_at, last, now, is_due", [
    (None, None, 0.0, True),           # never checked: at once
    (100.0, "verified", 129.0, False),
    (100.0, "verified", 130.0, True),  # re-checked every recheck_s
    (100.0, "rejected", 104.0, False),
    (100.0, "rejected", 105.0, True),  # retried every retry_s
    (100.0, "unreachable", 105.0, True),
])
def test_due(checked_at, last, now, is_due):
    s = IdentityState(VERIFIED if last == "verified" else FAILED, EP.url, "", checked_at,
                      last_outcome=last)
    assert due(s, now, CONFIG) is is_due


def test_a_new_address_is_unverified_until_checked():
    verified = after(current(None, EP), OK, 1.0)
    assert current(verified, EP) is verified
    elsewhere = current(verified, moved(EP, address="10.9.9.9"))
    assert (elsewhere.state, elsewhere.checked_at, admission(elsewhere)) == \
        (UNVERIFIED, None, SKIP_UNVERIFIED)
    assert "address changed from http://127.0.0.1:8001" in elsewhere.reason


class Gate:
    """A gate that admits a fixed set of ids."""

    def __init__(self, admitted):
        self.admitted, self.generation = set(admitted), 0

    def admit(self, e):
        return None if e.id in self.admitted else SKIP_UNVERIFIED

    def describe(self, e):
        return {"identity": VERIFIED if e.id in self.admitted else UNVERIFIED}


class Source:
    def __init__(self, endpoints):
        self.endpoints, self.generation = list(endpoints), 0


def test_the_table_routes_only_to_what_the_gate_admits():
    near, impostor = EP, moved(EP, id="edgegen-edge-impostor-9", node="impostor", port=9)
    gate = Gate({near.id})
    table = EndpointTable([Source([near, impostor])], rng=random.Random(0), gate=gate)
    for _ in range(20):
        d = table.choose(RequestHints(model="tiny", region="eu-west"))
        assert d.endpoint == near and d.skipped == {impostor.id: SKIP_UNVERIFIED}
    rows = {r["id"]: r["identity"] for r in table.rows()}
    assert rows == {near.id: VERIFIED, impostor.id: UNVERIFIED}
    gate.admitted = set()
    gate.generation += 1          # nothing verified: no endpoint, and the reason why
    d = table.choose(RequestHints(model="tiny"))
    assert d.endpoint is None and set(d.skipped.values()) == {SKIP_UNVERIFIED}
    assert table.known_model("tiny") and table.models() == []   # unavailable, not unknown


# ---- the verifier against real sockets ---------------------------------------------------------

class Server:
    """An HTTP server on 127.0.0.1 whose identity answers ``answer(nonce, port)`` gives."""

    def __init__(self, answer):
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.hits += 1
                url = urllib.parse.urlsplit(self.path)
                nonce = urllib.parse.parse_qs(url.query).get("nonce", [""])[0]
                status, body = answer(nonce, outer.port)
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def endpoint(self, node: str) -> Endpoint:
        return Endpoint(id=f"edgegen-edge-{node}-{self.port}", service="edgegen-edge",
                        node=node, address="127.0.0.1", port=self.port, model="tiny")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def agent_like(key):
    """Answers with the agent's own code (edge_agent.rest.identity)."""
    def answer(nonce, port):
        settings = AgentSettings(bundle="/none", node="real", port=port, fleet_key=key)
        return 200, identity_answer(settings, nonce).model_dump()
    return answer


def test_the_verifier_admits_the_agent_and_not_the_impostors():
    real = Server(agent_like(KEY))

    def relay(nonce, port):   # asks the real agent and passes its answer on
        with urllib.request.urlopen(f"http://127.0.0.1:{real.port}/edgegen/v1/identity"
                                    f"?nonce={nonce}") as r:
            return 200, json.loads(r.read())

    servers = {"real": real, "wrong-key": Server(agent_like(OTHER_KEY)),
               "relay": Server(relay), "no-key": Server(lambda n, p: (404, {"error": {}}))}
    try:
        endpoints = {name: s.endpoint("real" if name == "real" else name)
                     for name, s in servers.items()}
        verifier = IdentityVerifier([Source(endpoints.values())], KEY)
        registry = CollectorRegistry()
        verifier.register_metrics(registry)
        assert asyncio.run(verifier.check_due_once()) == 4
        admitted = {name: verifier.admit(e) for name, e in endpoints.items()}
        assert admitted == {"real": None, "wrong-key": SKIP_FAILED, "relay": SKIP_FAILED,
                            "no-key": SKIP_FAILED}
        assert "wrong MAC" in verifier.describe(endpoints["relay"])["identity_reason"]
        assert "HTTP 404" in verifier.describe(endpoints["no-key"])["identity_reason"]
        assert asyncio.run(verifier.check_due_once()) == 0      # none due again yet
        metrics = generate_latest(registry).decode()
        assert 'edgegen_router_endpoint_identity{state="verified",tier="edge"} 1.0' in metrics
        assert 'edgegen_router_endpoint_identity{state="failed",tier="edge"} 3.0' in metrics
        assert 'edgegen_router_identity_checks_total{outcome="rejected"} 3.0' in metrics
        # a dead endpoint never proved itself: unverified, not routed to
        dead = Endpoint(id="edgegen-edge-dead-1", service="edgegen-edge", node="dead",
                        address="127.0.0.1", port=1, model="tiny")
        lone = IdentityVerifier([Source([dead])], KEY, IdentityConfig(timeout_s=0.5))
        asyncio.run(lone.check_due_once())
        assert lone.admit(dead) == SKIP_UNVERIFIED
        assert "no answer" in lone.describe(dead)["identity_reason"]
    finally:
        for s in servers.values():
            s.close()
