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
from ragline.types import (
    CollectionSummary,
    Completion,
    CompletionChunk,
    Embeddings,
    Hit,
    SamplingParams,
    SearchResult,
    Usage,
)
from services.api.admission import Admission
from services.api.cache import AnswerCache, KnowledgeVersion, SemanticCache, ServedModel
from services.api.chat import CacheControl, ChatLimits, ChatQuery, ChatService
from services.api.pipeline import AnswerPolicy, ChatPipeline
from services.api.prompt import PromptPolicy


class Stages:
    """Embed, retrieve and generate in one double; counts generations, can refuse."""

    def __init__(self) -> None:
        self.generated = 0
        self.refuse = False
        self.model = "model-a"
        self.version = 1  # of collection "kb"
        self.others: dict[str, int] = {"hr": 7}  # other collections and their versions
        self.replica_lag = 0  # versions the searched index is behind the writer
        self.searched: list[tuple[str, object]] = []  # (collection, where) of every search
        self.prompts: list[list[dict]] = []
        self.gate: asyncio.Event | None = None
        self.reply = " 30 days [hb.md#0]"
        self.hits = [
            Hit("hb.md#0", 0.9, "Expenses\nSubmit every claim within 30 days. Receipts are kept."),
            Hit("hb.md#1", 0.5, "Expenses > Mileage\nThe mileage rate is EUR 0.30 per km."),
        ]

    async def embed_query(self, query: str, timeout=None) -> np.ndarray:
        return np.array([1.0, float(len(query) % 3), 0.0], dtype=np.float32)

    async def embed(self, texts, kind, truncate=True, timeout=None) -> Embeddings:
        # "claim" sentences point where the questions do; the rest elsewhere
        rows = [[1.0, 2.0, 0.0] if "claim" in t else [0.0, 0.0, 1.0] for t in texts]
        vectors = np.array(rows, dtype=np.float32)
        return Embeddings(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))

    async def search(self, collection, vector, top_k, timeout=None, **kw) -> SearchResult:
        self.searched.append((collection, kw.get("where")))
        version = {"kb": self.version, **self.others}.get(collection, 0) - self.replica_lag
        return SearchResult(self.hits[:top_k], version=version)

    async def generate(self, messages, params, timeout=None) -> Completion:
        self.prompts.append(list(messages))
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse:
            raise StageError("generate", "RESOURCE_EXHAUSTED", "queue full")
        self.generated += 1
        return Completion(self.reply, "stop", Usage(9, 4))

    async def stream(self, messages, params, timeout=None):
        self.generated += 1
        for piece in self.reply.split(" "):
            yield CompletionChunk(piece + " ")
        yield CompletionChunk("", "stop", Usage(9, 2))

    async def list_collections(self, with_counts=False, timeout=None):
        versions = {"kb": self.version, **self.others}
        return [CollectionSummary(name, 3, version) for name, version in versions.items()]

    async def info(self, timeout=None):
        return type("Info", (), {"model": self.model})()


async def service(stages: Stages, prompt: PromptPolicy | None = None, **admission) -> ChatService:
    pipeline = ChatPipeline(stages, stages, stages, collection="kb", timeout_s=5, prompt=prompt,
                            answering=AnswerPolicy(answerer="auto"))  # fmt: skip
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
    names = [e for e, _ in events]
    assert names[0] == "sources" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    assert events[-1][1]["finish_reason"] == "stop" and events[-1][1]["cached"] is False
    assert events[-1][1]["grounded"] is True and events[-1][1]["citations"] == [{"id": "hb.md#0"}]
    hit = await chat.answer(query())
    assert hit.source == "hit" and hit.body["answer"] == "30 days [hb.md#0]"
    assert hit.body["grounded"] is True and hit.body["sources"][0]["id"] == "hb.md#0"
    replay = await chat.stream(query())
    replayed = [e async for e in replay.events]
    assert replay.source == "hit" and replayed[1] == ("token", "30 days [hb.md#0]")
    assert replayed[-1][1]["citations"] == [{"id": "hb.md#0"}]
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


