"""The replicated-monolith baseline answers /chat like ragline, alone and behind nginx.

Processes on loopback with the default models: one monolith instance, a ragline pipeline
(embed, retrieve, generate, edge) over the same three documents, and a two-instance
`MonolithCluster` behind Debian's nginx (skipped only when nginx is not installed).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loadtest.chatstream import SseParser
from loadtest.httpload import Plan, run_plan
from loadtest.monolith import MonolithCluster
from tests.conftest import REPO_ROOT, Pipeline, free_port
from tests.integration.test_edge import DOCS  # the same three pages the edge tests use

pytestmark = pytest.mark.slow

QUESTIONS = {
    "How long do I have to submit an expense claim?": "expenses.md",
    "How long must my password be?": "security.md",
    "When is the kitchen cleaned?": "kitchen.md",
}
KEYS = {"answer", "sources", "timings_ms", "usage", "finish_reason", "cached", "citations",
        "grounded", "extractive", "not_found", "generated", "closest"}  # fmt: skip
MAX_TOKENS = 16
HAS_NGINX = bool(shutil.which("nginx") or Path("/usr/sbin/nginx").exists())


def ask(url: str, query: str, **extra: object) -> httpx.Response:
    body = {"query": query, "max_tokens": MAX_TOKENS, **extra}
    return httpx.post(f"{url}/chat", json=body, timeout=120, trust_env=False)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"monolith exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"monolith not healthy in {timeout_s}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("monolith-corpus")
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def env(base_env, tmp_path_factory) -> dict[str, str]:
    return {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("monolith-data"))}


@pytest.fixture(scope="module")
def instance(corpus, env, tmp_path_factory) -> Iterator[str]:
    """One instance started as the sweep's users would: `python -m loadtest.monolith`."""
    log = tmp_path_factory.mktemp("monolith-log") / "monolith.log"
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.monolith", "--port", str(port), "--corpus", str(corpus)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--threads", "1"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def ragline(env, tmp_path_factory) -> Iterator[str]:
    """A ragline pipeline (one process per stage) with the same documents under the same ids."""
    # dense retrieval, as the monolith does (the write-up's stack has no BM25)
    pipeline = Pipeline(env, tmp_path_factory.mktemp("ragline-logs"), "--search-mode", "dense")
    try:
        pipeline.ingest(DOCS)
        yield pipeline.url
    finally:
        pipeline.stop()


def test_one_instance_answers_chat_from_its_corpus(instance) -> None:
    assert httpx.get(f"{instance}/healthz", trust_env=False).json()["passages"] == len(DOCS)
    before = httpx.get(f"{instance}/stats", trust_env=False).json()["served"]
    for question, document in QUESTIONS.items():
        r = ask(instance, question)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == KEYS and body["cached"] is False
        assert body["answer"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= MAX_TOKENS
        assert body["finish_reason"] in {"stop", "length", "not_found"}
        assert {"embed", "retrieve", "generate", "total"} <= set(body["timings_ms"])
        top = body["sources"][0]
        assert top["id"] == f"{document}#0", [s["id"] for s in body["sources"]]
        assert top["metadata"]["source"] == document and top["metadata"]["title"]
        assert {s["id"].split("#")[0] for s in body["sources"]} <= set(DOCS)
        scores = [s["score"] for s in body["sources"]]
        assert scores == sorted(scores, reverse=True)
    assert len(ask(instance, "Where are passwords stored?", top_k=2).json()["sources"]) == 2
    after = httpx.get(f"{instance}/stats", trust_env=False).json()["served"]
    assert after - before == len(QUESTIONS) + 1

    # The model runs off the event loop: /stats sees the chat in flight (a blocked loop would
    # answer only after it), and health answers at once meanwhile.
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, instance, "Summarise the kitchen rules.", max_tokens=160)
        deadline = time.monotonic() + 30
        while httpx.get(f"{instance}/stats", trust_env=False).json()["in_flight"] == 0:
            assert time.monotonic() < deadline and not pending.done(), "chat never in flight"
            time.sleep(0.01)
        assert httpx.get(f"{instance}/healthz", timeout=5, trust_env=False).status_code == 200
        assert not pending.done(), "health answered while the chat was still generating"
        assert pending.result().status_code == 200

    # Refusals in ragline's shape and status.
    for body, expected in [
        ({"query": "   "}, "query: query is empty"),
        ({"question": "x"}, "query: Field required"),
        ({"query": "x", "top_k": 0}, "top_k must be between 1 and 20"),
        ({"query": "x" * 5000}, "the limit is 4000"),
        ({"query": "x", "max_tokens": 0}, "max_tokens"),
        ({"query": "x", "answerer": "oracle"}, "answerer"),
    ]:
        r = httpx.post(f"{instance}/chat", json=body, timeout=30, trust_env=False)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_argument"
        assert expected in r.json()["error"]["message"]

    # The request's answerer is honoured, as the edge honours it.
    question = "How long do I have to submit an expense claim?"
    quoted = ask(instance, question, answerer="extractive").json()
    assert quoted["usage"]["completion_tokens"] == 0, "no LLM ran"
    assert quoted["extractive"] or quoted["not_found"]
    generated = ask(instance, question, answerer="generate").json()
    assert generated["extractive"] is False and generated["usage"]["completion_tokens"] > 0
    assert generated["usage"]["cached_prompt_tokens"] >= 0


