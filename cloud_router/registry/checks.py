"""Running one HTTP health check, as a Consul agent does (agent/check.mdx).

2xx is passing, 429 is warning, anything else (or no answer within Timeout) is critical.
Keep-alive is off, as in Consul, so a dead server is seen on the very next probe rather
than through a pooled connection.
"""

from __future__ import annotations

import httpx

from cloud_router.registry.definitions import CheckDefinition

OUTPUT_LIMIT = 4096  # Consul's default check_output_max_size


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0),
                             follow_redirects=True, trust_env=False)


async def http_probe(client: httpx.AsyncClient, check: CheckDefinition) -> tuple[str, str]:
    """(status, output) of one probe of an HTTP check."""
    headers = {k: ", ".join(v) for k, v in check.header.items()}
    headers.setdefault("User-Agent", "Consul Health Check")
    try:
        r = await client.request(check.method, check.http, headers=headers,
                                 timeout=check.timeout)
    except httpx.TimeoutException:
        return "critical", (f"{check.method} {check.http}: request timed out after "
                            f"{check.timeout:g}s")
    except httpx.HTTPError as exc:
        return "critical", f"{check.method} {check.http}: {type(exc).__name__}: {exc}"
    body = r.text[:OUTPUT_LIMIT]
    output = f"HTTP {check.method} {check.http}: {r.status_code} {r.reason_phrase} Output: {body}"
    if 200 <= r.status_code < 300:
        return "passing", output
    if r.status_code == 429:
        return "warning", output
    return "critical", output
