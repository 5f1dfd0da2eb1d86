"""Thin gRPC servicer of the generate stage."""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from ragline.errors import InvalidArgument
from ragline.grpc_server import GrpcService, Stage
from ragline.v1 import generate_pb2, generate_pb2_grpc
from services.generate.backends import load_backend
from services.generate.backends.base import ROLES, ChatMessage, Finished, SamplingParams
from services.generate.engine import GenerationEngine
from services.generate.settings import GenerateSettings

SERVICE_NAME = "ragline.v1.Generate"
_FINISH = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "cancelled": generate_pb2.FINISH_REASON_CANCELLED,
}


def sampling_from_pb(p: generate_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Unset fields take the backend's defaults (``SamplingParams``'s)."""
    d = SamplingParams(max_tokens=default_max_tokens)
    return SamplingParams(
        max_tokens=p.max_tokens or default_max_tokens,
        temperature=p.temperature if p.HasField("temperature") else d.temperature,
        top_p=p.top_p if p.HasField("top_p") else d.top_p,
        top_k=p.top_k if p.HasField("top_k") else d.top_k,
        seed=p.seed if p.HasField("seed") else d.seed,
        stop=tuple(p.stop),
        repetition_penalty=(
            p.repetition_penalty if p.HasField("repetition_penalty") else d.repetition_penalty
        ),
    )


def _timings(f: Finished) -> generate_pb2.Timings:
    return generate_pb2.Timings(
        **{k: round(v, 3) for k, v in f.timings.items()},
        cached_prompt_tokens=f.cached_tokens,
        prefill_tokens=max(0, f.prompt_tokens - f.cached_tokens),
    )


def _usage(f: Finished) -> generate_pb2.Usage:
    return generate_pb2.Usage(
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        cached_prompt_tokens=f.cached_tokens,
    )


class GenerateServicer(generate_pb2_grpc.GenerateServicer):
    def __init__(self, engine: GenerationEngine, settings: GenerateSettings) -> None:
        self.engine = engine
        self.settings = settings

    def parse(self, request: generate_pb2.GenerateRequest):
        if not request.messages:
            raise InvalidArgument("messages is empty: send at least one user message")
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                raise InvalidArgument(
                    f"messages[{i}].role is {m.role!r}; use one of {', '.join(ROLES)}"
                )
        if not any(m.content.strip() for m in request.messages):
            raise InvalidArgument("every message is empty: send some content")
        p = request.params
        limit = self.settings.max_tokens_limit
        if p.max_tokens > limit:
            raise InvalidArgument(f"max_tokens is {p.max_tokens}; the limit is {limit}")
        if p.HasField("temperature") and not (0 <= p.temperature <= 2):
            raise InvalidArgument(f"temperature must be in [0, 2], got {p.temperature}")
        if p.HasField("top_p") and not (0 < p.top_p <= 1):
            raise InvalidArgument(f"top_p must be in (0, 1], got {p.top_p}")
        if p.HasField("repetition_penalty") and not (
            math.isfinite(p.repetition_penalty) and 0 < p.repetition_penalty <= 10
        ):
            raise InvalidArgument("repetition_penalty must be in (0, 10]")
        if any(not s for s in p.stop) or len(p.stop) > 16:
            raise InvalidArgument("stop takes at most 16 non-empty strings")
        messages = [ChatMessage(role=m.role, content=m.content) for m in request.messages]
        return messages, sampling_from_pb(p, self.settings.default_max_tokens)

    @staticmethod
    def deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    async def Generate(self, request, context):
        messages, params = self.parse(request)
        parts: list[str] = []
        async for event in self.engine.stream(messages, params, self.deadline(context)):
            if isinstance(event, Finished):
                return generate_pb2.GenerateResponse(
                    text="".join(parts),
                    finish_reason=_FINISH[event.finish_reason],
                    usage=_usage(event),
                    model=self.engine.backend.model_name,
                    timings=_timings(event),
                )
            parts.append(event)
        raise RuntimeError("generation ended without a result")

    async def GenerateStream(self, request, context):
        messages, params = self.parse(request)
        async for event in self.engine.stream(messages, params, self.deadline(context)):
            if isinstance(event, Finished):
                yield generate_pb2.GenerateChunk(
                    finish_reason=_FINISH[event.finish_reason],
                    usage=_usage(event),
                    timings=_timings(event),
                )
            else:
                yield generate_pb2.GenerateChunk(text=event)

    async def Info(self, request, context):
        backend = self.engine.backend
        return generate_pb2.GenerateInfo(
            model=backend.model_name,
            backend=backend.name,
            context_length=backend.context_length,
            max_concurrent_requests=self.settings.max_queue,
            default_max_tokens=self.settings.default_max_tokens,
        )


class GenerateStage(Stage):
    """The generate stage: one engine (scheduler thread and backend) behind the servicer."""

    service_name = SERVICE_NAME

    def __init__(self, engine: GenerationEngine, settings: GenerateSettings) -> None:
        self.engine = engine  # for tests and metrics: queued/active counts
        self.servicer = GenerateServicer(engine, settings)

    def register(self, server: grpc.aio.Server) -> None:
        generate_pb2_grpc.add_GenerateServicer_to_server(self.servicer, server)

    async def warmup(self) -> None:
        params = SamplingParams(max_tokens=2, temperature=0.0)
        async for _ in self.engine.stream([ChatMessage("user", "Hello")], params, None):
            pass

    async def close(self) -> None:
        # Joins the scheduler thread (it finishes the step it is in), off the event loop.
        await asyncio.to_thread(self.engine.close)


def build(settings: GenerateSettings) -> GrpcService[GenerateStage]:
    """Load the model and make the (not yet started) server."""
    engine = GenerationEngine(load_backend(settings), settings.max_queue, settings.max_queue_wait_s)
    return GrpcService.from_settings(settings, GenerateStage(engine, settings))
