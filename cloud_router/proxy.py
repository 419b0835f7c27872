"""The forwarded OpenAI paths: the router's hot path.

Every request of the fleet passes here, so the front (``cloud_router.front``) hands these
requests over straight from the connection, with no framework in between (routing,
dependency injection, validation, response classes, middleware, the ASGI cycle): check the
key, decode the JSON, choose, forward, answer. Every other request goes to ``asgi``, the
FastAPI app of the router's own pages.

This module and ``app`` are the only ones that know status codes and response headers:
choosing is the policy's job, sending the forwarder's, and their outcomes become HTTP here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cloud_router.affinity import LOAD_HEADER, prefix_keys
from cloud_router.auth import bearer_key_ok
from cloud_router.exchange import Reply, Request, json_reply
from cloud_router.forwarding import Forwarded, Forwarder, Refused
from cloud_router.geo import parse_location
from cloud_router.limits import BadBody, decode_json
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
                    405: "bad_request", 408: "body_timeout", 413: "too_large",
                    431: "too_large"}


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
    """The front's handler: POSTs to ``FORWARDED_PATHS`` are forwarded (``handle``); anything
    else goes to ``asgi``."""

    def __init__(self, asgi, settings: RouterSettings, table: EndpointTable,
                 forwarder: Forwarder, metrics: RouterMetrics, state=None):
        self.asgi = asgi
        self.state = state   # the app's state, for whoever holds this handler
        self.settings = settings
        self.table = table
        self.forwarder = forwarder
        self.metrics = metrics

    def native(self, method: str, path: str) -> bool:
        return path in FORWARDED_PATHS

    def refused(self, status: int) -> None:
        """Counts a request refused before forwarding (here, or by the front)."""
        self.metrics.count("none", REFUSED_OUTCOMES[status])

    async def handle(self, request: Request) -> Reply:
        if request.method != "POST":
            self.refused(405)
            return json_reply(405, error_body(405, "Method Not Allowed"), [(b"allow", b"POST")])
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        try:
            outcome = await self._forward(request.path, request.body, headers)
        except ClientError as exc:
            self.refused(exc.status)
            return json_reply(exc.status, exc.body)
        if isinstance(outcome, Refused):
            return json_reply(503, error_body(503, outcome.message, code="no_endpoint"),
                              [(b"retry-after", str(outcome.retry_after_s).encode()),
                               (b"x-edgegen-route", outcome.route.encode())])
        out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers.items()
               if k not in DROPPED_RESPONSE_HEADERS]
        out += [(b"x-edgegen-node", outcome.endpoint.node.encode()),
                (b"x-edgegen-tier", outcome.endpoint.tier.encode()),
                (b"x-edgegen-route", outcome.route.encode())]
        return Reply(outcome.status, out, outcome.body, outcome.stream)

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
