"""A streamed answer whose generation is refused is refused before the 200: the client gets a
429, not an error event inside a stream it already counted as admitted."""

from __future__ import annotations

import pytest

from ragline.errors import StageError
from services.api.chat import CacheControl
from tests.unit.test_chat_service import Stages, query, service


class RefusingStages(Stages):
    async def stream(self, messages, params, timeout=None):
        raise StageError("generate", "RESOURCE_EXHAUSTED", "generate is busy")
        yield  # an async generator, as the stage client's stream is


async def test_a_refused_generation_raises_before_the_stream_starts() -> None:
    stages = RefusingStages()
    chat = await service(stages)
    q = query(cache=CacheControl(False, False), answerer="generate")
    with pytest.raises(StageError, match="busy") as refused:
        await chat.stream(q)
    assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"  # the edge answers 429
    assert chat.admission.inflight == 0  # its admission slot was given back


async def test_an_admitted_stream_sends_sources_then_tokens_then_done() -> None:
    chat = await service(Stages())
    stream = await chat.stream(query(cache=CacheControl(False, False), answerer="generate"))
    events = [event async for event, _ in stream.events]
    assert events[0] == "sources" and events[-1] == "done" and "token" in events
