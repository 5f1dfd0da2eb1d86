"""Thin gRPC servicer of the embed stage."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from ragline import vectors
from ragline.errors import InvalidArgument
from ragline.grpc_server import GrpcService, Stage
from ragline.models import resolve_embed_model
from ragline.v1 import embed_pb2, embed_pb2_grpc
from services.embed.batcher import MicroBatcher
from services.embed.model import EmbeddingModel
from services.embed.settings import EmbedSettings

SERVICE_NAME = "ragline.v1.Embed"
_KINDS = {
    embed_pb2.INPUT_KIND_UNSPECIFIED: "passage",
    embed_pb2.INPUT_KIND_QUERY: "query",
    embed_pb2.INPUT_KIND_PASSAGE: "passage",
}
# Tokenising a few short texts on the event loop is cheaper than a thread hop.
_INLINE_TOKENIZE_CHARS = 4096


class EmbedServicer(embed_pb2_grpc.EmbedServicer):
    def __init__(self, model: EmbeddingModel, settings: EmbedSettings) -> None:
        self.model = model
        self.settings = settings
        # One inference thread: ONNX Runtime parallelises inside a run (intra-op threads).
        self.inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-infer")
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-tokenize")
        self.batcher = MicroBatcher(
            model.infer,
            self.inference,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_us=settings.max_wait_us,
            max_concurrent_requests=settings.max_concurrent_requests,
            merge=settings.batching,
        )

    async def close(self) -> None:
        """Stop the batching loop and let the threads go (after the server stopped taking RPCs)."""
        await self.batcher.stop()
        self.inference.shutdown(wait=False, cancel_futures=True)
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    def validate(self, request: embed_pb2.EmbedRequest | embed_pb2.TokenizeRequest) -> str:
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
                raise InvalidArgument(
                    f"text {i} is empty or whitespace-only: drop it or send real content"
                )
            if len(text) > self.settings.max_text_chars:
                raise InvalidArgument(
                    f"text {i} has {len(text)} characters; the limit is "
                    f"{self.settings.max_text_chars}: split it into passages first"
                )
        if request.kind not in _KINDS:
            raise InvalidArgument(
                f"unknown kind {request.kind}: use INPUT_KIND_QUERY or INPUT_KIND_PASSAGE"
            )
        return _KINDS[request.kind]

    async def _run_tokenizer(self, texts: list[str], fn, *args):
        """``fn(texts, *args)``: inline for a few short texts, else in the tokenizing thread."""
        if sum(len(t) for t in texts) <= _INLINE_TOKENIZE_CHARS:
            return fn(texts, *args)
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, texts, *args)

    async def Embed(self, request, context):
        kind = self.validate(request)
        texts = list(request.texts)
        tokens = await self._run_tokenizer(texts, self.model.tokenize, kind, request.truncate)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        vecs, timings = await self.batcher.embed(tokens, deadline)
        context.set_trailing_metadata(
            (
                ("x-queue-time", f"{timings.queue_ms:.3f}"),
                ("x-inference-time", f"{timings.inference_ms:.3f}"),
            )
        )
        counts = [len(t) for t in tokens]
        return embed_pb2.EmbedResponse(
            vectors=vectors.pack(vecs),
            dimension=vecs.shape[1],
            count=vecs.shape[0],
            model=self.model.name,
            token_counts=counts,
            total_tokens=sum(counts),
            normalized=self.model.config.normalize,
        )

    async def Tokenize(self, request, context):
        kind = self.validate(request)
        counts = await self._run_tokenizer(list(request.texts), self.model.count_tokens, kind)
        return embed_pb2.TokenizeResponse(
            token_counts=counts, max_input_tokens=self.model.config.max_length
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


class EmbedStage(Stage):
    """The embed stage: the model behind a micro-batcher; warm-up starts the batching loop."""

    service_name = SERVICE_NAME

    def __init__(self, model: EmbeddingModel, settings: EmbedSettings) -> None:
        self.model = model
        self.servicer = EmbedServicer(model, settings)

    def register(self, server: grpc.aio.Server) -> None:
        embed_pb2_grpc.add_EmbedServicer_to_server(self.servicer, server)

    async def warmup(self) -> None:
        self.servicer.batcher.start()
        await self.servicer.batcher.embed(self.model.tokenize(["warm up"], "query"))

    async def close(self) -> None:
        await self.servicer.close()


def build(settings: EmbedSettings) -> GrpcService[EmbedStage]:
    """Load the model and make the (not yet started) server."""
    model_dir = resolve_embed_model(settings.model, settings.data_dir)
    model = EmbeddingModel(
        model_dir,
        providers=[p.strip() for p in settings.providers.split(",") if p.strip()],
        intra_op_threads=settings.intra_op_threads,
        spinning=settings.spinning,
        inter_op_threads=settings.inter_op_threads,
    )
    if settings.max_batch_tokens < model.config.max_length:
        raise ValueError(
            f"max_batch_tokens ({settings.max_batch_tokens}) must hold one input of the model's "
            f"max length ({model.config.max_length})"
        )
    return GrpcService.from_settings(settings, EmbedStage(model, settings))
