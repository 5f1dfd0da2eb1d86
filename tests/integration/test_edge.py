"""The edge against real stage processes: replicas, shedding, cache, SSE, OpenAI clients.

Topology: one embed, two retrieve replicas (a writer and a read-only follower of its
database), one generate, and edges in front of them, all separate processes on loopback with
the default models. The stages' request counters (``ragline_grpc_server_handled_total`` on
their ``--metrics-port``) show which stages a request touched.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest

from ragline.clients import wait_for_serving
from tests.conftest import ServiceProcess, free_port

pytestmark = pytest.mark.slow

DOCS = {
    "expenses.md": (
        "# Expenses\n\nSubmit every expense claim in Spendwise within 30 days of the purchase. "
        "Claims need a photo of the receipt. Your manager approves claims within 5 working days."
    ),
    "security.md": (
        "# Passwords\n\nPasswords must be at least 14 characters long and are stored in "
        "Vaultkeeper. Turn on two-factor authentication for email and never reuse a password."
    ),
    "kitchen.md": (
        "# Kitchen\n\nThe office kitchen is cleaned every Friday afternoon. Label your food in "
        "the fridge with your name; unlabelled food is thrown away on Fridays."
    ),
}
STAGE_METHODS = {
    "embed": ("/ragline.v1.Embed/Embed",),
    "retrieve": ("/ragline.v1.Retrieve/Search",),
    "generate": ("/ragline.v1.Generate/Generate", "/ragline.v1.Generate/GenerateStream"),
}


class Stages:
    def __init__(self, procs: dict[str, ServiceProcess], ports: dict[str, int]) -> None:
        self.procs = procs
        self.ports = ports

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def metrics(self, name: str) -> str:
        return httpx.get(f"http://127.0.0.1:{self.ports[name + '-metrics']}/", timeout=5).text

    def handled(self, stage: str, code: str | None = None, only: str | None = None) -> float:
        """RPCs the stage's replicas (or the one named) completed for its data-path methods."""
        total = 0.0
        names = ("retrieve-w", "retrieve-r") if stage == "retrieve" else (stage,)
        names = (only,) if only else names
        for name in names:
            if self.procs[name].proc.poll() is not None:
                continue
            for line in self.metrics(name).splitlines():
                m = re.match(r"ragline_grpc_server_handled_total\{(.*)\} (\S+)", line)
                if not m:
                    continue
                labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
                if labels["method"] in STAGE_METHODS[stage] and code in (None, labels["code"]):
                    total += float(m.group(2))
        return total

    def gauge(self, name: str, metric: str) -> float:
        for line in self.metrics(name).splitlines():
            if line.startswith(metric + " "):
                return float(line.split()[1])
        raise AssertionError(f"{metric} not exported by {name}")


def start_edge(stages: Stages, logs, env, name: str, *extra: str) -> tuple[str, ServiceProcess]:
    port = free_port()
    args = [
        "--port", str(port),
        "--embed-address", stages.addr("embed"),
        "--retrieve-address", f"{stages.addr('retrieve-w')},{stages.addr('retrieve-r')}",
        "--retrieve-write-address", stages.addr("retrieve-w"),
        "--generate-address", stages.addr("generate"),
        "--health-interval-s", "0.3",
        "--kb-poll-s", "0.2",
        "--max-tokens", "300",
        "--retrieve-timeout-s", "2",
        *extra,
    ]  # fmt: skip
    proc = ServiceProcess("api", args, logs, env, label=name)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return base, proc
        except httpx.HTTPError:
            pass
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stages(base_env, tmp_path_factory) -> Iterator[tuple[Stages, object, dict]]:
    logs = tmp_path_factory.mktemp("edge-logs")
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("edge-data"))}
    names = ("embed", "retrieve-w", "retrieve-r", "generate")
    ports = {n: free_port() for n in names} | {n + "-metrics": free_port() for n in names}
    procs: dict[str, ServiceProcess] = {}
    for name in names:
        args = ["--port", str(ports[name]), "--metrics-port", str(ports[name + "-metrics"])]
        if name == "retrieve-r":
            args += ["--read-only", "--refresh-s", "0.2"]
        if name == "generate":  # room for the 20 requests the kill test keeps in flight
            args += ["--max-queue", "32", "--max-queue-wait-s", "120"]
        procs[name] = ServiceProcess(name.split("-")[0], args, logs, env, label=name)
    stages = Stages(procs, ports)

    async def ready() -> None:
        await asyncio.gather(
            *(
                wait_for_serving(stages.addr(n), f"ragline.v1.{n.split('-')[0].title()}", 90)
                for n in names
            )
        )

    try:
        try:
            asyncio.run(ready())
        except TimeoutError:
            pytest.fail(
                "stages did not start:\n" + "\n".join(p.log()[-2000:] for p in procs.values())
            )
        yield stages, logs, env
    finally:
        for p in procs.values():
            p.stop()


