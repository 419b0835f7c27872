"""Publish a bundle store over HTTP for agents to fetch (``edgegen bundle serve``).

Files are served as ``/<name>/<digest12>/<file>`` with Range support (resumable downloads);
``GET /index.json`` lists the bundles with their URLs.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from edge_agent.bundle.format import iter_bundles


def create_bundle_server(store: str | Path) -> FastAPI:
    store = Path(store)
    app = FastAPI(title="edgegen bundle store", docs_url=None, redoc_url=None)

    @app.get("/index.json")
    async def index(request: Request) -> JSONResponse:
        base = str(request.base_url).rstrip("/")
        return JSONResponse([{"name": b.name, "digest": b.digest, "precision": b.precision,
                              "url": f"{base}/{b.name}/{b.digest12}/"}
                             for b in iter_bundles(store)])

    app.mount("/", StaticFiles(directory=store), name="bundles")
    return app
