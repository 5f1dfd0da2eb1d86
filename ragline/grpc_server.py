"""gRPC server bootstrap shared by every stage.

Each stage gets: an asyncio server, domain errors mapped to status codes in one interceptor,
``grpc.health.v1`` per service name (NOT_SERVING until the model is loaded and warmed up, and
again while shutting down), server reflection, and graceful shutdown on SIGTERM/SIGINT. A stage
is a ``Stage`` (register, warm up, background, close); ``GrpcService`` runs every stage through
the same lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter

from ragline.errors import InvalidArgument, RaglineError

log = logging.getLogger(__name__)
HANDLED = Counter(
    "ragline_grpc_server_handled", "RPCs completed by this server", ["method", "code"]
)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RaglineError):
        return grpc.StatusCode[exc.grpc_code], exc.message
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.error = InvalidArgument(
            f"the request is not a valid {type_name} protobuf message ({error}); "
            "send bytes serialised from the method's request type (strings must be UTF-8)"
        )


def _tolerant(deserializer: Callable | None) -> Callable | None:
    """gRPC answers INTERNAL when deserialisation fails; ragline answers INVALID_ARGUMENT."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, invalid UTF-8, ...
            return _Undecodable(type_name, exc)

    return deserialize


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain exceptions into status codes with their message; logs anything unexpected."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    if isinstance(request, _Undecodable):
                        raise request.error
                    response = await inner(request, context)
                except (RaglineError, Exception) as exc:
                    HANDLED.labels(method, _code_name(exc)).inc()
                    await _abort(context, method, exc)
                HANDLED.labels(method, "OK").inc()
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    if isinstance(request, _Undecodable):
                        raise request.error
                    async for item in inner_stream(request, context):
                        yield item
                except asyncio.CancelledError:  # the client went away or cancelled
                    HANDLED.labels(method, "CANCELLED").inc()
                    raise
                except (RaglineError, Exception) as exc:
                    HANDLED.labels(method, _code_name(exc)).inc()
                    await _abort(context, method, exc)
                HANDLED.labels(method, "OK").inc()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, _tolerant(handler.request_deserializer), handler.response_serializer
            )
        return handler


def _code_name(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AbortError):
        return "ABORTED_BY_HANDLER"
    return _status_for(exc)[0].name


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException) -> None:
    # context.abort raises AbortError; re-raising it untouched keeps its status.
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = _status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("unexpected error in %s", method, exc_info=exc)
    else:
        log.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


class Stage:
    """One gRPC stage's part in the lifecycle ``GrpcService`` runs.

    ``register`` adds the servicers; ``warmup`` loads and exercises the model (health says
    NOT_SERVING until it returns); ``background`` gives coroutines that run while serving and
    are cancelled at shutdown; ``close`` releases the model, engine or store once the server
    has stopped taking RPCs.
    """

    service_name: str

    def register(self, server: grpc.aio.Server) -> None:
        raise NotImplementedError

    async def warmup(self) -> None:
        """Load and exercise the model; the default has nothing to warm."""

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """Coroutines run as tasks from warm-up to shutdown; the default has none."""
        return []

    async def close(self) -> None:
        """Release what the stage holds; called once, after the server stopped."""


S = TypeVar("S", bound=Stage)


class GrpcService(Generic[S]):
    """Owns one ``grpc.aio`` server with health and reflection, and runs one ``Stage``.

    ``start``: bind, register, NOT_SERVING, warm up, start the background tasks, SERVING.
    ``stop``: NOT_SERVING, stop with grace (in-flight RPCs finish), cancel the background
    tasks, close the stage. ``serve_forever``: start, wait for SIGTERM/SIGINT, stop.
    """

    def __init__(
        self,
        stage: S,
        *,
        host: str,
        port: int,
        max_message_mb: int = 16,
        grace_s: float = 5.0,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.stage = stage
        self.host = host
        self.requested_port = port
        self.service_names = [stage.service_name]
        self.grace_s = grace_s
        self.credentials = credentials
        self._max_bytes = max_message_mb * 1024 * 1024
        self.server: grpc.aio.Server | None = None
        self.health: health_aio.HealthServicer | None = None
        self.port = 0
        self._tasks: list[asyncio.Task] = []
        self._stopped = False

    @classmethod
    def from_settings(cls, settings, stage: S) -> GrpcService[S]:
        """A service bound as ``settings`` (a ``GrpcServiceSettings``) says."""
        from ragline.tls import server_credentials

        return cls(
            stage,
            host=settings.host,
            port=settings.port,
            max_message_mb=settings.max_message_mb,
            grace_s=settings.grace_s,
            credentials=server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            ),
        )

    async def bind(self) -> int:
        """Bind and start taking RPCs, every service NOT_SERVING; ``start`` calls it.

        The server is created here, inside the running event loop, because grpc.aio binds
        its objects to the loop that is current when they are made.
        """
        from ragline.telemetry import grpc_server_interceptors

        # Tracing outermost, so the server span records the status the mapping produced.
        self.server = grpc.aio.server(
            interceptors=[*grpc_server_interceptors(), ErrorMappingInterceptor()],
            options=[
                ("grpc.max_receive_message_length", self._max_bytes),
                ("grpc.max_send_message_length", self._max_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.stage.register(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, reflection.SERVICE_NAME, "grpc.health.v1.Health"], self.server
        )
        address = f"{self.host}:{self.requested_port}"
        if self.credentials is not None:
            self.port = self.server.add_secure_port(address, self.credentials)
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.host}:{self.requested_port}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info("listening on %s:%d (%s%s)", self.host, self.port, ", ".join(self.service_names),
                 ", TLS" if self.credentials is not None else "")  # fmt: skip
        return self.port

    async def start(self) -> int:
        """Bind (unless ``bind`` ran), warm up, start the background tasks, report SERVING."""
        if self.server is None:
            await self.bind()
        await self.stage.warmup()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(coro) for coro in self.stage.background()]
        for task in self._tasks:
            task.add_done_callback(_log_failure)
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self) -> None:
        """Drain (NOT_SERVING, then stop with grace), cancel the background, close the stage."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if self.server is not None:
                await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
                await self.server.stop(self.grace_s)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            await self.stage.close()
            log.info("stopped %s", ", ".join(self.service_names))

    async def serve_forever(self) -> None:
        """Start, and stop gracefully on SIGTERM or SIGINT (or when start fails)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.start()
            log.info("serving on port %d", self.port)
            await stop.wait()
            log.info("shutting down (grace %.1fs)", self.grace_s)
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)


def _log_failure(task: asyncio.Task) -> None:
    # A background task that dies takes its job with it (following the writer, say): say so.
    if not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


def serve_main(settings, label: str, build: Callable[[Any], GrpcService]) -> int:
    """Entry point body shared by every stage's ``__main__``: logging, tracing, serve."""
    from ragline.logging_setup import setup_logging
    from ragline.telemetry import setup_tracing

    setup_logging(settings.log_level, label)
    setup_tracing(f"ragline-{label}")
    if settings.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port, addr=settings.host)
    from ragline.tls import server_credentials

    try:  # certificate paths are checked before anything loads
        server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    except ValueError as exc:
        log.error("%s", exc)
        print(f"ragline {label}: {exc}", file=sys.stderr)
        return 2
    try:  # e.g. a database that cannot be reached: say so, no traceback
        service = build(settings)
    except RaglineError as exc:
        log.error("%s", exc)
        print(f"ragline {label}: {exc}", file=sys.stderr)
        return 2
    asyncio.run(service.serve_forever())
    return 0
