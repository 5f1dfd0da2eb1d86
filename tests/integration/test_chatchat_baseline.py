"""The Langchain-Chatchat baseline answers a handbook question with its sources.

One Chatchat 0.3 instance in the shared layout (one llama.cpp server), ragline's embeddings
endpoint, the handbook ingested by Chatchat's own CLI, nginx in front: what
``loadtest sweep --compare-chatchat`` starts. Skipped unless ``.venv-chatchat`` exists
(``make chatchat``), so ``make test`` never needs Chatchat; skipped without nginx too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest.chatchat import VENV, ChatchatCluster, KbChatTransport, kb_chat_plan, read_kb_chat
from loadtest.httpload import Plan, run_plan

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (VENV / "bin" / "chatchat").exists(),
        reason=f"no Chatchat venv at {VENV} (make chatchat)",
    ),
    pytest.mark.skipif(
        not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
        reason="nginx is not installed (make nginx)",
    ),
]

QUESTION = "How many days do I have to submit an expense claim?"
SOURCE = "expenses-and-reimbursement.md"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def cluster() -> Iterator[ChatchatCluster]:
    with ChatchatCluster(instances=1, layout="shared") as c:
        yield c


def one_request(cluster: ChatchatCluster, **body: object) -> Plan:
    fields = kb_chat_plan(max_tokens=MAX_TOKENS)
    fields["body"] = {**fields["body"], **body}
    return replace(Plan(url=cluster.url, questions=[QUESTION], requests=1, concurrency=1,
                        duration_s=120, timeout_s=120), **fields)  # fmt: skip


def test_kb_chat_answers_with_the_handbook_page_it_retrieved(cluster: ChatchatCluster) -> None:
    reply = cluster.ask(QUESTION, max_tokens=MAX_TOKENS)
    assert reply.error == ""
    assert reply.answer.strip()
    # top_k 3 of the handbook's chunks, each cited as "出处 [n] [file](link)"; the page that
    # holds the answer ranks among them (Chatchat's FAISS over ragline's embeddings)
    assert len(reply.docs) == 3
    assert any(SOURCE in doc and "30 days" in doc for doc in reply.docs), reply.docs
    assert reply.chunks > 1  # streamed: the sources event, then the answer's pieces


async def test_the_load_tool_times_a_kb_chat_stream(cluster: ChatchatCluster) -> None:
    (s,), _ = await run_plan(one_request(cluster), transport=KbChatTransport())
    assert (s.outcome, s.error) == ("ok", "")
    assert s.ttft_ms is not None and 0 < s.ttft_ms <= s.latency_ms
    # the answer's pieces, one llama.cpp token each: the plan's max_tokens caps them
    assert 1 <= s.completion_tokens <= MAX_TOKENS
    assert len(s.itl_ms) == s.completion_tokens - 1


async def test_failures_answered_as_200_count_as_errors(cluster: ChatchatCluster) -> None:
    # An unknown knowledge base: Chatchat answers {"code": 404, ...} with HTTP 200.
    (s,), _ = await run_plan(
        one_request(cluster, kb_name="no-such-kb"), transport=KbChatTransport()
    )
    assert s.outcome == "error" and s.error.startswith("404"), s
    assert cluster.ask(QUESTION, kb_name="no-such-kb").error.startswith("404")
    # A stream that failed after its headers carries kb_chat's {"error": ...} event; not
    # streamed, the same failure is a JSON string inside "data".
    assert read_kb_chat('data: {"error": "Connection refused"}\n\n').error == "Connection refused"
    assert read_kb_chat('{"data": "{\\"error\\": \\"boom\\"}"}').error == "boom"