def test_monolith_baseline_answers_chat_like_ragline(instance, ragline) -> None:
    same_answers = 0
    for question in QUESTIONS:
        ours, theirs = ask(ragline, question), ask(instance, question)
        assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
        a, b = ours.json(), theirs.json()
        assert set(a) == set(b) == KEYS
        assert set(a["timings_ms"]) - {"extract"} == set(b["timings_ms"]) - {"extract"}
        assert set(a["usage"]) == set(b["usage"])
        # Same model, chunking, ids and exact search: the same passages in the same order.
        assert [s["id"] for s in b["sources"]] == [s["id"] for s in a["sources"]]
        for mine, yours in zip(b["sources"], a["sources"], strict=True):
            assert mine["metadata"] == yours["metadata"] and mine["text"] == yours["text"]
            assert mine["score"] == pytest.approx(yours["score"], abs=1e-4)
        # Same prompt assembly, chat template and tokenisation: the same prompt, token for token.
        assert b["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"]
        same_answers += a["answer"] == b["answer"]
    # Greedy decoding of the same tokens by the same weights gives the same answer; llama.cpp
    # splits the prompts into different batches in the two, so a near-tie could flip one.
    assert same_answers >= len(QUESTIONS) - 1


def stream_events(url: str, query: str, **extra: object) -> list[tuple[str, dict]]:
    """The /chat stream's events, parsed as the load test parses them."""
    body = {"query": query, "max_tokens": MAX_TOKENS, "stream": True, **extra}
    parser, events = SseParser(), []
    with httpx.stream("POST", f"{url}/chat", json=body, timeout=120, trust_env=False) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if event := parser.feed(line):
                events.append((event[0], json.loads(event[1])))
    return events


def streamed_answer(events: list[tuple[str, dict]]) -> str:
    replaced = [d for name, d in events if name == "replace"]
    if replaced:
        return replaced[-1]["answer"]
    return "".join(d["text"] for name, d in events if name == "token").strip()


