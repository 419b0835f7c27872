"""ASGI middleware for every agent response."""

from __future__ import annotations


class NodeHeaders:
    """x-edgegen-node and x-edgegen-tier on every response (streams too)."""

    def __init__(self, app, node: str, tier: str):
        self.app = app
        self.extra = [(b"x-edgegen-node", node.encode()), (b"x-edgegen-tier", tier.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