async def test_an_ungrounded_answer_is_replaced_by_quoted_sentences_and_marked() -> None:
    stages = Stages()
    stages.reply = "You have 45 days, ask Northwind Rentals [hb.md#0]"
    chat = await service(stages)
    body = (await chat.answer(query(cache=CacheControl(False, False)))).body
    assert body["grounded"] is False and body["extractive"] is True
    assert body["generated"] == stages.reply
    assert body["answer"] == '"Submit every claim within 30 days." [hb.md#0]'
    assert body["citations"] == [{"id": "hb.md#0", "quote": "Submit every claim within 30 days."}]
    assert [s["id"] for s in body["sources"]] == ["hb.md#0", "hb.md#1"], "what the prompt held"
    streamed = await chat.stream(query("again", cache=CacheControl(False, False)))
    events = [e async for e in streamed.events]
    replace = [d for e, d in events if e == "replace"]
    assert replace and replace[0]["answer"] == body["answer"] and replace[0]["extractive"]
    plain = await chat.answer(query("plain", cache=CacheControl(False, False), answerer="generate"))
    assert plain.body["grounded"] is False and plain.body["answer"] == stages.reply.strip()


async def test_nothing_relevant_or_a_refusal_is_the_not_found_answer_with_the_closest() -> None:
    from services.api.grounding import NOT_FOUND

    stages = Stages()
    chat = await service(stages)
    q = query(cache=CacheControl(False, False), score_threshold=0.95)
    body = (await chat.answer(q)).body
    assert body["not_found"] is True and body["answer"] == NOT_FOUND and body["sources"] == []
    assert [c["id"] for c in body["closest"]] == ["hb.md#0", "hb.md#1"]
    assert body["finish_reason"] == "not_found" and stages.generated == 0, "no LLM call"
    stages.reply = "The sources do not mention a gym membership."
    body = (await chat.answer(query("gym?", cache=CacheControl(False, False)))).body
    assert body["not_found"] is True and body["answer"] == NOT_FOUND
    extract = (await chat.answer(query("x", cache=CacheControl(False, False),
                                       answerer="extractive"))).body  # fmt: skip
    assert extract["extractive"] and extract["grounded"] is None and extract["usage"] == {
        "prompt_tokens": 0, "completion_tokens": 0, "cached_prompt_tokens": 0}  # fmt: skip
    with pytest.raises(Exception, match="answerer must be one of"):
        await chat.answer(query("y", answerer="rerank"))


def test_grounding_check_finds_numbers_and_names_the_passages_do_not_hold() -> None:
    from services.api.grounding import citations, is_refusal, stated_facts, unsupported

    passage = "Submit every expense claim within 30 days. Approval by Maria Lopez, EUR 1,200."
    assert unsupported("Claims take 30 days [a#0].", [passage]) == []
    assert unsupported("Within 30 days; Maria Lopez approves EUR 1,200.", [passage]) == []
    assert unsupported("You get 45 days from Northwind.", [passage]) == ["45", "Northwind"]
    assert stated_facts("Yes. The limit is 5 [a#1].") == ["5"], "citation ids are not facts"
    hits = [Hit("a#0", 1, "x"), Hit("b#1", 1, "y")]
    cited = citations('"30 days" [a#0]; also [b#1, a#0] and [zz#9]', hits)
    assert [(c.id, c.quote) for c in cited] == [("a#0", "30 days"), ("b#1", "")]
    assert is_refusal("The documents do not say.") and not is_refusal("It is 30 days.")


def test_an_answer_that_says_nothing_the_passages_say_is_unsupported() -> None:
    from services.api.extractive import sentences
    from services.api.grounding import unsupported

    passage = "Submit every expense claim within 30 days."
    assert unsupported("The answer to this question is:", [passage]) != []
    assert unsupported("", [passage]) == ["(empty answer)"]
    assert unsupported("Submit it within 30 days.", [passage]) == []
    hit = Hit("a#0", 1.0, "Claims\nSubmit within 30 days of the receipt. - Attach a photo of it.")
    # the heading line is too short to quote; a list item after a sentence is its own sentence
    assert [s.text for s in sentences([hit])] == [
        "Submit within 30 days of the receipt.",
        "Attach a photo of it.",
    ]