def caught_up(st: Stages, collection: str = "default") -> None:
    """Waits until the read-only replica's index reflects the writer's last write: the edge
    caches no answer computed on an index behind the version it knows."""

    async def versions() -> tuple[int, int]:
        from ragline.clients import RetrieveClient

        writer = RetrieveClient(st.addr("retrieve-w"))
        reader = RetrieveClient(st.addr("retrieve-r"))
        try:
            w, r = await writer.stats(collection), await reader.stats(collection)
            return w.version, r.indexed_version
        finally:
            await writer.close()
            await reader.close()

    deadline = time.monotonic() + 30
    while (v := asyncio.run(versions()))[1] < v[0]:
        assert time.monotonic() < deadline, f"the replica stayed behind the writer: {v}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def edge(stages) -> Iterator[str]:
    st, logs, env = stages
    base, proc = start_edge(st, logs, env, "api-main")
    try:
        for name, text in DOCS.items():
            r = httpx.post(
                f"{base}/documents", json={"text": text, "document_id": name}, timeout=60
            )
            assert r.status_code == 200, r.text
        caught_up(st)
        yield base
    finally:
        proc.stop()


def chat(base: str, query: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/chat", json={"query": query, **body}, timeout=120)


def test_cache_hit_skips_every_stage_and_an_ingest_invalidates_it(stages, edge) -> None:
    st, _, _ = stages
    first = chat(edge, "How long do I have to submit an expense claim?", max_tokens=16)
    assert first.status_code == 200, first.text
    assert first.json()["cached"] is False and 'cache;desc="miss"' in first.headers["server-timing"]
    before = {s: st.handled(s) for s in STAGE_METHODS}

    again = chat(edge, "  how long do I have to submit an EXPENSE claim ", max_tokens=16)
    assert again.status_code == 200
    body = again.json()
    assert body["cached"] is True and body["answer"] == first.json()["answer"]
    assert again.headers["server-timing"] == 'cache;desc="hit"'
    assert again.headers["x-trace-id"]
    assert {s: st.handled(s) for s in STAGE_METHODS} == before, "a hit touched no stage"

    fresh = httpx.post(
        f"{edge}/chat",
        json={"query": "How long do I have to submit an expense claim?", "max_tokens": 16},
        headers={"Cache-Control": "no-cache"},
        timeout=120,
    )
    assert fresh.json()["cached"] is False, "no-cache skips the lookup (load tests send it)"
    assert st.handled("generate") == before["generate"] + 1
    before = {s: st.handled(s) for s in STAGE_METHODS}

    assert (
        chat(edge, "How long do I have to submit an expense claim?", max_tokens=17).json()["cached"]
        is False
    ), "different generation parameters are a different key"

    r = httpx.post(
        f"{edge}/documents",
        json={"text": "# Bikes\n\nBikes go in the basement rack.", "document_id": "bikes.md"},
        timeout=60,
    )
    assert r.json()["status"] == "ingested"
    after = chat(edge, "How long do I have to submit an expense claim?", max_tokens=16)
    assert after.json()["cached"] is False, "an ingest invalidated the cache"
    assert st.handled("generate") > before["generate"]


def test_an_answer_from_a_replica_behind_the_write_is_not_cached(stages, edge) -> None:
    """A read-only replica that has not caught up with a write answers from the old index; the
    edge knows the new version from the writer, and must not cache that answer under it."""
    st, logs, env = stages
    port = free_port()
    lagging = ServiceProcess("retrieve", ["--port", str(port), "--read-only",
                                          "--refresh-s", "3600"], logs, env,
                             label="retrieve-lagging")  # fmt: skip
    base = None
    try:
        asyncio.run(wait_for_serving(f"127.0.0.1:{port}", "ragline.v1.Retrieve", 90))
        base, proc = start_edge(st, logs, env, "api-lagging",
                                "--retrieve-address", f"127.0.0.1:{port}")  # fmt: skip
        question = "Where do bikes go?"
        assert chat(base, question, max_tokens=16).json()["cached"] is False
        assert chat(base, question, max_tokens=16).json()["cached"] is True, "caught up: cached"
        r = httpx.post(f"{base}/documents", json={"text": "# Scooters\n\nScooters go in the "
                       "yard.", "document_id": "scooters.md"}, timeout=60)  # fmt: skip
        assert r.json()["status"] == "ingested"  # through the writer; the replica stays behind
        stale = chat(base, question, max_tokens=16).json()
        assert stale["cached"] is False, "the write invalidated the cache"
        again = chat(base, question, max_tokens=16).json()
        assert again["cached"] is False, "an answer from the old index was not stored"
    finally:
        if base is not None:
            proc.stop()
        lagging.stop()


def test_semantic_cache_answers_a_paraphrase_with_one_embed_call(stages) -> None:
    st, logs, env = stages
    caught_up(st)  # an earlier test's write: answers from a replica behind it are not cached
    base, proc = start_edge(st, logs, env, "api-semantic", "--semantic-cache-threshold", "0.93")
    try:
        first = chat(base, "How long do I have to submit an expense claim?", max_tokens=16)
        assert first.status_code == 200 and first.json()["cached"] is False
        before = {s: st.handled(s) for s in STAGE_METHODS}
        para = chat(base, "How long have I got to submit my expense claim?", max_tokens=16)
        body = para.json()
        assert body["cached"] is True and body["cache"] == "semantic", body
        assert body["similarity"] >= 0.93 and body["answer"] == first.json()["answer"]
        assert para.headers["server-timing"] == 'cache;desc="semantic-hit"'
        after = {s: st.handled(s) for s in STAGE_METHODS}
        assert after["embed"] == before["embed"] + 1, "a semantic lookup costs one embed call"
        assert after["retrieve"] == before["retrieve"] and after["generate"] == before["generate"]

        other = chat(base, "When is the office kitchen cleaned?", max_tokens=16)
        assert other.json()["cached"] is False, "an unrelated question is a miss"
        assert st.handled("embed") == after["embed"] + 1, "the miss reused its query vector"
        streamed = httpx.post(
            f"{base}/chat",
            json={"query": "how long have i got to submit my expense claim", "stream": True,
                  "max_tokens": 15},
            timeout=120,
        )  # fmt: skip
        assert streamed.headers["server-timing"] == 'cache;desc="miss"', "max_tokens is scope"
    finally:
        proc.stop()


def sse_events(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    event = None
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield event, json.loads(line.removeprefix("data: "))


def test_sse_sends_sources_then_tokens_then_usage(edge) -> None:
    query = {"query": "Where are passwords stored?", "stream": True, "max_tokens": 24}
    with httpx.stream("POST", f"{edge}/chat", json=query, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    kinds = [e for e, _ in events]
    assert kinds[0] == "sources" and kinds[-1] == "done", kinds
    # tokens, then a "replace" only when the finished answer failed its grounding check
    tokens = kinds[1:-2] if kinds[-2] == "replace" else kinds[1:-1]
    assert set(tokens) == {"token"}, kinds
    assert events[0][1][0]["metadata"]["source"] == "security.md"
    done = events[-1][1]
    if kinds[-2] == "replace":
        assert events[-2][1]["answer"] and done["grounded"] is False
    assert done["usage"]["completion_tokens"] >= len(tokens) > 0
    assert {"embed", "retrieve", "generate"} <= set(done["timings_ms"])


def test_a_client_that_disconnects_cancels_generation_upstream(stages, edge) -> None:
    st, _, _ = stages
    cancelled = st.handled("generate", "CANCELLED")
    query = {
        "query": "Write a very long, detailed essay about every rule in the handbook.",
        "stream": True,
        "max_tokens": 300,
    }
    with httpx.stream("POST", f"{edge}/chat", json=query, timeout=120) as r:
        for event, _ in sse_events(r):
            if event == "token":
                break  # hang up after the first token
    deadline = time.monotonic() + 10
    while st.handled("generate", "CANCELLED") == cancelled:
        assert time.monotonic() < deadline, "generate never saw the cancellation"
        time.sleep(0.05)
    while st.gauge("generate", "ragline_generate_active") != 0:
        assert time.monotonic() < deadline, "the generation kept running"
        time.sleep(0.05)


def test_openai_client_streaming_and_not(edge) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{edge}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "When is the office kitchen cleaned?"}]
    done = client.chat.completions.create(model="ragline", messages=messages, max_tokens=20)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content.strip()
    assert done.choices[0].finish_reason in {"stop", "length"}
    assert done.usage.completion_tokens > 0

    stream = client.chat.completions.create(
        model="ragline",
        messages=[{"role": "user", "content": "How long must a password be?"}],
        max_tokens=20,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason is not None

    models = httpx.get(f"{edge}/v1/models", timeout=10)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == "ragline"


def test_overload_is_refused_with_429_and_retry_after_never_5xx(stages, edge) -> None:
    st, logs, env = stages
    base, proc = start_edge(
        st, logs, env, "api-tight", "--max-inflight", "1", "--max-waiting", "0",
        "--cache-ttl-s", "0",
    )  # fmt: skip

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{base}/chat", json={"query": f"Question {i}?", "max_tokens": 8})
                    for i in range(8)
                )
            )

    try:
        t0 = time.monotonic()
        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["retry-after"].isdigit()
                assert r.json()["error"]["code"] == "resource_exhausted"
        assert time.monotonic() - t0 < 60, "shedding answered at once, not after a timeout"
        scraped = httpx.get(f"{base}/metrics", timeout=5)  # no redirect to /metrics/
        assert scraped.status_code == 200 and "ragline_api_shed_total" in scraped.text
        assert httpx.get(f"{base}/metrics/", timeout=5).status_code == 200
    finally:
        proc.stop()


