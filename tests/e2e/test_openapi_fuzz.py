"""Schema-driven fuzzing (schemathesis) of a real agent and a real router in front of it, from
their own OpenAPI documents: bounded runs, and no answer may be a 5xx.

Each document describes the request and response bodies of every endpoint, so the fuzzer
sends well-typed and ill-typed bodies alike; both servers must answer a client's mistake
with a 4xx, and keep answering."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.cloud_router.registry_support import start_registry
from tests.support.procs import EdgegenProcess, free_port, wait_http

EXAMPLES = 50  # per operation (~9 each): about a minute for both servers on 2 cores


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_genai_bundle):
    tmp = tmp_path_factory.mktemp("fuzz")
    registry, consul = start_registry(tmp)
    agent_port, router_port = free_port(), free_port()
    agent = EdgegenProcess(["agent", "--bundle", str(tiny_genai_bundle.path), "--node", "fuzzed",
                            "--port", str(agent_port), "--consul", consul, "--threads", "1",
                            "--advertise-host", "127.0.0.1", "--max-tokens-default", "8",
                            "--queue-size", "64"], tmp, "agent")
    router = EdgegenProcess(["router", "--consul", consul, "--port", str(router_port)], tmp,
                            "router")
    urls = {"agent": f"http://127.0.0.1:{agent_port}", "router": f"http://127.0.0.1:{router_port}"}
    try:
        wait_http(urls["agent"] + "/readyz", timeout=120, proc=agent.proc)
        wait_http(urls["router"] + "/readyz", timeout=60, proc=router.proc)
        yield urls
        assert agent.alive() and router.alive()
    finally:
        for p in (router, agent, registry):
            p.stop()


def test_documents_describe_every_body(servers):
    for name, url in servers.items():
        doc = httpx.get(url + "/openapi.json").json()
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                if method == "post":
                    assert "requestBody" in op, (name, path)
                if path != "/metrics":
                    assert "content" in op["responses"]["200"], (name, path, method)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def fuzz(url: str) -> dict[str, int]:
    """Every operation of ``url``'s document, ``EXAMPLES`` generated cases each; the count of
    answers by status class. A 5xx fails at once, naming the request."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    seen: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @FUZZ
        def call(case):
            response = case.call(base_url=url, timeout=60)
            seen[f"{response.status_code // 100}xx"] = seen.get(
                f"{response.status_code // 100}xx", 0) + 1
            assert response.status_code < 500, (case.method, case.path, case.body,
                                                response.status_code, response.text[:300])

        call()
    return seen


@pytest.mark.parametrize("server", ["agent", "router"])
def test_no_answer_is_a_5xx(servers, server):
    seen = fuzz(servers[server])
    print(server, seen)
    assert seen.get("2xx", 0) > 0 and seen.get("4xx", 0) > 0, seen  # both kinds were sent
