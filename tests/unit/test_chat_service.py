"""ChatService without HTTP or sockets: caching (what the key holds), admission, streaming.

The stages here are test doubles of the stage clients' interfaces; the same behaviours run
against real stage processes in tests/integration/test_edge.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from ragline.errors import ResourceExhausted, StageError
from ragline.types import Completion, CompletionChunk, Hit, SamplingParams, SearchResult, Usage
from services.api.admission import Admission
from services.api.cache import AnswerCache, KnowledgeVersion, SemanticCache, ServedModel
from services.api.chat import CacheControl, ChatLimits, ChatQuery, ChatService
from services.api.pipeline import ChatPipeline
from services.api.prompt import PromptPolicy


class Stages:
    """Embed, retrieve and generate in one double; counts generations, can refuse."""

    def __init__(self) -> None:
        self.generated = 0
        self.refuse = False
        self.model = "model-a"
        self.version = 1
        self.gate: asyncio.Event | None = None

    async def embed_query(self, query: str, timeout=None) -> np.ndarray:
        return np.array([1.0, float(len(query) % 3), 0.0], dtype=np.float32)

    async def search(self, collection, vector, top_k, timeout=None) -> SearchResult:
        return SearchResult([Hit("hb.md#0", 0.9, "Claims within 30 days.")][:top_k])

    async def generate(self, messages, params, timeout=None) -> Completion:
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise StageError("generate", "RESOURCE_EXHAUSTED", "queue full")
        self.generated += 1
        return Completion(f" 30 days [hb.md#0] ({messages[-1]['content']})", "stop", Usage(9, 4))

    async def stream(self, messages, params, timeout=None):
        self.generated += 1
        for piece in ("30 ", "days"):
            yield CompletionChunk(piece)
        yield CompletionChunk("", "stop", Usage(9, 2))

    async def stats(self, collection, timeout=None):
        return type("Stats", (), {"last_write_unix_ms": self.version})()

    async def info(self, timeout=None):
        return type("Info", (), {"model": self.model})()


async def service(stages: Stages, prompt: PromptPolicy | None = None, **admission) -> ChatService:
    pipeline = ChatPipeline(stages, stages, stages, collection="kb", timeout_s=5, prompt=prompt)
    kb, model = KnowledgeVersion(stages, "kb"), ServedModel(stages)
    await kb.refresh()
    await model.refresh()
    adm = Admission(admission.get("inflight", 4), admission.get("waiting", 0), 0.01)
    return ChatService(pipeline, adm, AnswerCache(60), kb, model, SemanticCache(0.99, 60))


def query(text: str = "How many days?", **kw) -> ChatQuery:
    return ChatQuery(text, 4, ChatLimits().params(), **kw)


async def test_a_repeat_is_a_hit_and_the_key_holds_everything_that_changes_an_answer() -> None:
    stages = Stages()
    chat = await service(stages)
    first = await chat.answer(query())
    assert first.source == "miss" and first.body["cached"] is False
    assert first.body["answer"].startswith("30 days") and first.body["usage"]["prompt_tokens"] == 9
    again = await chat.answer(query("how many DAYS"))
    assert again.source == "hit" and again.body["cached"] is True and stages.generated == 1
    changed = [
        ChatQuery("How many days?", 3, ChatLimits().params()),
        query(history=({"role": "user", "content": "hi"},)),
        ChatQuery("How many days?", 4, replace(ChatLimits().params(), temperature=0.7)),
        ChatQuery("How many days?", 4, replace(ChatLimits().params(), max_tokens=8)),
    ]
    for i, q in enumerate(changed, 2):
        assert (await chat.answer(q)).source == "miss" and stages.generated == i
    stages.model = "model-b"  # generate restarted with other weights
    await chat.model.refresh()
    assert (await chat.answer(query())).source == "miss", "another model: not the old answer"
    stages.version = 2  # a write to the knowledge base
    await chat.kb_version.refresh()
    assert (await chat.answer(query())).source == "miss", "a write invalidates"
    other_prompt = await service(stages, PromptPolicy(system_prompt="Answer in French."))
    other_prompt.cache = chat.cache  # same (shared, e.g. Redis) cache, another prompt
    assert (await other_prompt.answer(query())).source == "miss", "another prompt: a miss"


async def test_cache_control_and_unknown_model_or_version_turn_caching_off() -> None:
    stages = Stages()
    chat = await service(stages)
    await chat.answer(query(cache=CacheControl(store=False, lookup=False)))
    assert (await chat.answer(query())).source == "miss", "no-store stored nothing"
    assert (await chat.answer(query(cache=CacheControl.parse("no-cache")))).source == "miss"
    assert (await chat.answer(query())).source == "hit"
    assert CacheControl.parse("max-age=0, No-Store") == CacheControl(lookup=False, store=False)
    chat.kb_version.value = -1  # retrieve not reachable yet
    assert (await chat.answer(query())).source == "miss"
    chat.kb_version.value, chat.model.value, stages.model = 1, "", ""
    assert (await chat.answer(query())).source == "miss", "model unknown: nothing cached"


async def test_semantic_hit_and_streamed_answers_are_stored_and_replayed() -> None:
    stages = Stages()
    chat = await service(stages)
    streamed = await chat.stream(query())
    events = [e async for e in streamed.events]
    assert [e for e, _ in events] == ["sources", "token", "token", "done"]
    assert events[-1][1]["finish_reason"] == "stop" and events[-1][1]["cached"] is False
    hit = await chat.answer(query())
    assert hit.source == "hit" and hit.body["answer"] == "30 days"
    replay = await chat.stream(query())
    assert replay.source == "hit" and [e async for e in replay.events][1] == ("token", "30 days")
    similar = await chat.answer(query("How many days??!"))  # same normalised text: exact hit
    assert similar.source == "hit"
    near = await chat.answer(query("Days, how many"))  # the double embeds it the same
    assert near.source == "semantic-hit" and near.body["similarity"] == 1.0
    assert stages.generated == 1


async def test_admission_refuses_when_full_and_a_stage_refusal_releases_the_slot() -> None:
    stages = Stages()
    chat = await service(stages, inflight=1)
    stages.gate = asyncio.Event()
    slow = asyncio.create_task(chat.answer(query("first", cache=CacheControl(False, False))))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await chat.answer(query("second", cache=CacheControl(False, False)))
    stages.gate.set()
    await slow
    stages.gate, stages.refuse = None, True
    with pytest.raises(StageError) as err:
        await chat.answer(query("third"))
    assert err.value.http_status == 429 and chat.admission.waiting == 0
    stages.refuse = False
    assert (await chat.answer(query("fourth"))).source == "miss", "the slot was released"


def test_limits_cap_and_refuse_with_what_to_fix() -> None:
    limits = ChatLimits(default_top_k=4, max_top_k=20, max_query_chars=10, max_tokens=256)
    assert limits.top_k(None) == 4 and limits.params(10_000).max_tokens == 256
    assert limits.params().seed == 0 and limits.params(seed=7).seed == 7
    with pytest.raises(Exception, match="between 1 and 20"):
        limits.top_k(21)
    with pytest.raises(Exception, match="the limit is 10"):
        limits.query("x" * 11)
    assert SamplingParams().cache_fields()["stop"] == []
