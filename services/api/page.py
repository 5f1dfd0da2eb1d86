"""The chat page: ``GET /`` serves one static page (no build step, nothing from a CDN) that
picks a knowledge base, asks, streams the answer with its cited passages, and uploads
documents. The page holds no data, so it needs no key; every call it makes to the API sends
the key the user typed in, and the API checks it as it checks any client's."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

STATIC = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Everything the page loads or calls is the edge itself: the browser refuses anything else.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def page_router() -> APIRouter:
    """``/`` and ``/static/<file>``; the files are read once, here."""
    files = {p.name: (p.read_bytes(), MEDIA_TYPES[p.suffix]) for p in STATIC.iterdir()
             if p.suffix in MEDIA_TYPES}  # fmt: skip
    router = APIRouter(include_in_schema=False)

    def serve(name: str) -> Response:
        if name not in files:
            raise HTTPException(404, f"no such file {name!r}: the chat page is at /")
        content, media_type = files[name]
        return Response(content, media_type=media_type, headers=HEADERS)

    @router.get("/")
    async def index() -> Response:
        return serve("index.html")

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        return serve(name)

    return router
