"""The edge's parts, built from ``ApiSettings`` in one place: stage clients over replica
pools, the chat service with its caches and admission, document writes. ``create_app`` builds
an ``Edge`` at start-up and closes it at shutdown; nothing else constructs these."""

from __future__ import annotations

from dataclasses import dataclass

from ragline.balancer import PoolPolicy, ReplicaPool
from ragline.chunking import ChunkingPolicy
from ragline.clients import (
    EmbedStageClient,
    GenerateStageClient,
    RetrieveStageClient,
    ShardedRetrieveClient,
)
from services.api.admission import Admission
from services.api.cache import AnswerCache, KnowledgeVersion, SemanticCache, ServedModel
from services.api.chat import ChatLimits, ChatService
from services.api.collections import Collections
from services.api.http import ApiKey
from services.api.ingest import Documents, Ingestor
from services.api.jobs import IngestJobs
from services.api.pipeline import AnswerPolicy, ChatPipeline
from services.api.prompt import PromptPolicy
from services.api.settings import ApiSettings


def load_api_keys(settings: ApiSettings) -> list[ApiKey]:
    """Keys from ``api_keys`` (comma-separated, every collection) and ``api_keys_file``: one
    key per line, optionally followed by ``collections=hr,finance`` to limit it to those."""
    keys = [ApiKey(k.strip()) for k in (settings.api_keys or "").split(",") if k.strip()]
    if settings.api_keys_file is not None:
        try:
            lines = settings.api_keys_file.read_text().splitlines()
        except OSError as exc:
            raise ValueError(
                f"cannot read the API keys file {settings.api_keys_file}: {exc.strerror}"
            ) from None
        entries = [ln.split() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not entries:
            raise ValueError(f"the API keys file {settings.api_keys_file} holds no key")
        for n, (token, *scope) in enumerate(entries, 1):
            keys.append(ApiKey(token, _scope(scope, settings.api_keys_file, n)))
    return keys


def _scope(words: list[str], path, n: int) -> frozenset[str] | None:
    if not words:
        return None
    names = words[0].removeprefix("collections=").split(",") if len(words) == 1 else []
    if not words[0].startswith("collections=") or not all(names):
        raise ValueError(
            f"{path}, key {n}: after the key write nothing or collections=NAME[,NAME...] "
            f"(got {' '.join(words)!r})"
        )
    return frozenset(names)


def configure_stage_tls(settings: ApiSettings) -> None:
    """The edge's TLS to its stages: its settings, else ``RAGLINE_GRPC_TLS_*``; unreadable or
    incomplete certificate paths fail here, at start."""
    from ragline import tls

    env = tls.client_tls()
    stage_tls = tls.ClientTLS(
        ca=str(settings.grpc_tls_ca) if settings.grpc_tls_ca else env.ca,
        cert=str(settings.grpc_tls_cert) if settings.grpc_tls_cert else env.cert,
        key=str(settings.grpc_tls_key) if settings.grpc_tls_key else env.key,
        server_name=settings.grpc_tls_server_name or env.server_name,
    )
    if stage_tls.enabled:
        stage_tls.credentials()
    tls.configure_client(stage_tls)


@dataclass
class Edge:
    settings: ApiSettings
    pools: dict[str, ReplicaPool]
    chat: ChatService
    documents: Documents
    limits: ChatLimits
    collections: Collections
    embed: EmbedStageClient  # /v1/embeddings
    jobs: IngestJobs

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> Edge:
        """Must run inside the event loop (grpc.aio channels bind to it)."""
        policy = PoolPolicy(settings.max_fails, settings.fail_timeout_s, settings.health_interval_s)
        embed = EmbedStageClient.connect(settings.embed_address, policy)
        retrieve = (
            ShardedRetrieveClient.connect(settings.retrieve_address, policy)
            if ";" in settings.retrieve_address  # a collection split over shards
            else RetrieveStageClient.connect(settings.retrieve_address, policy)
        )
        generate = GenerateStageClient.connect(settings.generate_address, policy)
        writer = retrieve  # the writer has the latest version; a reader lags it by its refresh
        if settings.retrieve_write_address:
            writer = RetrieveStageClient.connect(
                settings.retrieve_write_address, policy, stage="retrieve-writer"
            )
        pipeline = ChatPipeline(
            embed,
            retrieve,
            generate,
            collection=settings.collection,
            timeout_s=settings.timeout_s,
            prompt=PromptPolicy.from_settings(settings),
            answering=AnswerPolicy.from_settings(settings),
            embed_timeout_s=settings.embed_timeout_s,
            retrieve_timeout_s=settings.retrieve_timeout_s,
        )
        kb_version = KnowledgeVersion(writer, settings.collection, settings.kb_poll_s)
        semantic = None
        if settings.semantic_cache_threshold is not None:
            semantic = SemanticCache(settings.semantic_cache_threshold, settings.cache_ttl_s,
                                     settings.semantic_cache_max_entries)  # fmt: skip
        chat = ChatService(
            pipeline,
            Admission(
                settings.max_inflight,
                settings.max_waiting,
                settings.queue_wait_s,
                adaptive=settings.adaptive_admission,
            ),  # fmt: skip
            AnswerCache(settings.cache_ttl_s, settings.cache_max_entries, settings.redis_url),
            kb_version,
            ServedModel(generate, settings.kb_poll_s),
            semantic,
            caching=settings.cache_ttl_s > 0,
        )
        ingestor = Ingestor(
            embed,
            writer,
            settings.collection,
            ChunkingPolicy(
                settings.chunk_words, settings.chunk_overlap_words, settings.chunk_tokens
            ),
        )
        pools = {stage.pool.stage: stage.pool for stage in (embed, retrieve, generate, writer)}
        if isinstance(retrieve, ShardedRetrieveClient):
            pools |= {pool.stage: pool for pool in retrieve.pools}
        collections = Collections(embed, writer, ingestor, pipeline, kb_version)
        documents = Documents(ingestor, kb_version)
        return cls(settings, pools, chat, documents, ChatLimits.from_settings(settings),
                   collections, embed, IngestJobs(documents))  # fmt: skip

    def start(self) -> None:
        for pool in self.pools.values():
            pool.start()
        self.chat.kb_version.start()
        self.chat.model.start()

    async def close(self) -> None:
        await self.jobs.close()
        self.chat.kb_version.stop()
        self.chat.model.stop()
        await self.chat.cache.close()
        for pool in self.pools.values():
            await pool.close()

    def readiness(self) -> tuple[bool, dict[str, dict[str, str]]]:
        """Ready when every stage has a replica SERVING; the status of each replica."""
        stages = {name: pool.status() for name, pool in self.pools.items()}
        ok = all(any(s == "SERVING" for s in replicas.values()) for replicas in stages.values())
        return ok, stages
