"""HTTP plumbing of the edge: error bodies and handlers, API keys, body limits, trace ids,
Server-Timing, SSE."""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragline.errors import InvalidArgument, PermissionDenied, RaglineError
from ragline.telemetry import current_trace_id

log = logging.getLogger(__name__)


class Unauthenticated(RaglineError):
    grpc_code = "UNAUTHENTICATED"
    http_status = 401


def error_response(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"code": code, "message": message, **extra}}
    if trace_id := current_trace_id():
        body["error"]["trace_id"] = trace_id
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimitMiddleware:
    """Answers 413 for bodies over the limit, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_response(
            413,
            "payload_too_large",
            f"request body is larger than {self.max_bytes} bytes: split the document or "
            "raise RAGLINE_API_MAX_BODY_BYTES",
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await too_big(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class TraceIdMiddleware:
    """Every HTTP response says which trace it belongs to (X-Trace-Id)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_trace(message):
            if message["type"] == "http.response.start":
                trace_id = current_trace_id()
                if trace_id:
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-trace-id", trace_id.encode())]
            await send(message)

        await self.app(scope, receive, send_with_trace)


REQUESTS = Counter("ragline_api_requests", "HTTP requests answered", ["route", "status"])
LATENCY = Histogram(
    "ragline_api_request_seconds",
    "Time to the response head (streams: to the first byte)",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
_ROUTES = {"/chat", "/v1/chat/completions", "/v1/models", "/v1/embeddings", "/documents",
           "/search", "/readyz", "/healthz", "/chat/kb_chat", "/"}  # fmt: skip
_ROUTE_PREFIXES = ("/collections", "/jobs", "/knowledge_base")  # one label per family


class MetricsMiddleware:
    """Counts responses per route and status (unknown paths share one label)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"].startswith("/metrics"):
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        for prefix in _ROUTE_PREFIXES:  # one label, not one per collection, document or job
            if path == prefix or path.startswith(prefix + "/"):
                route = prefix
        start = time.perf_counter()

        async def counted_send(message):
            if message["type"] == "http.response.start":
                REQUESTS.labels(route, str(message["status"])).inc()
                LATENCY.labels(route).observe(time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counted_send)


UPLOAD_TYPES = {"text/plain": ".txt", "text/markdown": ".md", "text/html": ".html",
                "application/pdf": ".pdf"}  # fmt: skip


def upload_name(filename: str | None, content_type: str | None) -> str:
    """An uploaded file's safe base name; one without a known suffix gets the suffix of its
    part's content type (``text/markdown``: .md), which is how the file is then read."""
    from ragline.documents import SUPPORTED_SUFFIXES

    mime = (content_type or "").partition(";")[0].strip().lower()
    suffix = UPLOAD_TYPES.get(mime)
    if not filename and suffix:
        return "upload" + suffix
    name = safe_filename(filename or "")
    if suffix and PurePosixPath(name).suffix.lower() not in SUPPORTED_SUFFIXES:
        return name + suffix
    return name


def check_form_fields(form, allowed: set[str]) -> None:
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise InvalidArgument(
            f"unknown form field(s) {', '.join(map(repr, unknown))}: send only "
            f"{', '.join(sorted(allowed))}"
        )


def safe_filename(name: str) -> str:
    """The base name of an uploaded file, so '../../etc/passwd' cannot name a path."""
    base = PureWindowsPath(PurePosixPath(name).name).name.strip()
    if not base or base in {".", ".."}:
        raise InvalidArgument(f"upload has no usable file name ({name!r})")
    return base


def server_timing(timings: dict[str, float], cache: str) -> str:
    parts = [f"{k};dur={v:.1f}" for k, v in timings.items() if k != "total"]
    return ", ".join([*parts, f'cache;desc="{cache}"'])


async def sse_events(events: AsyncIterator[tuple[str, object]]) -> AsyncIterator[bytes]:
    try:
        async for event, data in events:
            payload = {"text": data} if event == "token" else data
            yield f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()
    except RaglineError as exc:
        err = {"code": exc.grpc_code.lower(), "message": exc.message}
        yield f"event: error\ndata: {json.dumps(err)}\n\n".encode()


@dataclass(frozen=True)
class ApiKey:
    """A key, and the collections it may touch (None: every one)."""

    token: str
    collections: frozenset[str] | None = None

    def may(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


def api_key_auth(keys: list[ApiKey]):
    """A FastAPI dependency that refuses requests without one of ``keys`` as a Bearer token
    (no keys: everything passes) and remembers the key for ``check_collection``."""

    async def authorize(request: Request) -> None:
        request.state.api_key = None
        if not keys:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest against every key: the time taken says nothing about the keys
        matches = [hmac.compare_digest(token, k.token) for k in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise Unauthenticated("missing or wrong API key: send 'Authorization: Bearer <key>'")
        request.state.api_key = keys[matches.index(True)]

    return authorize


def check_collection(request: Request, collection: str) -> str:
    """``collection``, unless the request's key is limited to others (403)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is not None and not key.may(collection):
        raise PermissionDenied(
            f"this API key may not use collection {collection!r}; it is limited to "
            f"{', '.join(sorted(key.collections or ()))}"
        )
    return collection


def visible_collections(request: Request, names: list[str]) -> list[str]:
    """The names the request's key may see (a scoped key lists only its own)."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return [n for n in names if key is None or key.may(n)]


def validation_problems(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line: ``field: what is wrong; ...``."""
    problems = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        what = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            what = "not a field of this request: leave it out"
        problems.append(f"{loc}: {what}")
    return "; ".join(problems)


_HTTP_CODES = {400: "invalid_argument", 403: "permission_denied", 404: "not_found",
               405: "method_not_allowed", 413: "too_large",
               415: "unsupported_media_type"}  # fmt: skip


def _allowed_methods(request: Request) -> list[str]:
    from starlette.routing import Match

    methods: set[str] = set()
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI, internal: str = "see the edge log (trace_id)") -> None:
    """Every refusal as ``{"error": {"code", "message"}}``: ragline's errors with their status,
    FastAPI's own (unknown route, wrong method, unparsable body, validation) as 4xx, and a bug
    as a 500 that says where to look (``internal``) and shows no internals."""

    @app.exception_handler(RaglineError)
    async def _domain_error(request: Request, exc: RaglineError) -> JSONResponse:
        extra = {"stage": exc.stage} if hasattr(exc, "stage") else {}
        return error_response(exc.http_status, exc.grpc_code.lower(), exc.message, **extra)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"internal error; {internal}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "body is not valid JSON (or not UTF-8): send a JSON object"
        elif exc.status_code == 404:
            detail = f"no route {request.url.path}: see /docs for the API"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        resp = error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), detail)
        for name, value in (exc.headers or {}).items():
            resp.headers[name] = value
        if exc.status_code == 405:  # every method of the path, not only its first route's
            resp.headers["Allow"] = ", ".join(_allowed_methods(request))
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_argument", validation_problems(exc))