def test_monolith_streams_the_edges_events(instance, ragline) -> None:
    same = 0
    for question in QUESTIONS:
        events = stream_events(instance, question, answerer="generate")
        names = [name for name, _ in events]
        assert names[0] == "sources" and names[-1] == "done", names
        assert names.count("token") >= 2 and set(names) <= {"sources", "token", "replace", "done"}
        done = events[-1][1]
        assert done["cached"] is False and done["finish_reason"] in {"stop", "length"}
        assert 0 < done["usage"]["completion_tokens"] <= MAX_TOKENS
        assert done["usage"]["prompt_tokens"] > done["usage"]["cached_prompt_tokens"] >= 0
        assert {"embed", "retrieve", "generate", "total"} <= set(done["timings_ms"])
        # The edge's stream, for the same question: the same events and done fields.
        theirs = stream_events(ragline, question, answerer="generate")
        assert {n for n, _ in theirs} <= {"sources", "token", "replace", "done"}
        assert set(theirs[-1][1]) == set(done) and set(theirs[-1][1]["usage"]) == set(done["usage"])
        assert [s["id"] for s in theirs[0][1]] == [s["id"] for s in events[0][1]]
        whole = ask(instance, question, answerer="generate").json()
        same += streamed_answer(events) == whole["answer"]
    # Streamed and whole, the same greedy tokens (one near-tie may flip, as above).
    assert same >= len(QUESTIONS) - 1
    # Every prompt starts with the system prompt, which llama.cpp kept from the previous
    # request: usage says how much of the prompt it did not evaluate again.
    events = stream_events(instance, list(QUESTIONS)[0], answerer="generate")
    assert events[-1][1]["usage"]["cached_prompt_tokens"] > 0


@pytest.mark.skipif(not HAS_NGINX, reason="Debian's nginx is not installed (make nginx)")
def test_cluster_behind_nginx_spreads_requests_and_routes_around_a_dead_instance(
    corpus, env
) -> None:
    with MonolithCluster(instances=2, corpus=corpus, threads=1, env=env) as cluster:
        conf = (cluster.dir / "nginx.conf").read_text()
        assert "least_conn;" in conf and conf.count("max_fails=3 fail_timeout=30s") == 2

        # Two at a time: least_conn sends the second to the idle instance.
        questions = list(QUESTIONS) * 2
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda q: ask(cluster.url, q), questions))
        assert [r.status_code for r in replies] == [200] * len(questions)
        assert all(r.json()["sources"][0]["id"].startswith(QUESTIONS[q]) for q, r in
                   zip(questions, replies, strict=True))  # fmt: skip
        served = cluster.served()
        assert all(n and n > 0 for n in served) and sum(served) == len(questions), served

        # An instance crashes: nginx sends the next requests to the other one.
        cluster.kill_instance(0)
        for question in QUESTIONS:
            r = ask(cluster.url, question)
            assert r.status_code == 200, r.text
        after = cluster.served()
        assert after[0] is None and after[1] == served[1] + len(QUESTIONS), (served, after)

        r = httpx.post(f"{cluster.url}/chat", json={"query": " "}, timeout=30, trust_env=False)
        assert r.status_code == 400 and "query is empty" in r.json()["error"]["message"]

        # Streamed through nginx, the tokens come as they are made, not all at the end.
        body = {"query": "{question}", "answerer": "generate", "max_tokens": 16}
        plan = Plan(url=cluster.url, questions=list(QUESTIONS), requests=2, stream=True, body=body)
        samples, _ = asyncio.run(run_plan(plan))
        assert [s.outcome for s in samples] == ["ok", "ok"], [s.error for s in samples]
        for s in samples:
            assert s.completion_tokens > 1 and len(s.itl_ms) >= 1
            assert sum(s.itl_ms) > 100, "nginx held the events back (X-Accel-Buffering)"
        directory, pids = cluster.dir, [p.proc for p in cluster.procs + [cluster.proxy]]
    assert not directory.exists(), "the temporary directory goes with the cluster"
    assert all(p.poll() is not None for p in pids), "every process stopped"


@pytest.mark.skipif(not HAS_NGINX, reason="Debian's nginx is not installed (make nginx)")
def test_cluster_start_fails_with_the_instance_log_when_an_instance_dies(tmp_path, env) -> None:
    (tmp_path / "empty.md").write_text("  \n")
    cluster = MonolithCluster(instances=1, corpus=tmp_path, env=env, startup_timeout_s=60)
    with pytest.raises(RuntimeError, match=r"(?s)exited with status.*no documents with text"):
        cluster.start()
    assert cluster.procs == [] and cluster.dir is None, "a failed start cleans up"
