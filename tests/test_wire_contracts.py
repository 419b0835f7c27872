"""One wire fact, one answer: where the package rules forbid sharing code (the agent and the
router never import each other), these tests pin the copies together, so they cannot drift.

- The OpenAI error body: the same type for every status, from the agent's REST and MQTT
  faces and from the router.
- Consul: the service names and Meta keys the agent registers are the ones the router's
  discovery (and so ``edgegen status``) reads back, value for value, latitude and longitude
  included.
- One Earth radius and one lat/lon parser on the router's side (the registry uses the
  router's geo).
- The precision and task lists: the bundle format's are the exporters' and the CLI's.
"""

from pathlib import Path
from types import SimpleNamespace

import pytest

from cloud_router import geo
from cloud_router import protocol as router_protocol
from cloud_router import resume as router_resume
from cloud_router.discovery import endpoints_from_health
from cloud_router.endpoints import CENTRAL_SERVICE, EDGE_SERVICE, META_KEYS
from cloud_router.registry import coordinates
from edge_agent.mqtt.contract import error_payload
from edge_agent.registration import registration_payload
from edge_agent.serving import bodies as agent_bodies
from edge_agent.serving import chat as agent_chat
from edge_agent.serving import protocol as agent_protocol
from edge_agent.settings import AgentSettings
from manifests.local_status import agent_rows

STATUSES = (400, 401, 403, 404, 413, 429, 500, 503)


def test_error_types_agree_between_agent_mqtt_and_router():
    assert agent_protocol.ERROR_TYPES == router_protocol.ERROR_TYPES
    assert set(STATUSES) <= set(agent_protocol.ERROR_TYPES)
    for status in STATUSES:
        agent = agent_protocol.error(status, "m", param="p", code="c").body
        router = router_protocol.error_body(status, "m", param="p", code="c")
        mqtt = error_payload(status, "m", "c", param="p")
        assert agent == router == mqtt, status
        assert set(agent["error"]) == {"message", "type", "param", "code"}


def _bundle(name="smollm2-135m-instruct", digest12="0123456789ab"):
    return SimpleNamespace(name=name, digest12=digest12)


@pytest.mark.parametrize("tier, lat, lon", [
    ("edge", 48.8566, 2.3522), ("central", -33.8688, 151.2093), ("edge", None, None),
    ("edge", 0.1 + 0.2, -179.99999999999997)])
def test_what_registration_writes_discovery_and_status_read_back(tier, lat, lon):
    settings = AgentSettings(bundle="/b", node="edge-7", region="eu-west", zone="eu-west-1b",
                             lat=lat, lon=lon, tier=tier, port=8123, advertise_host="127.0.0.9",
                             max_concurrency=6, mqtt="mqtt://user:secret@broker.local:1883")
    payload = registration_payload(settings, _bundle())
    assert payload["name"] == (CENTRAL_SERVICE if tier == "central" else EDGE_SERVICE)
    assert tuple(payload["meta"]) == META_KEYS
    assert all(isinstance(v, str) for v in payload["meta"].values())  # Consul's Meta rule
    entry = {"Node": {"Node": "consul-node", "Address": "10.0.0.1"},
             "Service": {"ID": payload["service_id"], "Service": payload["name"],
                         "Address": payload["address"], "Port": payload["port"],
                         "Tags": payload["tags"], "Meta": payload["meta"]},
             "Checks": [{"Status": "passing"}]}
    (ep,) = endpoints_from_health([entry])
    assert (ep.id, ep.service, ep.node, ep.tier) == (payload["service_id"], payload["name"],
                                                     "edge-7", tier)
    assert (ep.address, ep.port, ep.region, ep.zone) == ("127.0.0.9", 8123, "eu-west",
                                                         "eu-west-1b")
    assert (ep.lat, ep.lon) == (lat, lon)  # repr(float) written, float read: exact
    assert (ep.model, ep.digest, ep.max_concurrency) == ("smollm2-135m-instruct",
                                                         "0123456789ab", 6)
    assert ep.mqtt == "mqtt://broker.local:1883"  # credentials never reach Consul
    (row,) = agent_rows([entry])
    assert (row.node, row.tier, row.address, row.ready) == ("edge-7", tier, "127.0.0.9:8123",
                                                             True)
    assert row.bundle.startswith("smollm2-135m-instruct 0123456789ab")
    assert coordinates.location_of(payload["meta"]) == (None if lat is None else (lat, lon))


def test_one_earth_radius_and_one_lat_lon_parser():
    assert coordinates.EARTH_RADIUS_KM is geo.EARTH_RADIUS_KM
    assert coordinates.latitude is geo.latitude and coordinates.longitude is geo.longitude
    radii = [p for p in Path(geo.__file__).parent.rglob("*.py")
             if "EARTH_RADIUS_KM =" in p.read_text()]
    assert radii == [Path(geo.__file__)]


def test_precision_and_task_lists_have_one_source():
    from cli import export as cli_export
    from edge_agent.bundle import PRECISIONS, TASKS
    from exporters import pipeline

    assert pipeline.PRECISIONS is PRECISIONS and pipeline.TASKS is TASKS
    assert tuple(p.value for p in cli_export.Precision) == PRECISIONS
    assert tuple(t.value for t in cli_export.Task) == TASKS


BODIES = [b'{"a": 1}', b"[" * 65 + b"]" * 65, b"[" * 64 + b"]" * 64, b"[" * 100_000,
          b'{"a": "\\ud800"}', b'{"a": "\\ud83d\\ude00"}', b'{"a": NaN}', b'{"a": Infinity}',
          b'{"a": 1e999}', b"\xff", b'"caf\xc3\xa9"', b"{", b"", b'{"k\\udc00": 1}']


@pytest.mark.parametrize("raw", BODIES)
def test_agent_and_router_read_request_bodies_alike(raw):
    """The same body is accepted by both or refused by both, with the same code and param."""
    from cloud_router.limits import BadBody
    from cloud_router.limits import decode_json as router_decode

    agent = agent_bodies.decode_json(raw)
    try:
        router = router_decode(raw)
    except BadBody as exc:
        assert isinstance(agent, agent_protocol.ErrorResult), raw
        assert (agent.status, agent.body["error"]["code"], agent.body["error"]["param"]) == \
            (400, exc.code, exc.param)
        assert agent.body["error"]["message"] == str(exc)
    else:
        assert not isinstance(agent, agent_protocol.ErrorResult), raw
        assert agent == router


def test_agent_and_router_share_body_limits():
    from cloud_router import limits as router_limits
    from edge_agent.rest import limits as agent_limits

    for name in ("DEFAULT_MAX_BODY_BYTES", "DEFAULT_READ_TIMEOUT_S", "DEFAULT_HEAD_TIMEOUT_S"):
        assert getattr(agent_limits, name) == getattr(router_limits, name), name
    assert agent_bodies.MAX_JSON_DEPTH == router_limits.MAX_JSON_DEPTH


def test_the_router_resumes_streams_with_the_header_the_agent_reads():
    assert router_resume.RESUME_HEADER == agent_chat.RESUME_HEADER
    assert router_resume.CHAT_PATH == agent_chat.CHAT


def test_the_router_asks_for_load_reports_in_the_agents_words():
    from cloud_router import affinity
    from edge_agent.rest import router as agent_rest

    assert affinity.LOAD_FORMAT_HEADER == agent_rest.LOAD_FORMAT_HEADER
    assert affinity.LOAD_HEADER == agent_rest.LOAD_HEADER
