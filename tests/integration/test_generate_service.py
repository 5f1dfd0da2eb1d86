"""The generate stage over real gRPC with the real SmolLM2 model in llama.cpp."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from ragline.clients import GenerateClient, sampling_params
from ragline.v1 import generate_pb2
from services.generate.backends.base import ChatMessage, Finished, SamplingParams
from services.generate.server import build
from services.generate.settings import GenerateSettings

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
async def served():
    service = build(GenerateSettings(port=0, max_queue=2, max_batch_size=2, context_length=512))
    port = await service.start()
    client = GenerateClient(f"127.0.0.1:{port}")
    yield client, service.stage.engine
    await client.close()
    await service.stop()  # closes the engine too


async def test_unary_returns_text_usage_and_reason(served) -> None:
    client, _ = served
    resp = await client.generate(client.request(QUESTION, sampling_params(max_tokens=16)))
    assert resp.text.strip()
    assert resp.usage.prompt_tokens > 5 and 0 < resp.usage.completion_tokens <= 16
    assert resp.finish_reason in (
        generate_pb2.FINISH_REASON_STOP,
        generate_pb2.FINISH_REASON_LENGTH,
    )
    assert "SmolLM2" in resp.model or "smollm" in resp.model.lower()
    assert resp.timings.prefill_ms > 0


async def test_stream_yields_many_chunks_then_finish(served) -> None:
    client, _ = served
    chunks = [
        c
        async for c in client.stream(
            client.request(QUESTION, sampling_params(max_tokens=12, temperature=0))
        )
    ]  # noqa: E501
    texts = [c.text for c in chunks if c.text]
    assert len(texts) > 1
    assert chunks[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].usage.completion_tokens > 0


async def test_greedy_with_seed_is_deterministic_and_max_tokens_holds(served) -> None:
    client, _ = served
    params = sampling_params(max_tokens=8, temperature=0, seed=7)
    a = await client.generate(client.request(QUESTION, params))
    b = await client.generate(client.request(QUESTION, params))
    assert a.text == b.text
    long = await client.generate(
        client.request([{"role": "user", "content": "Write a long story about a dragon."}],
                       sampling_params(max_tokens=5, temperature=0))
    )  # fmt: skip
    assert long.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert long.usage.completion_tokens <= 6  # retokenising the text may merge or split one


async def test_cancelling_a_stream_frees_the_engine(served) -> None:
    client, engine = served
    call = client.stub.GenerateStream(
        client.request([{"role": "user", "content": "Count from one to five hundred."}],
                       sampling_params(max_tokens=400, temperature=0))
    )  # fmt: skip
    async for chunk in call:
        if chunk.text:
            break
    assert engine.active == 1
    call.cancel()
    deadline = time.monotonic() + 2
    while engine.active and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.active == 0, "the cancelled job still holds the worker"
    resp = await client.generate(client.request(QUESTION, sampling_params(max_tokens=4)))
    assert resp.text


def _steps_with_company() -> tuple[float, float]:
    """(all scheduler steps, steps that put more than one token through the model)."""
    from prometheus_client import REGISTRY

    total = REGISTRY.get_sample_value("ragline_generate_step_tokens_count") or 0.0
    single = REGISTRY.get_sample_value("ragline_generate_step_tokens_bucket", {"le": "1.0"}) or 0.0
    return total, total - single


async def test_concurrent_streams_are_decoded_together(served) -> None:
    client, engine = served
    before_total, before_shared = _steps_with_company()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.active)
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    reqs = [
        client.request([{"role": "user", "content": q}], sampling_params(max_tokens=12))
        for q in ("Write a poem about the sea.", "Write a story about a fox.")
    ]
    results = await asyncio.gather(*(client.generate(r, timeout=120) for r in reqs))
    watcher.cancel()
    for r in results:
        assert r.text and 1 <= r.usage.completion_tokens <= 12
    total, shared = _steps_with_company()
    assert peak == 2, "both requests should hold a slot at the same time"
    assert shared - before_shared > 0, "no model step carried both sequences"
    assert total > before_total


async def test_cancelling_one_stream_leaves_the_other_running(served) -> None:
    client, engine = served
    long = client.request([{"role": "user", "content": "Count from one to five hundred."}],
                          sampling_params(max_tokens=300, temperature=0))  # fmt: skip
    keep = client.request(QUESTION, sampling_params(max_tokens=24, temperature=0))
    victim = client.stub.GenerateStream(long)
    async for chunk in victim:
        if chunk.text:
            break
    survivor = asyncio.create_task(client.generate(keep, timeout=120))
    while engine.active < 2:
        await asyncio.sleep(0.005)
    victim.cancel()
    deadline = time.monotonic() + 2
    while engine.active > 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert engine.active <= 1, "the cancelled stream still holds its slot"
    resp = await survivor
    assert resp.text and resp.usage.completion_tokens >= 1


async def test_queue_full_is_resource_exhausted(served) -> None:
    client, _ = served
    req = client.request(QUESTION, sampling_params(max_tokens=24, temperature=0))
    results = await asyncio.gather(
        *(client.generate(req, timeout=60) for _ in range(6)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused, "six concurrent requests against a queue of 2 must refuse some"
    assert all(r.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "RAGLINE_GENERATE_MAX_QUEUE" in refused[0].details()
    assert any(isinstance(r, generate_pb2.GenerateResponse) for r in results)


@pytest.mark.parametrize(
    ("messages", "params", "fragment"),
    [
        ([], {}, "messages is empty"),
        ([{"role": "wizard", "content": "hi"}], {}, "use one of system, user, assistant"),
        ([{"role": "user", "content": "   "}], {}, "every message is empty"),
        (QUESTION, {"max_tokens": 5000}, "the limit is 1024"),
        (QUESTION, {"temperature": 3.0}, "temperature must be in [0, 2]"),
        (QUESTION, {"top_p": 0.0}, "top_p must be in (0, 1]"),
        ([{"role": "user", "content": "word " * 2000}], {}, "the context holds 512"),
    ],
)
async def test_bad_input_is_invalid_argument(served, messages, params, fragment) -> None:
    client, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await client.generate(client.request(messages, sampling_params(**params)))
    assert exc.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in exc.value.details()


async def test_info(served) -> None:
    client, _ = served
    info = await client.stub.Info(generate_pb2.GenerateInfoRequest())
    assert info.backend == "llamacpp" and info.context_length == 512


@pytest.mark.gpu
def test_exllamav2_backend_loads_on_a_gpu() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("exllamav2")
    from services.generate.backends.exllamav2 import ExLlamaV2Backend

    with pytest.raises(FileNotFoundError, match="config.json"):
        ExLlamaV2Backend("/nonexistent")


def _tiny_llama_dir(path) -> None:
    """A Llama-architecture HF directory with random weights and a word-level tokenizer."""
    import json

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(509)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }))  # fmt: skip
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float16).save_pretrained(path, safe_serialization=True)


@pytest.mark.gpu
async def test_exllamav2_streams_exact_lengths_concurrently_and_cancels(tmp_path) -> None:
    """On a GPU: a random-weight Llama loads, concurrent jobs each generate exactly the
    requested tokens (EOS can be sampled: the check is on jobs that report 'length'), and a
    cancelled stream frees its job at once."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("exllamav2")
    pytest.importorskip("transformers")
    from services.generate.backends.exllamav2 import ExLlamaV2Backend
    from services.generate.engine import GenerationEngine

    _tiny_llama_dir(tmp_path)
    backend = ExLlamaV2Backend(tmp_path, max_seq_len=512, cache_tokens=4096, max_batch_size=8)
    engine = GenerationEngine(backend, max_queue=16)
    msgs = [ChatMessage("user", "w1 w2 w3 w4")]

    async def run(n: int) -> tuple[int, Finished]:
        pieces = 0
        async for event in engine.stream(msgs, SamplingParams(n, temperature=1.0, seed=n), None):
            if isinstance(event, Finished):
                return pieces, event
            pieces += 1
        raise AssertionError("no Finished")

    results = await asyncio.gather(*(run(n) for n in (5, 17, 33, 64)))
    for n, (_, done) in zip((5, 17, 33, 64), results, strict=True):
        assert done.completion_tokens <= n
        if done.finish_reason == "length":
            assert done.completion_tokens == n
    stream = engine.stream(msgs, SamplingParams(400, temperature=1.0), None)
    await anext(stream)
    await stream.aclose()
    deadline = time.monotonic() + 2
    while engine.active and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.active == 0 and not backend._running
    engine.close()


def test_exllamav2_without_its_extra_says_how_to_install() -> None:
    try:
        import exllamav2  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("exllamav2 is installed here")
    from ragline.errors import Unavailable
    from services.generate.backends.exllamav2 import ExLlamaV2Backend

    with pytest.raises(Unavailable, match=r"ragline\[gpu\]"):
        ExLlamaV2Backend("/models/x")


async def test_stopping_the_server_closes_the_engine() -> None:
    service = build(GenerateSettings(port=0, max_queue=2, max_batch_size=1, context_length=512))
    await service.start()
    engine = service.stage.engine
    assert engine._worker.is_alive()
    await service.stop()
    assert not engine._worker.is_alive(), "a stopped server leaves no scheduler thread behind"
    assert engine.backend.ctx is None, "a stopped server frees its llama.cpp context"