def test_answer_cache_shared_through_redis_across_edges(stages, edge, tmp_path) -> None:
    st, logs, env = stages
    caught_up(st)
    port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir",
         str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    edges = []
    try:
        for name in ("api-redis-a", "api-redis-b"):
            edges.append(start_edge(st, logs, env, name, "--redis-url", url))
        (a, _), (b, _) = edges
        q = "Who approves expense claims?"
        first = chat(a, q, max_tokens=12)
        assert first.json()["cached"] is False
        generated = st.handled("generate")
        hit = chat(b, q, max_tokens=12)
        assert hit.json()["cached"] is True, "edge b answered from edge a's entry in Redis"
        assert hit.json()["answer"] == first.json()["answer"]
        assert st.handled("generate") == generated
    finally:
        for _, proc in edges:
            proc.stop()
        redis.send_signal(signal.SIGTERM)
        redis.wait(timeout=10)


def test_a_hung_retrieve_replica_does_not_fail_chat_and_returns_after(stages, edge) -> None:
    st, _, _ = stages
    reader = st.procs["retrieve-r"]
    reader.proc.send_signal(signal.SIGSTOP)  # hangs rather than dies: connections stay open
    try:
        for i in range(6):
            r = chat(edge, f"Hung replica {i}: when is the kitchen cleaned?", max_tokens=4)
            assert r.status_code == 200, r.text
        state = httpx.get(f"{edge}/readyz", timeout=5).json()["stages"]["retrieve"]
        assert state[st.addr("retrieve-r")] != "SERVING", "health checks noticed the hang"
    finally:
        reader.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while httpx.get(f"{edge}/readyz", timeout=5).json()["stages"]["retrieve"][
        st.addr("retrieve-r")
    ] != "SERVING":  # fmt: skip
        assert time.monotonic() < deadline, "the replica never came back"
        time.sleep(0.1)


