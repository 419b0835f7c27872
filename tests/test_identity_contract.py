"""The identity protocol's copies agree: the agent (``edge_agent/rest/identity.py``) and the
router (``cloud_router/identity.py``) share no code, so these pin the message, the MAC, the
path and the service ID each side computes; and the agent's route answers as the router
expects, over HTTP."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from cloud_router import identity as router_side
from cloud_router.endpoints import Endpoint
from edge_agent.registration import service_id
from edge_agent.rest import identity as agent_side
from edge_agent.settings import AgentSettings

KEY = b"fleet-key-for-the-contract-test"


@pytest.mark.parametrize("tier, node, port, address", [
    ("edge", "edge-1", 8000, "10.0.0.5"), ("central", "gpu-1", 9000, "127.0.0.1"),
    ("edge", "edge-v6", 8001, "fd00::5"),
])
def test_both_sides_sign_the_same_registration(tier, node, port, address):
    settings = AgentSettings(bundle="/none", node=node, port=port, tier=tier,
                             advertise_host=address, fleet_key=KEY)
    # the agent signs the service ID it registers under
    assert agent_side.registered_service_id(settings) == service_id(settings)
    assert agent_side.PROTOCOL == router_side.PROTOCOL
    assert agent_side.IDENTITY_PATH == router_side.IDENTITY_PATH
    nonce = "0f" * 32
    assert agent_side.identity_message(nonce, "s", "n", "a", 1) == \
        router_side.identity_message(nonce, "s", "n", "a", 1)
    answer = agent_side.identity_answer(settings, nonce).model_dump()
    # the router, from what it read in Consul, accepts it
    endpoint = Endpoint(id=service_id(settings), service="x", node=node, address=address,
                        port=port, tier=tier)
    assert router_side.judge(KEY, nonce, endpoint, router_side.Answer(200, answer)).outcome \
        == "verified"


def app_with(settings: AgentSettings) -> TestClient:
    app = FastAPI()
    app.state.settings = settings
    app.include_router(agent_side.router)
    return TestClient(app)


def test_the_agents_route():
    settings = AgentSettings(bundle="/none", node="edge-1", port=8000, fleet_key=KEY)
    client = app_with(settings)
    r = client.get("/edgegen/v1/identity", params={"nonce": "a" * 64})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "edgegen.identity" and body["service_id"] == "edgegen-edge-edge-1-8000"
    assert KEY.decode() not in r.text
    for bad in ("", "short", "x" * 129, "not hex!" * 4):
        r = client.get("/edgegen/v1/identity", params={"nonce": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "nonce"
    without = app_with(AgentSettings(bundle="/none", node="edge-1", port=8000))
    r = without.get("/edgegen/v1/identity", params={"nonce": "a" * 64})
    assert r.status_code == 404 and r.json()["error"]["code"] == "no_fleet_key"


def test_secrets_stay_out_of_settings_reprs():
    from cloud_router.settings import RouterSettings

    agent = AgentSettings(bundle="/b", node="n", consul_token="agent-token-xyz", fleet_key=KEY)
    router = RouterSettings(consul_token="router-token-xyz", fleet_key=KEY)
    for text in (repr(agent), repr(router)):
        assert "token-xyz" not in text and KEY.decode() not in text
