"""All four services as separate processes on loopback, with the real default models."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from ragline.clients import wait_for_serving
from tests.conftest import ServiceProcess, free_port

pytestmark = pytest.mark.slow

DOCS = {
    "expenses.md": (
        "# Expenses\n\nSubmit every expense claim in Spendwise within 30 days of the purchase. "
        "Claims need a photo of the receipt. Your manager approves claims within 5 working days "
        "and payment follows with the next monthly salary."
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


@pytest.fixture(scope="module")
def stack(base_env, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    ports = {name: free_port() for name in ("embed", "retrieve", "generate", "api")}
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("e2e-data"))}
    procs = [
        ServiceProcess(name, ["--port", str(ports[name])], logs, env)
        for name in ("embed", "retrieve", "generate")
    ]
    procs.append(
        ServiceProcess(
            "api",
            [
                "--port",
                str(ports["api"]),
                "--embed-address",
                f"127.0.0.1:{ports['embed']}",
                "--retrieve-address",
                f"127.0.0.1:{ports['retrieve']}",
                "--generate-address",
                f"127.0.0.1:{ports['generate']}",
                "--max-tokens",
                "48",
                "--max-body-bytes",
                "200000",
            ],
            logs,
            env,
        )
    )

    async def ready() -> None:
        await asyncio.gather(
            wait_for_serving(f"127.0.0.1:{ports['embed']}", "ragline.v1.Embed", 60),
            wait_for_serving(f"127.0.0.1:{ports['retrieve']}", "ragline.v1.Retrieve", 60),
            wait_for_serving(f"127.0.0.1:{ports['generate']}", "ragline.v1.Generate", 60),
        )

    try:
        try:
            asyncio.run(ready())
        except TimeoutError:
            pytest.fail("stages did not start:\n" + "\n".join(p.log()[-2000:] for p in procs))
        base = f"http://127.0.0.1:{ports['api']}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, procs[-1].log()
            time.sleep(0.1)
        yield base, procs
    finally:
        for p in procs:
            p.stop()


def test_chat_before_any_ingest_says_what_to_do(stack) -> None:
    base, _ = stack
    r = httpx.post(f"{base}/chat", json={"query": "Anything?"}, timeout=60)
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["stage"] == "retrieve" and "does not exist" in err["message"]


def test_ingest_then_answer_from_the_right_document(stack) -> None:
    base, _ = stack
    for name, text in DOCS.items():
        r = httpx.post(f"{base}/documents", json={"text": text, "document_id": name}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json() == {"document_id": name, "status": "ingested", "chunks": 1}
    # unchanged documents are skipped, by content hash
    r = httpx.post(
        f"{base}/documents",
        json={"text": DOCS["expenses.md"], "document_id": "expenses.md"},
        timeout=60,
    )
    assert r.json()["status"] == "unchanged"

    r = httpx.post(
        f"{base}/chat",
        json={"query": "How many days do I have to submit an expense claim?"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sources"][0]["metadata"]["source"] == "expenses.md"
    assert body["sources"][0]["id"] == "expenses.md#0"
    assert body["sources"][0]["score"] > body["sources"][1]["score"]
    assert len(body["answer"].split()) >= 2, body["answer"]
    assert body["usage"]["completion_tokens"] > 0
    assert set(body["timings_ms"]) == {"embed", "retrieve", "generate", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["generate"] > 0


def test_upload_a_markdown_file(stack) -> None:
    base, _ = stack
    files = {
        "file": (
            "../../etc/parking.md",
            b"# Parking\n\nThe car park opens at 7:00.",
            "text/markdown",
        )
    }
    r = httpx.post(f"{base}/documents", files=files, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["document_id"] == "parking.md", "path components are stripped"
    r = httpx.post(
        f"{base}/documents", files={"file": ("x.pdf", b"not a pdf", "application/pdf")}, timeout=60
    )
    assert r.status_code == 400 and ".pdf" in r.json()["error"]["message"]


def test_streaming_sends_sources_tokens_then_done(stack) -> None:
    base, _ = stack
    events = []
    with httpx.stream(
        "POST",
        f"{base}/chat",
        json={"query": "How long must a password be?", "stream": True},
        timeout=120,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    kinds = [e for e, _ in events]
    assert kinds[0] == "sources" and kinds[-1] == "done"
    assert kinds.count("token") > 1
    assert events[0][1][0]["metadata"]["source"] == "security.md"
    assert events[-1][1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("payload", "status", "fragment"),
    [
        ({"query": ""}, 400, "query is empty"),
        ({"query": "   "}, 400, "query is empty"),
        ({"query": "x", "top_k": 0}, 400, "top_k must be between 1 and"),
        ({"query": "x", "top_k": 10**6}, 400, "top_k must be between 1 and"),
        ({"top_k": 3}, 400, "query"),
        ({"query": "x" * 5000}, 400, "limit is 4000"),
    ],
)
def test_bad_chat_input_is_a_clear_4xx(stack, payload, status, fragment) -> None:
    base, _ = stack
    r = httpx.post(f"{base}/chat", json=payload, timeout=30)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_oversized_body_and_malformed_json(stack) -> None:
    base, procs = stack
    r = httpx.post(f"{base}/documents", json={"text": "word " * 100_000}, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    r = httpx.post(
        f"{base}/documents",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # everything still serves after bad input
    assert httpx.get(f"{base}/readyz", timeout=5).json()["status"] == "ok"
    assert all(p.proc.poll() is None for p in procs)


@pytest.mark.parametrize(
    ("stage", "service"),
    [("embed", "ragline.v1.Embed"), ("retrieve", "ragline.v1.Retrieve"),
     ("generate", "ragline.v1.Generate")],
)  # fmt: skip
def test_every_stage_serves_health_and_reflection(stack, stage, service) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _, procs = stack
    proc = next(p for p in procs if p.name == stage)
    port = proc.proc.args[proc.proc.args.index("--port") + 1]

    async def list_services() -> list[str]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for resp in stub.ServerReflectionInfo(iter([request]), timeout=5):
                return [s.name for s in resp.list_services_response.service]
        return []

    names = asyncio.run(list_services())
    assert service in names and "grpc.health.v1.Health" in names
    asyncio.run(wait_for_serving(f"127.0.0.1:{port}", service, timeout=5))


def test_a_code_heavy_paragraph_is_chunked_to_fit_the_embedding_model(stack) -> None:
    from ragline.clients import EmbedClient, RetrieveClient
    from ragline.types import InputKind

    base, procs = stack
    # 150 words, but parameter names and paths cost several tokens a word: in words alone it
    # is one chunk, which the model would cut off after 256 tokens.
    lines = [f"smtpd_rule_{i}_restrictions = /etc/postfix/maps/table_{i}.cf" for i in range(50)]
    text = "# Postfix parameters\n\n" + "\n".join(lines)
    r = httpx.post(
        f"{base}/documents", json={"text": text, "document_id": "postfix.md"}, timeout=60
    )
    assert r.status_code == 200, r.text
    chunks = r.json()["chunks"]
    assert chunks > 1

    def address(stage: str) -> str:
        proc = next(p for p in procs if p.name == stage)
        return f"127.0.0.1:{proc.proc.args[proc.proc.args.index('--port') + 1]}"

    async def stored() -> tuple[list[str], list[int], int]:
        embed, retrieve = EmbedClient(address("embed")), RetrieveClient(address("retrieve"))
        try:
            vecs, _ = await embed.embed(["postfix restrictions"], InputKind.QUERY)
            found = await retrieve.search(
                "default", vecs[0], 50, timeout=10, where={"source": "postfix.md"}
            )
            texts = [h.text for h in found.hits]
            counts = await embed.tokenize(texts, InputKind.PASSAGE, timeout=10)
            return texts, list(counts.token_counts), counts.max_input_tokens
        finally:
            await embed.close()
            await retrieve.close()

    texts, counts, model_limit = asyncio.run(stored())
    assert len(texts) == chunks and max(counts) <= 240 < model_limit, counts
    assert all(t.startswith("Postfix parameters\n") for t in texts), "each keeps its heading"
    words = {w for t in texts for w in t.split("\n", 1)[1].split()}
    assert words == set(" ".join(lines).split()), "no word lost to a cut"