def test_killing_one_retrieve_replica_under_steady_traffic_fails_no_chat(stages, edge) -> None:
    st, _, _ = stages
    reader = st.procs["retrieve-r"]
    served: list[float] = []

    def reader_searches() -> float:
        return st.handled("retrieve") - st.handled("retrieve", None, only="retrieve-w")

    peak = 0

    async def traffic() -> list[int]:
        codes: list[int] = []
        inflight = 0
        async with httpx.AsyncClient(timeout=120) as client:

            async def worker(w: int) -> None:
                nonlocal inflight, peak
                for i in range(3):
                    query = f"Question {w}-{i}: where do bikes go, and who cleans the kitchen?"
                    inflight += 1
                    peak = max(peak, inflight)
                    r = await client.post(f"{edge}/chat", json={"query": query, "max_tokens": 4})
                    inflight -= 1
                    codes.append(r.status_code)
                    if len(codes) == 10:
                        served.append(await asyncio.to_thread(reader_searches))
                        reader.proc.send_signal(signal.SIGKILL)  # mid-traffic

            await asyncio.gather(*(worker(w) for w in range(20)))
        return codes

    codes = asyncio.run(traffic())
    assert reader.proc.wait(timeout=10) == -signal.SIGKILL
    assert peak == 20, "twenty requests were in flight together"
    assert codes == [200] * 60, codes
    assert served[0] > 0, "the killed replica was taking traffic before it died"
    ready = httpx.get(f"{edge}/readyz", timeout=5).json()
    assert ready["status"] == "ok"
    assert ready["stages"]["retrieve"][st.addr("retrieve-r")] in {"NOT_SERVING", "EJECTED"}


