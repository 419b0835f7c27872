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

from tests.e2e.agent_support import agent_behind_router

EXAMPLES = 50  # per operation (~9 each): about a minute for both servers on 2 cores


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_genai_bundle):
    with agent_behind_router(tmp_path_factory.mktemp("fuzz"), tiny_genai_bundle, "fuzzed",
                             "--max-tokens-default", "8", "--queue-size", "64") as s:
        yield {"agent": s.agent_url, "router": s.router_url}
        assert s.agent.alive() and s.router.alive()


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
