"""The forwarded OpenAI paths as a bare ASGI app: the router's hot path.

Every request of the fleet passes here, so it skips the framework (routing, dependency
injection, response classes, middleware) that the router's own pages use, and works on ASGI
messages directly: read the body within its limits, check the key, decode the JSON, choose,
forward, answer. Whatever is not a forwarded path goes on to ``app`` (the FastAPI app).

This module and ``app`` are the only ones that know status codes and response headers:
choosing is the policy's job, sending the forwarder's, and their outcomes become HTTP here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Iterable

from cloud_router.affinity import LOAD_HEADER, prefix_keys
from cloud_router.auth import bearer_key_ok
from cloud_router.forwarding import Forwarded, Forwarder, Refused, UpstreamStream
from cloud_router.geo import parse_location
from cloud_router.limits import BadBody, BodyLimit, decode_json
from cloud_router.metrics import RouterMetrics
from cloud_router.policy import RequestHints
from cloud_router.protocol import error_body
from cloud_router.settings import RouterSettings
from cloud_router.table import EndpointTable

log = logging.getLogger(__name__)

FORWARDED_PATHS = frozenset(("/v1/chat/completions", "/v1/completions", "/v1/embeddings"))
# Hop-by-hop and server headers of the upstream's answer, and the x-edgegen-* ones this
# router sets itself.
DROPPED_RESPONSE_HEADERS = frozenset((
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
    "x-edgegen-node", "x-edgegen-tier", "x-edgegen-route", LOAD_HEADER))
# edgegen_router_requests_total{tier="none", outcome} of the requests refused here.
REFUSED_OUTCOMES = {400: "bad_request", 401: "unauthorized", 404: "unknown_model",
                    408: "body_timeout", 413: "too_large"}


class ClientError(Exception):
    """A request the router refuses before forwarding (bad key, bad JSON, unknown model, bad
    hint)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(status, message, code=code, param=param)


def hints_for(settings: RouterSettings, model: str, region: str | None, zone: str | None,
              location: str | None, prefix: tuple = ()) -> RequestHints:
    loc = None
    if location:
        try:
            loc = parse_location(location)
        except ValueError as exc:
            raise ClientError(400, f"x-edgegen-location: {exc}", "invalid_location",
                              "x-edgegen-location") from exc
    return RequestHints(model=model, region=region or settings.region, zone=zone or "",
                        location=loc, prefix=prefix)


def read_request(body: bytes) -> tuple[dict, str]:
    """The body's JSON object and its model; ClientError (400) for anything else."""
    try:
        payload = decode_json(body)
    except BadBody as exc:
        raise ClientError(400, str(exc), exc.code, exc.param) from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, str) or not model:
        raise ClientError(400, "the request body must be a JSON object with a 'model' string",
                          "missing_model", "model")
    return payload, model


def model_not_found(model: str, known: Iterable[str]) -> ClientError:
    return ClientError(404, f"The model {model!r} does not exist or no endpoint serves it; "
                       f"known models: {', '.join(sorted(known)) or 'none'}",
                       "model_not_found", "model")


class ForwardedPaths:
    """ASGI: POSTs to ``FORWARDED_PATHS`` are forwarded; anything else goes to ``app``."""

    def __init__(self, app, settings: RouterSettings, table: EndpointTable,
                 forwarder: Forwarder, metrics: RouterMetrics, body_limit: BodyLimit,
                 state=None):
        self.app = app
        self.state = state   # the app's state, for whoever holds this ASGI app
        self.settings = settings
        self.table = table
        self.forwarder = forwarder
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in FORWARDED_PATHS:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            return await _send_json(send, 405, error_body(405, "Method Not Allowed"),
                                    [(b"allow", b"POST")])
        body = await self.body_limit.read(scope, receive, send)
        if body is None:
            return None   # refused (413, 408: counted by the limit) or the client left
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            outcome = await self._forward(scope["path"], body, headers)
        except ClientError as exc:
            self.metrics.requests.labels("none", REFUSED_OUTCOMES[exc.status]).inc()
            return await _send_json(send, exc.status, exc.body)
        if isinstance(outcome, Refused):
            return await _send_json(send, 503, error_body(503, outcome.message,
                                                          code="no_endpoint"),
                                    [(b"retry-after", str(outcome.retry_after_s).encode()),
                                     (b"x-edgegen-route", outcome.route.encode())])
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers.items()
               if k not in DROPPED_RESPONSE_HEADERS]
        out += [(b"x-edgegen-node", outcome.endpoint.node.encode()),
                (b"x-edgegen-tier", outcome.endpoint.tier.encode()),
                (b"x-edgegen-route", outcome.route.encode())]
        if outcome.stream is None:
            out.append((b"content-length", str(len(outcome.body)).encode()))
            await send({"type": "http.response.start", "status": outcome.status,
                        "headers": out})
            await send({"type": "http.response.body", "body": outcome.body})
            return None
        await send_stream(outcome.stream, outcome.status, out, receive, send)

    async def _forward(self, path: str, body: bytes,
                       headers: dict[str, str]) -> Forwarded | Refused:
        s = self.settings
        if s.api_keys and not bearer_key_ok(headers.get("authorization"), s.api_keys):
            raise ClientError(401, "a valid API key is required: send 'Authorization: Bearer "
                              "<key>'", "invalid_api_key")
        payload, model = read_request(body)
        if not self.table.known_model(model):
            raise model_not_found(model, self.table.fleet.known_models)
        hints = hints_for(s, model, headers.get("x-edgegen-region"),
                          headers.get("x-edgegen-zone"), headers.get("x-edgegen-location"),
                          prefix_keys(path, payload) if s.policy.placement == "cache" else ())
        return await self.forwarder.forward(path, body, headers, hints, payload)


async def send_stream(stream: UpstreamStream, status: int, headers: list, receive,
                      send) -> None:
    """Sends an upstream stream's events as they arrive while watching for the client leaving,
    and always closes the stream (which releases the upstream, and so cancels its generation
    when the client left)."""
    delivered = False
    events = stream.events()

    async def pump() -> None:
        nonlocal delivered
        await send({"type": "http.response.start", "status": status, "headers": headers})
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        delivered = True

    async def client_left() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, OSError):
            await pumping   # OSError: the client went away while we wrote to it
        await events.aclose()
        await asyncio.shield(stream.close(delivered))


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    raw = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": raw})