NO_STORE = {"Cache-Control": "no-store"}


def test_an_unanswerable_question_gets_the_not_found_answer_with_the_closest(stages, edge) -> None:
    st, _, _ = stages
    generated = st.handled("generate")
    r = httpx.post(f"{edge}/chat", json={"query": "What is the capital of Mongolia?",
                   "score_threshold": 0.5}, headers=NO_STORE, timeout=120)  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["not_found"] is True, body
    assert body["answer"] == "I could not find this in the knowledge base."
    assert body["sources"] == [] and body["closest"], "the closest passages, none used"
    assert body["finish_reason"] == "not_found"
    assert st.handled("generate") == generated, "no LLM"


def test_sources_are_the_passages_used_and_citations_name_them(edge) -> None:
    q = "How long do I have to submit an expense claim?"
    r = httpx.post(f"{edge}/chat", json={"query": q, "score_threshold": 0.3,
                   "answerer": "extractive"}, headers=NO_STORE, timeout=120)  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["extractive"] is True and body["grounded"] is None
    assert body["sources"] and all(s["score"] >= 0.3 for s in body["sources"])
    assert body["sources"][0]["id"] == "expenses.md#0"
    assert "within 30 days" in body["answer"] and "[expenses.md#0]" in body["answer"]
    used = {s["id"]: s["text"] for s in body["sources"]}
    assert body["citations"] and {c["id"] for c in body["citations"]} <= set(used)
    assert all(c["quote"] in used[c["id"]] for c in body["citations"]), "quotes are verbatim"


def test_a_forced_ungrounded_answer_is_replaced_and_marked(edge) -> None:
    # The system message asks the LLM for facts the passages do not hold; whatever it writes
    # with answerer=generate is shown as it is, with grounded=false, and auto replaces it.
    body = {
        "messages": [
            {"role": "system", "content": "Always answer: call Zorblax on 555-0199."},
            {"role": "user", "content": "How long do I have to submit an expense claim?"},
        ],
        "max_tokens": 32,
    }
    r = httpx.post(f"{edge}/v1/chat/completions", json=body, headers=NO_STORE, timeout=120)
    checks = r.json()["ragline"]
    assert r.status_code == 200 and checks["extractive"] is True, checks
    assert checks["grounded"] is False and checks["generated"], "the LLM's text is kept apart"
    assert r.json()["choices"][0]["message"]["content"].startswith('"')
    assert checks["citations"][0]["id"] == "expenses.md#0"
    with httpx.stream("POST", f"{edge}/chat", json={"query": "Who is Zorblax? Answer with "
                      "his phone number.", "stream": True, "max_tokens": 24,
                      "answerer": "auto", "score_threshold": 0.0},
                      headers=NO_STORE, timeout=120) as s:  # fmt: skip
        events = list(sse_events(s))
    done = events[-1][1]
    if done["grounded"] is False:  # the stream's check ran after its tokens
        assert events[-2][0] == "replace" and events[-2][1]["answer"] != ""


def test_hybrid_and_sparse_retrieval_find_a_passage_by_an_exact_rare_term(edge) -> None:
    codes = {
        "badges.md": "# Badges\n\nIf the reader at the door shows QX-7731, your badge has "
        "expired: ask reception for a new one.",
        "printers.md": "# Printers\n\nThe printers on every floor print double-sided by "
        "default. Collect your pages within one hour.",
    }
    for name, text in codes.items():
        r = httpx.post(f"{edge}/documents", json={"text": text, "document_id": name}, timeout=60)
        assert r.status_code == 200, r.text
    question = "QX-7731?"
    for mode in ("sparse", "hybrid"):
        r = httpx.post(f"{edge}/chat", json={"query": question, "mode": mode, "top_k": 2,
                       "answerer": "extractive"}, headers=NO_STORE, timeout=120)  # fmt: skip
        body = r.json()
        assert r.status_code == 200, body
        assert body["sources"][0]["id"] == "badges.md#0", (mode, body["sources"])
        assert "QX-7731" in body["answer"]
    r = httpx.post(f"{edge}/chat", json={"query": question, "mode": "nearest"}, timeout=30)
    assert r.status_code == 400 and "mode" in r.json()["error"]["message"]
