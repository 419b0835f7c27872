"""``GET /edgegen/v1/identity?nonce=...``: this agent proves to a router that it holds the
fleet key, so that an address registered in Consul by someone else is never sent a prompt.

The answer is an HMAC-SHA256, with the fleet key, over the router's nonce and what this agent
registered in Consul: its service ID, node, address and port. The key itself never leaves the
agent. The message format is the router's (``cloud_router/identity.py``); the packages share
no code, so ``tests/test_identity_contract.py`` pins this copy to that one. An agent started
without a fleet key answers 404: a router that requires the key does not route to it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from edge_agent.serving.protocol import ErrorResponse, error
from edge_agent.settings import AgentSettings

router = APIRouter()
IDENTITY_PATH = "/edgegen/v1/identity"
PROTOCOL = "edgegen-identity-v1"
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,128}")


class IdentityAnswer(BaseModel):
    object: str = "edgegen.identity"
    service_id: str
    node: str
    address: str
    port: int
    nonce: str
    mac: str   # hex HMAC-SHA256(fleet key, identity_message(...))


def registered_service_id(settings: AgentSettings) -> str:
    """The service ID this agent registers under (DESIGN.md: ``<service>-<node>-<port>``)."""
    service = "edgegen-central" if settings.tier == "central" else "edgegen-edge"
    return f"{service}-{settings.node}-{settings.port}"


def identity_message(nonce: str, service_id: str, node: str, address: str, port: int) -> bytes:
    return "\n".join((PROTOCOL, nonce, service_id, node, address, str(port))).encode()


def identity_answer(settings: AgentSettings, nonce: str) -> IdentityAnswer:
    """The answer to ``nonce``; ``settings.fleet_key`` must be set."""
    sid = registered_service_id(settings)
    mac = hmac.new(settings.fleet_key,
                   identity_message(nonce, sid, settings.node, settings.address, settings.port),
                   hashlib.sha256).hexdigest()
    return IdentityAnswer(service_id=sid, node=settings.node, address=settings.address,
                          port=settings.port, nonce=nonce, mac=mac)


@router.get(IDENTITY_PATH, response_model=IdentityAnswer,
            responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})
async def identity(request: Request, nonce: str = "") -> JSONResponse:
    """Prove to a router that this agent holds the fleet key (HMAC over the nonce and this
    agent's registration)."""
    settings: AgentSettings = request.app.state.settings
    if not settings.fleet_key:
        err = error(404, "this agent was started without a fleet key (--fleet-key-file), so "
                    "it cannot prove its identity", code="no_fleet_key")
        return JSONResponse(err.body, status_code=err.status)
    if not _NONCE.fullmatch(nonce):
        err = error(400, "nonce: 16 to 128 characters of A-Z, a-z, 0-9, '-' and '_'",
                    param="nonce", code="invalid_nonce")
        return JSONResponse(err.body, status_code=err.status)
    return JSONResponse(identity_answer(settings, nonce).model_dump())