async def test_collection_and_filter_reach_retrieve_and_key_the_cache() -> None:
    stages = Stages()
    chat = await service(stages)
    hr = query(collection="hr", where={"source": ["leave.md", "pay.md"]})
    assert (await chat.answer(hr)).source == "miss"
    assert stages.searched[-1] == ("hr", {"source": ["leave.md", "pay.md"]})
    same = query(collection="hr", where={"source": ["pay.md", "leave.md"]})  # any order
    assert (await chat.answer(same)).source == "hit"
    for other in (query(), query(collection="hr"), query(collection="hr", where={"x": "y"})):
        assert (await chat.answer(other)).source == "miss", other
    assert stages.searched[-3][0] == "kb", "no collection: the server's"
    stages.others["hr"] = 8  # a write to hr
    await chat.kb_version.refresh()
    assert (await chat.answer(hr)).source == "miss", "hr's write invalidates hr's answers"
    assert (await chat.answer(query())).source == "hit", "...and not kb's"
    ghost = query(collection="ghost")  # not (yet) a collection: its version is unknown
    await chat.answer(ghost)
    assert (await chat.answer(ghost)).source == "miss", "unknown version: nothing cached"


def test_history_keeps_the_newest_whole_messages_within_both_bounds() -> None:
    limits = ChatLimits(max_history_messages=3, history_tokens=30)
    turns = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " + "x" * 37}
        for i in range(6)
    ]  # fmt: skip  (10 estimated tokens each)
    kept, dropped = limits.history(turns)
    assert [m["content"][:2] for m in kept] == ["m3", "m4", "m5"] and dropped == 3
    kept, dropped = ChatLimits(history_tokens=25).history(turns)
    assert [m["content"][:2] for m in kept] == ["m4", "m5"] and dropped == 4
    huge = [*turns[:2], {"role": "user", "content": "y" * 4000}]
    kept, dropped = limits.history(huge)
    assert kept == [] and dropped == 3, "a newest message over budget is dropped, never cut"
    assert ChatLimits(max_history_messages=0).history(turns) == ([], 6)
    assert limits.history([]) == ([], 0)


async def test_truncated_history_is_said_and_only_the_kept_turns_reach_the_prompt() -> None:
    stages = Stages()
    chat = await service(stages)
    limits = ChatLimits(max_history_messages=2)
    turns = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "second"},
             {"role": "user", "content": "third"}]  # fmt: skip
    kept, dropped = limits.history(turns)
    answer = await chat.answer(query(history=kept, history_dropped=dropped))
    assert answer.body["history_truncated"] is True
    contents = [m["content"] for m in stages.prompts[-1]]
    assert "first" not in contents and contents[-3:] == ["second", "third", "How many days?"]
    again = await chat.answer(query(history=kept))  # the same kept turns, nothing dropped
    assert again.source == "hit" and again.body["history_truncated"] is False
    assert "history_truncated" not in (await chat.answer(query())).body, "no history, no field"
    streamed = await chat.stream(query(history=kept, history_dropped=1))
    done = [d for e, d in [x async for x in streamed.events] if e == "done"][0]
    assert done["history_truncated"] is True


class TopicStages(Stages):
    """Searches score by topic: a text that mentions leave finds the leave page well."""

    async def embed_query(self, query: str, timeout=None) -> np.ndarray:
        return (await self.embed([query], None)).vectors[0]

    async def embed(self, texts, kind, truncate=True, timeout=None) -> Embeddings:
        self.embedded = [*getattr(self, "embedded", []), list(texts)]
        rows = [[0.9 if "leave" in t else 0.2, 0.1 if "pension" in t else 0.0] for t in texts]
        return Embeddings(np.array(rows, dtype=np.float32))

    async def search(self, collection, vector, top_k, timeout=None, **kw) -> SearchResult:
        self.searched.append((collection, kw.get("text")))
        if vector[1] > 0:  # about pensions
            return SearchResult([Hit("pension.md#0", 0.8, "Pension\nWe pay 8 percent.")],
                                version=self.version)  # fmt: skip
        return SearchResult([Hit("leave.md#0", float(vector[0]), "Leave\nCarry over 5 days.")],
                            version=self.version)  # fmt: skip


