"""The edge's FastAPI application: middleware, error handlers, routers, and the ``Edge`` that
the routes call (built from settings at start-up, closed at shutdown)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.gzip import GZipMiddleware

from services.api.chatchat_compat import chatchat_router
from services.api.http import (
    BodyLimitMiddleware,
    MetricsMiddleware,
    TraceIdMiddleware,
    api_key_auth,
    install_error_handlers,
)
from services.api.openapi import contract
from services.api.page import page_router
from services.api.routes import chat_router, knowledge_base_router, probes_router
from services.api.settings import ApiSettings
from services.api.wiring import Edge, configure_stage_tls, load_api_keys


def create_app(settings: ApiSettings) -> FastAPI:
    """Raises ValueError on unreadable key files or certificates (before anything starts)."""
    configure_stage_tls(settings)
    keys = load_api_keys(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.edge = Edge.from_settings(settings)
        app.state.edge.start()
        yield
        await app.state.edge.close()

    app = FastAPI(
        title="ragline",
        version="0.1.0",
        description="RAG over your own documents: embed, retrieve and generate as gRPC stages.",
        lifespan=lifespan,
    )
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TraceIdMiddleware)
    app.add_middleware(MetricsMiddleware)
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    # Server span per request, parented on an incoming W3C traceparent; probes are not traced.
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,livez,readyz,metrics")
    install_error_handlers(app)
    app.include_router(chat_router(api_key_auth(keys), settings))
    app.include_router(knowledge_base_router(api_key_auth(keys), settings))
    app.include_router(chatchat_router(api_key_auth(keys), settings))
    app.include_router(probes_router())
    app.include_router(page_router())

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, make_asgi_app
    from starlette.responses import Response

    def metrics(_request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # /metrics itself, not a 307 to /metrics/ (a mount alone redirects); /metrics/ still works.
    app.add_route("/metrics", metrics, include_in_schema=False)
    app.mount("/metrics", make_asgi_app())
    app.openapi = contract(app, settings)
    return app
