"""The embed stage over real gRPC with the real default model."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from ragline.clients import EmbedClient, EmbedStageClient, wait_for_serving
from ragline.v1 import embed_pb2
from services.embed.server import build
from services.embed.settings import EmbedSettings


@pytest.fixture(scope="module")
async def embed(tmp_path_factory):
    settings = EmbedSettings(
        port=0, data_dir=tmp_path_factory.mktemp("embed"), max_message_mb=1, max_client_batch_size=8
    )
    service = build(settings)
    port = await service.start()
    client = EmbedClient(f"127.0.0.1:{port}")
    yield client
    await client.close()
    await service.stop()


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


async def test_unit_vectors_of_the_model_dimension(embed) -> None:
    vecs, resp = await embed.embed(["hello world", "second text"])
    assert vecs.shape == (2, 384) and resp.dimension == 384 and resp.count == 2
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert resp.normalized and "MiniLM" in resp.model
    assert list(resp.token_counts) == [4, 4] and resp.total_tokens == 8


async def test_similar_texts_score_higher_than_unrelated(embed) -> None:
    vecs, _ = await embed.embed(
        [
            "How many vacation days do I get?",
            "Employees receive 25 days of annual leave.",
            "The office printer is on the third floor.",
        ]
    )
    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2


async def test_order_is_kept_and_batching_does_not_change_vectors(embed) -> None:
    texts = ["short", "a much longer sentence about travel expenses and receipts", "mid length"]
    together, _ = await embed.embed(texts)
    for i, text in enumerate(texts):
        alone, _ = await embed.embed([text])
        np.testing.assert_allclose(alone[0], together[i], atol=1e-4)


async def test_health_and_info(embed) -> None:
    await wait_for_serving(embed.address, "ragline.v1.Embed", timeout=5)
    info = await embed.info()
    assert info.dimension == 384 and info.pooling == "mean" and info.max_input_tokens == 256
    assert info.max_client_batch_size == 8 and "CPUExecutionProvider" in info.providers


@pytest.mark.parametrize(
    ("texts", "truncate", "fragment"),
    [
        ([], True, "texts is empty"),
        (["ok", "   "], True, "text 1 is empty"),
        (["x"] * 9, True, "the limit is 8"),
        (["word " * 400], False, "over the model's limit of 256"),
    ],
)
async def test_bad_input_is_invalid_argument_and_server_keeps_serving(
    embed, texts, truncate, fragment
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await embed.embed(texts, truncate=truncate)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.value.details()
    vecs, _ = await embed.embed(["still serving"])
    assert vecs.shape == (1, 384)


async def test_long_text_is_truncated_when_asked(embed) -> None:
    vecs, resp = await embed.embed(["word " * 400], truncate=True)
    assert vecs.shape == (1, 384) and resp.token_counts[0] == 256


async def test_tokenize_counts_what_embed_sees_and_never_truncates(embed) -> None:
    texts = ["hello world", "smtpd_recipient_restrictions = /etc/postfix/access", "word " * 1000]
    resp = await embed.tokenize(texts, embed_pb2.INPUT_KIND_PASSAGE)
    _, embedded = await embed.embed(texts, truncate=True)
    # The same counts as Embed, except that Tokenize does not cut the 1000 words (and
    # [CLS]/[SEP]) to the model's 256: that is what a chunker needs to know.
    assert list(embedded.token_counts) == [4, 18, 256]
    assert list(resp.token_counts) == [4, 18, 1002] and resp.max_input_tokens == 256
    query = await embed.tokenize(texts[:1], embed_pb2.INPUT_KIND_QUERY)
    assert list(query.token_counts) == [4], "MiniLM has no query instruction"


@pytest.mark.parametrize(
    ("texts", "fragment"),
    [([], "texts is empty"), (["x"] * 9, "the limit is 8: split the batch")],
)
async def test_bad_tokenize_input_is_invalid_argument(embed, texts, fragment) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await embed.tokenize(texts)
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.value.details()


async def test_tokenize_of_non_utf8_text_is_invalid_argument(embed) -> None:
    call = embed.channel.unary_unary("/ragline.v1.Embed/Tokenize")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call(b"\x0a\x03\xff\xfe\xfd", timeout=5)  # texts[0] holding invalid UTF-8
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "strings must be UTF-8" in exc.value.details()
    assert list((await embed.tokenize(["still serving"])).token_counts) == [4]


async def test_oversized_message_is_resource_exhausted(embed) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await embed.embed(["x" * 600_000, "y" * 600_000])
    assert exc.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_query_kind_without_instruction_equals_passage(embed) -> None:
    q, _ = await embed.embed(["same text"], kind=embed_pb2.INPUT_KIND_QUERY)
    p, _ = await embed.embed(["same text"], kind=embed_pb2.INPUT_KIND_PASSAGE)
    np.testing.assert_allclose(q, p, atol=1e-6)


async def test_concurrent_mixed_lengths_over_grpc_match_single_requests(embed) -> None:
    import asyncio

    from prometheus_client import REGISTRY

    texts = [("word " * (i % 7 * 9 + 1)) + f"number {i}" for i in range(48)]
    singles = [(await embed.embed([t]))[0][0] for t in texts]
    before = REGISTRY.get_sample_value("ragline_embed_batch_size_count") or 0
    results = await asyncio.gather(*(embed.embed([t]) for t in texts))
    for single, (vecs, _resp) in zip(singles, results, strict=True):
        np.testing.assert_allclose(vecs[0], single, atol=1e-5)
    runs = REGISTRY.get_sample_value("ragline_embed_batch_size_count") - before
    assert runs < len(texts), "concurrent requests shared ONNX Runtime runs"
    assert REGISTRY.get_sample_value("ragline_embed_tokens_total", {"kind": "padded"}) > 0


async def test_timings_come_back_as_metadata(embed) -> None:
    call = embed.stub.Embed(embed_pb2.EmbedRequest(texts=["timed"]))
    await call
    trailing = dict(await call.trailing_metadata())
    assert float(trailing["x-queue-time"]) >= 0 and float(trailing["x-inference-time"]) > 0


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(tmp_path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not available")
    from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model
    from services.embed.model import EmbeddingModel

    model_dir = resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path)
    gpu = EmbeddingModel(model_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = EmbeddingModel(model_dir)
    texts = ["expense claims within 30 days", "a longer text " * 20]
    np.testing.assert_allclose(gpu.embed(texts)[0], cpu.embed(texts)[0], atol=2e-3)


async def test_stopping_the_server_stops_its_batching_loop(tmp_path) -> None:
    import asyncio

    def loops() -> int:
        return sum(t.get_name() == "batcher" and not t.done() for t in asyncio.all_tasks())

    before = loops()
    service = build(EmbedSettings(port=0, data_dir=tmp_path))
    port = await service.start()
    assert loops() == before + 1
    client = EmbedClient(f"127.0.0.1:{port}")
    try:
        assert (await client.embed(["one request"]))[0].shape == (1, 384)
    finally:
        await client.close()
        await service.stop()
    assert loops() == before, "a stopped server leaves no batching task behind"


async def test_stage_client_splits_what_the_stage_takes_in_one_call(embed) -> None:
    # The stage takes 8 texts a call: the edge's client asks it once and sends 20 as 8+8+4.
    texts = [f"passage number {i} about {'travel ' * (i % 5)}expenses" for i in range(20)]
    stage = EmbedStageClient.connect(embed.address)
    try:
        assert await stage.batch_limit(timeout=5) == 8
        found = await stage.embed(texts, timeout=10)
        counts, limit = await stage.count_tokens(texts, timeout=10)
    finally:
        await stage.close()
    assert found.vectors.shape == (20, 384) and len(found.token_counts) == 20
    for i in (0, 9, 19):
        alone, _ = await embed.embed([texts[i]])
        np.testing.assert_allclose(alone[0], found.vectors[i], atol=1e-4)
    assert counts == list(found.token_counts) and limit == 256


def test_cuda_asked_for_but_not_active_refuses_to_start(tmp_path) -> None:
    """ONNX Runtime would fall back to the CPU with only a warning; the stage refuses instead."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is active here: nothing to refuse")
    from ragline.errors import FailedPrecondition
    from ragline.models import DEFAULT_EMBED_MODEL, resolve_embed_model
    from services.embed.model import EmbeddingModel

    model_dir = resolve_embed_model(DEFAULT_EMBED_MODEL, tmp_path)
    with pytest.raises(FailedPrecondition, match="CUDAExecutionProvider was asked for"):
        EmbeddingModel(model_dir, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
