"""Thin gRPC servicer of the embed stage."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from ragline import vectors
from ragline.errors import InvalidArgument, ResourceExhausted
from ragline.grpc_server import GrpcService
from ragline.models import resolve_embed_model
from ragline.v1 import embed_pb2, embed_pb2_grpc
from services.embed.model import EmbeddingModel
from services.embed.settings import EmbedSettings

tracer = trace.get_tracer(__name__)
SERVICE_NAME = "ragline.v1.Embed"
_KINDS = {
    embed_pb2.INPUT_KIND_UNSPECIFIED: "passage",
    embed_pb2.INPUT_KIND_QUERY: "query",
    embed_pb2.INPUT_KIND_PASSAGE: "passage",
}


class EmbedServicer(embed_pb2_grpc.EmbedServicer):
    def __init__(self, model: EmbeddingModel, settings: EmbedSettings) -> None:
        self.model = model
        self.settings = settings
        # ONNX Runtime parallelises inside one run; one run at a time keeps cores from fighting.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.in_flight = 0

    def validate(self, request: embed_pb2.EmbedRequest) -> str:
        texts = request.texts
        if not texts:
            raise InvalidArgument("texts is empty: send at least one text")
        if len(texts) > self.settings.max_client_batch_size:
            raise InvalidArgument(
                f"{len(texts)} texts in one request; the limit is "
                f"{self.settings.max_client_batch_size}: split the batch"
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"text {i} is empty or whitespace")
            if len(text) > self.settings.max_text_chars:
                raise InvalidArgument(
                    f"text {i} has {len(text)} characters; the limit is "
                    f"{self.settings.max_text_chars}"
                )
        if request.kind not in _KINDS:
            raise InvalidArgument(
                f"unknown kind {request.kind}: use INPUT_KIND_QUERY or INPUT_KIND_PASSAGE"
            )
        return _KINDS[request.kind]

    async def Embed(self, request, context):
        kind = self.validate(request)
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise ResourceExhausted(
                f"embed is overloaded: {self.in_flight} requests in flight, limit "
                f"{self.settings.max_concurrent_requests}; retry shortly"
            )
        self.in_flight += 1
        try:
            enqueued = time.perf_counter()
            loop = asyncio.get_running_loop()
            with tracer.start_as_current_span("embed.inference") as span:
                span.set_attribute("ragline.batch_size", len(request.texts))
                vecs, tokens = await loop.run_in_executor(
                    self.executor, self.model.embed, list(request.texts), kind, request.truncate
                )
                span.set_attribute("ragline.tokens", sum(tokens))
                span.set_attribute("ragline.elapsed_ms", (time.perf_counter() - enqueued) * 1000)
        finally:
            self.in_flight -= 1
        return embed_pb2.EmbedResponse(
            vectors=vectors.pack(vecs),
            dimension=vecs.shape[1],
            count=vecs.shape[0],
            model=self.model.name,
            token_counts=tokens,
            total_tokens=sum(tokens),
            normalized=self.model.config.normalize,
        )

    async def Info(self, request, context):
        cfg = self.model.config
        return embed_pb2.EmbedInfo(
            model=cfg.name,
            dimension=self.model.dimension,
            max_input_tokens=cfg.max_length,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            query_instruction=cfg.query_instruction,
            max_client_batch_size=self.settings.max_client_batch_size,
            providers=self.model.providers,
        )


def build(settings: EmbedSettings) -> tuple[GrpcService, object]:
    model_dir = resolve_embed_model(settings.model, settings.data_dir)
    model = EmbeddingModel(
        model_dir,
        providers=[p.strip() for p in settings.providers.split(",") if p.strip()],
        intra_op_threads=settings.intra_op_threads,
    )
    servicer = EmbedServicer(model, settings)
    service = GrpcService.from_settings(
        settings,
        SERVICE_NAME,
        lambda server: embed_pb2_grpc.add_EmbedServicer_to_server(servicer, server),
    )

    async def warmup() -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(servicer.executor, model.embed, ["warm up"], "query", True)

    return service, warmup
