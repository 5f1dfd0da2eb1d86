"""The lifecycle every gRPC stage shares (``ragline.grpc_server``), with a tiny stage on port 0."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ragline.grpc_server import GrpcService, Stage

NAME = "test.v1.Tiny"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TinyStage(Stage):
    """Warm-up waits on ``warm``; ``Wait`` RPCs wait on ``release``; every step is recorded."""

    service_name = NAME

    def __init__(self, fail_warmup: bool = False) -> None:
        self.fail_warmup = fail_warmup
        self.warm = asyncio.Event()
        self.release = asyncio.Event()
        self.events: list[str] = []
        self.closed = 0

    def register(self, server: grpc.aio.Server) -> None:
        async def wait(request: bytes, context) -> bytes:
            self.events.append("rpc started")
            await self.release.wait()
            return b"done"

        handlers = {"Wait": grpc.unary_unary_rpc_method_handler(wait)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(NAME, handlers),))

    async def warmup(self) -> None:
        await self.warm.wait()
        if self.fail_warmup:
            raise RuntimeError("the model did not load")
        self.events.append("warmed up")

    def background(self) -> list:
        return [self.tick()]

    async def tick(self) -> None:
        self.events.append("background started")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.events.append("background cancelled")
            raise

    async def close(self) -> None:
        self.events.append("closed")
        self.closed += 1


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def health(port: int, service: str = NAME) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status


async def drain_status(service: GrpcService) -> int:
    # The server refuses new RPCs while it drains, so ask the health servicer itself.
    request = health_pb2.HealthCheckRequest(service=NAME)
    return (await service.health.Check(request, None)).status


def tiny_service(stage: TinyStage) -> GrpcService[TinyStage]:
    return GrpcService(stage, host="127.0.0.1", port=0, grace_s=10.0)


async def test_serving_after_warmup_background_until_stop_then_close_once() -> None:
    stage = TinyStage()
    service = tiny_service(stage)
    starting = asyncio.create_task(service.start())
    await until(lambda: service.port != 0 and service.health is not None)
    port = service.port
    assert await health(port) == NOT_SERVING and await health(port, "") == NOT_SERVING
    assert stage.events == []  # no background work before warm-up
    stage.warm.set()
    assert await starting == port
    assert await health(port) == SERVING and await health(port, "") == SERVING
    await until(lambda: "background started" in stage.events)
    assert stage.events == ["warmed up", "background started"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        in_flight = asyncio.ensure_future(channel.unary_unary(f"/{NAME}/Wait")(b"", timeout=10))
        await until(lambda: "rpc started" in stage.events)
        stopping = asyncio.create_task(service.stop())
        deadline = time.monotonic() + 10
        while await drain_status(service) != NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING after stop() began"
            await asyncio.sleep(0.01)
        # Draining: the RPC in flight is still running, so nothing is torn down yet.
        assert not stopping.done()
        assert "background cancelled" not in stage.events and stage.closed == 0
        stage.release.set()
        assert await in_flight == b"done"
        await stopping
    assert stage.events[-2:] == ["background cancelled", "closed"]
    await service.stop()
    assert stage.closed == 1, "a second stop closes nothing again"


async def test_serve_forever_stops_on_sigterm() -> None:
    stage = TinyStage()
    stage.warm.set()
    service = tiny_service(stage)
    serving = asyncio.create_task(service.serve_forever())
    await until(lambda: "background started" in stage.events)
    assert await health(service.port) == SERVING
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 15)
    assert stage.events[-2:] == ["background cancelled", "closed"] and stage.closed == 1


async def test_a_failed_warmup_still_closes_the_stage() -> None:
    stage = TinyStage(fail_warmup=True)
    stage.warm.set()
    service = tiny_service(stage)
    with pytest.raises(RuntimeError, match="did not load"):
        await service.serve_forever()
    assert stage.closed == 1 and "background started" not in stage.events
