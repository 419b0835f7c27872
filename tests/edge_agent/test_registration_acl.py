"""Agent registration against a real `edgegen registry --acl-file`, through py-consul as
against a Consul with ACLs: the agent's token registers, resyncs and deregisters; a token
that may not write gets Consul's 403, logged once as a refusal (not as "unreachable"), and
never appears in a log record."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest

from edge_agent.bundle import Bundle
from edge_agent.registration import ConsulRegistration
from edge_agent.settings import AgentSettings
from tests.cloud_router.registry_support import ReadyServer, start_registry

WRITE = "agent-write-token-0123456789abcdef"
READ = "router-read-token-0123456789abcdef"
ACL = {"tokens": [
    {"secret_id": WRITE, "accessor_id": "0b0b0b0b-0000-4000-8000-000000000001",
     "rules": {"service": {"edgegen-edge": {"policy": "write"}}}},
    {"secret_id": READ, "accessor_id": "0b0b0b0b-0000-4000-8000-000000000002",
     "rules": {"service_prefix": {"edgegen-": {"policy": "read"}},
               "node_prefix": {"": {"policy": "read"}}}},
]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registration-acl")
    acl = tmp / "acl.json"
    acl.write_text(json.dumps(ACL))
    acl.chmod(0o600)
    proc, url = start_registry(tmp, acl_file=acl)
    yield url
    proc.stop()


@pytest.fixture
def ready():
    server = ReadyServer()
    yield server
    server.close()


def settings(url: str, port: int, token: str | None) -> AgentSettings:
    return AgentSettings(bundle="/nonexistent", node=f"n{port}", port=port, consul=url,
                         region="eu", consul_token=token)


def bundle() -> Bundle:
    return Bundle(path=Path("/nonexistent"), manifest={"name": "tiny"}, digest="ab" * 32)


def health(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/health/service/edgegen-edge",
                     headers={"X-Consul-Token": READ}).json()


async def until(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


def test_the_agents_token_registers_resyncs_and_deregisters(registry, ready, monkeypatch,
                                                             caplog):
    # py-consul would prefer this variable over the token it is given; the settings win.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "a-stale-token-from-the-shell")
    caplog.set_level(logging.DEBUG)

    async def scenario():
        reg = ConsulRegistration(settings(registry, ready.port, WRITE), bundle(),
                                 resync_interval=0.2)
        await reg.start()
        await until(lambda: any(e["Service"]["Port"] == ready.port for e in health(registry)))
        await asyncio.sleep(1.0)             # several resyncs: each reads with the token
        assert reg.state == "registered" and reg.registered
        await reg.stop()
        assert not any(e["Service"]["Port"] == ready.port for e in health(registry))

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.name == "edge_agent.registration"]
    assert messages.count("registered in consul") == 1, messages
    assert not any("forgot" in m for m in messages), messages
    assert all(WRITE not in r.getMessage() and WRITE not in str(r.__dict__)
               for r in caplog.records)


@pytest.mark.parametrize("token, who", [
    (READ, "token with AccessorID '0b0b0b0b-0000-4000-8000-000000000002'"),
    (None, "anonymous token"),
])
def test_a_token_that_may_not_write_is_refused_with_consuls_text(registry, ready, caplog,
                                                                 token, who):
    caplog.set_level(logging.INFO, logger="edge_agent.registration")

    async def scenario():
        reg = ConsulRegistration(settings(registry, ready.port, token), bundle(),
                                 resync_interval=0.2, max_backoff=0.3)
        await reg.start()
        await asyncio.sleep(1.5)             # several refused tries
        assert reg.state == "denied" and not reg.registered
        await reg.update(bundle())           # a hot swap is refused the same way
        assert reg.state == "denied"
        await reg.stop(timeout=2.0)

    asyncio.run(scenario())
    assert not any(e["Service"]["Port"] == ready.port for e in health(registry))
    records = [r for r in caplog.records if r.name == "edge_agent.registration"
               and "refused" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in caplog.records]   # once, not per try
    error = records[0].__dict__["error"]
    assert f"Permission denied: {who} lacks permission 'service:write' on \"edgegen-edge\"" \
        in error
    assert "--consul-token-file" in error
    assert not any("unreachable" in r.getMessage() for r in caplog.records
                   if r.name == "edge_agent.registration")
    for r in caplog.records:
        assert READ not in r.getMessage() and READ not in str(r.__dict__)
