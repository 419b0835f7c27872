"""A request and its answer as the front (``cloud_router.front``) hands them to its handler
and writes them back: plain data, no I/O."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from cloud_router.streams import UpstreamStream


@dataclass
class Request:
    method: str
    path: str                     # percent-decoded
    raw_path: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]   # names lower-case
    body: bytes = b""
    keep_alive: bool = True
    http_version: str = "1.1"


@dataclass
class Reply:
    """An answer: ``body`` whole, or ``stream`` (an SSE stream the sender must close)."""

    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    stream: UpstreamStream | None = None


def json_reply(status: int, body: dict, headers: list | None = None) -> Reply:
    return Reply(status, [(b"content-type", b"application/json"), *(headers or [])],
                 json.dumps(body).encode())


class Handler(Protocol):
    """What the front serves: ``native`` says which requests ``handle`` answers itself, the
    rest go to ``asgi``; ``refused`` is told of each request the front refuses (status)."""

    asgi: Callable

    def native(self, method: str, path: str) -> bool: ...

    def handle(self, request: Request) -> Awaitable[Reply]: ...

    def refused(self, status: int) -> None: ...