def test_a_follow_up_is_searched_with_the_user_turns_before_it() -> None:
    from services.api.pipeline import followup_search_text

    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]  # fmt: skip
    assert followup_search_text("And then?", turns) == "c\nd\nAnd then?", "the last two, in order"
    assert followup_search_text("q", [{"role": "assistant", "content": "x"}]) == "q"


async def test_a_follow_up_keeps_the_better_of_its_own_and_the_condensed_search() -> None:
    stages = TopicStages()
    chat = await service(stages)
    history = [{"role": "user", "content": "How much annual leave do I get?"},
               {"role": "assistant", "content": "27 days."}]  # fmt: skip
    follow = await chat.answer(query("And how many can I carry over?", history=history))
    assert (
        follow.body["search_query"]
        == "How much annual leave do I get?\nAnd how many can I carry over?"
        and follow.body["sources"][0]["id"] == "leave.md#0"
    )
    # the question's vector came from the semantic cache's lookup; the condensed text's next
    assert stages.embedded[:2] == [
        ["And how many can I carry over?"],
        [follow.body["search_query"]],
    ]
    assert len(stages.searched) == 2, "two searches"
    switch = await chat.answer(query("And the pension contribution?", history=history))
    assert switch.body["search_query"] == "And the pension contribution?", "its own search won"
    assert switch.body["sources"][0]["id"] == "pension.md#0"
    off = await chat.answer(query("And how many can I carry over?", history=history,
                                  condense="off"))  # fmt: skip
    assert "search_query" not in off.body and off.source == "miss", "condense keys the cache"
    assert stages.searched[-1][1] == "And how many can I carry over?"
    assert "search_query" not in (await chat.answer(query())).body, "no history, no condensing"
    streamed = await chat.stream(query("And how many can I carry over?", history=history))
    done = [d for e, d in [x async for x in streamed.events] if e == "done"][0]
    assert done["search_query"].endswith("carry over?")
    with pytest.raises(Exception, match="condense must be one of"):
        AnswerPolicy(condense="llm")


async def test_an_answer_from_an_index_behind_the_key_version_is_not_cached() -> None:
    """A read-only replica that has not caught up with a write answers from the old index:
    that answer must not be cached under the new version (it would be served until the TTL)."""
    stages = Stages()
    chat = await service(stages)
    stages.version, stages.replica_lag = 2, 1  # the writer is at 2, the replica still at 1
    await chat.kb_version.refresh()
    assert (await chat.answer(query())).source == "miss"
    assert (await chat.answer(query())).source == "miss", "the stale answer was not stored"
    streamed = await chat.stream(query())
    events = [x async for x in streamed.events]
    assert all("index_version" not in d for e, d in events if e == "done"), "internal only"
    assert (await chat.answer(query())).source == "miss", "nor the streamed one"
    stages.replica_lag = 0  # caught up
    assert (await chat.answer(query())).source == "miss"
    assert (await chat.answer(query())).source == "hit"


async def test_the_extractive_answerer_embeds_each_new_sentence_once() -> None:
    # Splitting into what the stage takes per call is the embed client's job
    # (test_embed_service: test_stage_client_splits_what_the_stage_takes_in_one_call).
    from services.api.extractive import ExtractiveAnswerer

    calls: list[int] = []

    class Counting(Stages):
        async def embed(self, texts, kind, truncate=True, timeout=None) -> Embeddings:
            calls.append(len(texts))
            return await super().embed(texts, kind, truncate, timeout)

    text = "Leave\n" + " ".join(f"Rule {i} says claim {i} days." for i in range(80))
    answerer = ExtractiveAnswerer(Counting())
    found = await answerer.answer(np.array([1.0, 2.0, 0.0]), [Hit("a#0", 0.9, text)])
    again = await answerer.answer(np.array([1.0, 2.0, 0.0]), [Hit("a#0", 0.9, text)])
    assert len(calls) == 1 and calls[0] >= 80, "sentences seen before are not embedded again"
    assert again is not None and again.quotes == found.quotes
    assert found is not None and found.quotes
