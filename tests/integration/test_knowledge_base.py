"""The knowledge-base API over the real stack (embed, retrieve, generate and an edge as four
processes with the default models): collections chosen per question, metadata filters and
relevance floors, every management route and its refusals, ``ragline ingest --sync``, and
``/v1/embeddings`` through the ``openai`` client. One stack for the module: a start costs
tens of seconds on a small machine. Answers are extractive (no LLM), which is what the
questions need and keeps the module fast."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from ragline.clients import EmbedClient
from ragline.types import InputKind
from tests.conftest import REPO_ROOT, Pipeline

pytestmark = pytest.mark.slow

HR = {
    "leave.md": (
        "# Annual leave\n\nEvery employee gets 28 days of paid annual leave per year. Up to 5 "
        "unused days carry over to the next year; the rest lapse on 31 March."
    ),
    "remote.md": (
        "# Remote work\n\nStaff may work from home two days a week. Agree the days with your "
        "team lead and keep your calendar up to date."
    ),
}
FINANCE = {
    "invoices.md": (
        "# Supplier invoices\n\nSupplier invoices are paid within 45 days of receipt. Send "
        "them to the accounts payable mailbox as PDF."
    ),
    "travel.md": (
        "# Travel\n\nTrain travel is booked in second class. Flights need approval from the "
        "finance director before booking."
    ),
}
LEAVE_Q = "How many days of paid annual leave does an employee get?"
ADMIN_KEY, HR_KEY = "admin-key-0123", "hr-key-4567"
HTTP = httpx.Client(headers={"Authorization": f"Bearer {ADMIN_KEY}"})  # the admin's key


@pytest.fixture(scope="module")
def kb(base_env, tmp_path_factory):
    data = tmp_path_factory.mktemp("kb-data")
    keys = data / "keys.txt"
    keys.write_text(f"# the admin\n{ADMIN_KEY}\n{HR_KEY} collections=hr\n")
    env = {**base_env, "RAGLINE_DATA_DIR": str(data), "RAGLINE_API_API_KEYS_FILE": str(keys)}
    stack = Pipeline(env, tmp_path_factory.mktemp("kb-logs"), "--kb-poll-s", "0.2")
    try:
        for name, docs in (("hr", HR), ("finance", FINANCE)):
            r = HTTP.post(f"{stack.url}/collections", json={"name": name}, timeout=30)
            assert r.status_code == 201, r.text
            for doc_id, text in docs.items():
                r = HTTP.post(
                    f"{stack.url}/collections/{name}/documents",
                    json={"text": text, "document_id": doc_id, "metadata": {"dept": name}},
                    timeout=60,
                )
                assert r.status_code == 200 and r.json()["status"] == "ingested", r.text
        yield stack
    finally:
        stack.stop()


def post(kb: Pipeline, path: str, **body) -> httpx.Response:
    return HTTP.post(f"{kb.url}{path}", json=body, timeout=60)


def chat(kb: Pipeline, query: str, **body) -> dict:
    r = post(kb, "/chat", query=query, answerer="extractive", **body)
    assert r.status_code == 200, r.text
    return r.json()


def documents_of(sources: list[dict]) -> set[str]:
    return {s["id"].rpartition("#")[0] for s in sources}


def test_each_collection_answers_its_own_question(kb) -> None:
    leave = chat(kb, LEAVE_Q, collection="hr")
    assert "28 days" in leave["answer"] and documents_of(leave["sources"]) <= set(HR)
    assert leave["sources"][0]["id"].startswith("leave.md#")
    paid = chat(kb, "When are supplier invoices paid?", collection="finance")
    assert "45 days" in paid["answer"] and documents_of(paid["sources"]) <= set(FINANCE)
    # The same question in another collection: that collection's passages, not a cached answer.
    elsewhere = chat(kb, LEAVE_Q, collection="finance")
    assert documents_of(elsewhere["sources"] + elsewhere["closest"]) <= set(FINANCE)
    assert "28 days" not in elsewhere["answer"] and elsewhere["cached"] is False
    assert chat(kb, LEAVE_Q, collection="hr")["cached"] is True
    listed = {c["name"]: c for c in HTTP.get(f"{kb.url}/collections", timeout=10).json()[
        "collections"]}  # fmt: skip
    assert listed["hr"]["documents"] == 2 and listed["hr"]["passages"] >= 2
    assert listed["finance"]["documents"] == 2 and listed["hr"]["default"] is False
    r = post(kb, "/chat", query=LEAVE_Q, collection="nope")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]


def test_a_filter_and_a_threshold_change_what_is_retrieved(kb) -> None:
    found = post(kb, "/search", query=LEAVE_Q, collection="hr", top_k=4).json()["passages"]
    assert found[0]["document_id"] == "leave.md" and {"score", "bm25_score"} <= set(found[0])
    only = post(kb, "/search", query=LEAVE_Q, collection="hr",
                filter={"source": "remote.md"}).json()["passages"]  # fmt: skip
    assert only and {p["document_id"] for p in only} == {"remote.md"}
    answer = chat(kb, LEAVE_Q, collection="hr", filter={"source": ["remote.md"]})
    assert documents_of(answer["sources"]) == {"remote.md"} and "28" not in answer["answer"]
    none = post(kb, "/search", query=LEAVE_Q, collection="hr", filter={"dept": "finance"})
    assert none.json()["passages"] == [], "hr's passages are all dept=hr"
    best = found[0]["score"]
    floored = post(kb, "/search", query=LEAVE_Q, collection="hr", score_threshold=best + 0.001)
    assert floored.json()["passages"] == []
    refused = chat(kb, LEAVE_Q, collection="hr", score_threshold=min(1.0, best + 0.001))
    assert refused["not_found"] is True and refused["sources"] == []
    r = post(kb, "/search", query=LEAVE_Q, collection="hr", filter={"source": []})
    assert r.status_code == 400 and "any_of" in r.json()["error"]["message"]


def test_a_follow_up_finds_its_passage_only_when_condensed(kb) -> None:
    history = [{"role": "user", "content": LEAVE_Q}, {"role": "assistant", "content": "28 days."}]
    follow = "What happens to the ones I do not use?"
    floor = 0.35  # the edge's default relevance floor (the tests' edges use 0)
    alone = chat(kb, follow, collection="hr", history=history, score_threshold=floor,
                 condense="off")  # fmt: skip
    assert alone["not_found"] is True and "search_query" not in alone
    condensed = chat(kb, follow, collection="hr", history=history, score_threshold=floor)
    assert condensed["search_query"] == f"{LEAVE_Q}\n{follow}"
    assert documents_of(condensed["sources"]) == {"leave.md"} and not condensed["not_found"]
    assert "31 March" in condensed["answer"] or "carry over" in condensed["answer"]
    switch = chat(kb, "How many days may staff work from home?", collection="hr",
                  history=history, score_threshold=floor)  # fmt: skip
    assert switch["search_query"] == "How many days may staff work from home?"
    assert "remote.md" in documents_of(switch["sources"]), "a new subject keeps its own search"
    found = post(kb, "/search", query=follow, collection="hr", history=history).json()
    assert found["search_query"] == condensed["search_query"]
    assert found["passages"][0]["document_id"] == "leave.md"


def test_a_key_limited_to_a_collection_gets_403_on_another(kb) -> None:
    hr = httpx.Client(base_url=kb.url, headers={"Authorization": f"Bearer {HR_KEY}"}, timeout=60)
    assert hr.post("/chat", json={"query": LEAVE_Q, "collection": "hr"}).status_code == 200
    for method, path, body in (
        ("POST", "/chat", {"query": LEAVE_Q, "collection": "finance"}),
        ("POST", "/chat", {"query": LEAVE_Q}),  # the server's default collection
        ("POST", "/search", {"query": LEAVE_Q, "collection": "finance"}),
        ("GET", "/collections/finance/documents", None),
        ("GET", "/collections/finance/documents/invoices.md", None),
        ("DELETE", "/collections/finance/documents/invoices.md", None),
        ("DELETE", "/collections/finance", None),
        ("POST", "/collections", {"name": "payroll"}),
        ("POST", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": LEAVE_Q}], "collection": "finance"}),
    ):  # fmt: skip
        r = hr.request(method, path, json=body)
        assert r.status_code == 403, (method, path, r.text)
        assert r.json()["error"]["code"] == "permission_denied" and "hr" in r.text
    listed = [c["name"] for c in hr.get("/collections").json()["collections"]]
    assert listed == ["hr"], "a limited key lists only its own collections"
    assert len(HTTP.get(f"{kb.url}/collections").json()["collections"]) > 1
    assert httpx.get(f"{kb.url}/collections").status_code == 401, "no key"
    assert HTTP.get(f"{kb.url}/collections/finance/documents").status_code == 200, "the admin"


def test_a_long_history_is_truncated_and_said(kb) -> None:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "x" * 400}
             for i in range(30)]  # fmt: skip
    assert chat(kb, LEAVE_Q, collection="hr", history=turns)["history_truncated"] is True
    assert chat(kb, LEAVE_Q, collection="hr", history=turns[-2:])["history_truncated"] is False


def test_every_management_route_does_what_it_says_and_refuses_bad_input(kb) -> None:
    url = kb.url
    assert post(kb, "/collections", name="scratch").status_code == 201
    r = post(kb, "/collections", name="scratch")
    assert r.status_code == 409 and "DELETE /collections/scratch" in r.json()["error"]["message"]
    r = post(kb, "/collections", name="bad name!")
    assert r.status_code == 400 and "invalid" in r.json()["error"]["message"]
    text = "# Parking\n\nThe car park opens at 7:00. Bicycles go in the basement."
    r = post(kb, "/collections/scratch/documents", text=text, document_id="site/parking.md")
    assert r.json()["status"] == "ingested"
    doc = HTTP.get(f"{url}/collections/scratch/documents/site/parking.md", timeout=10).json()
    assert (doc["id"], doc["source"], doc["title"]) == ("site/parking.md",) * 2 + ("Parking",)
    assert doc["chunks"] >= 1 and len(doc["content_hash"]) == 64 and doc["ingested_at"]
    page = HTTP.get(f"{url}/collections/scratch/documents", timeout=10).json()
    assert [d["id"] for d in page["documents"]] == ["site/parking.md"]
    assert page["next_after"] is None
    one = f"{url}/collections/scratch/documents/site/parking.md"
    replaced = HTTP.put(one, json={"text": text + "\n\nVisitors park on level 2."}, timeout=60)
    assert replaced.json()["status"] == "ingested"
    again = HTTP.get(one, timeout=10).json()
    assert again["content_hash"] != doc["content_hash"]
    hits = post(kb, "/search", query="Where do visitors park?", collection="scratch").json()
    assert any("level 2" in p["text"] for p in hits["passages"])
    r = HTTP.delete(one, timeout=10)
    assert r.status_code == 200 and r.json()["deleted"] is True
    for method in ("GET", "DELETE"):
        r = HTTP.request(method, one, timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", method
    r = HTTP.get(f"{url}/collections/nope/documents", timeout=10)
    assert r.status_code == 404 and "POST /collections" in r.json()["error"]["message"]
    r = post(kb, "/collections/nope/documents", text="t")
    assert r.status_code == 404, "a named collection is not created by an upload"
    assert HTTP.delete(f"{url}/collections/scratch", timeout=10).status_code == 200
    assert HTTP.delete(f"{url}/collections/scratch", timeout=10).status_code == 404
    names = [c["name"] for c in HTTP.get(f"{url}/collections", timeout=10).json()["collections"]]
    assert "scratch" not in names
    # The edge's own route still ingests into its default collection, creating it.
    r = post(kb, "/documents", text=text, document_id="parking.md")
    assert r.status_code == 200 and r.json()["status"] == "ingested"


def test_an_ingestion_job_is_answered_at_once_and_polled_to_its_end(kb) -> None:
    assert post(kb, "/collections", name="jobs").status_code == 201
    files = [("files", ("canteen.md", b"# Canteen\n\nThe canteen serves lunch from 12:00.")),
             ("files", ("gym.md", b"# Gym\n\nThe gym on floor 2 opens at 06:30.")),
             ("files", ("empty.md", b"   "))]  # fmt: skip
    r = HTTP.post(f"{kb.url}/collections/jobs/jobs", files=files, timeout=30)
    assert r.status_code == 202 and r.headers["location"] == r.json()["status_url"], r.text
    status_url = kb.url + r.json()["status_url"]
    for _ in range(300):
        job = HTTP.get(status_url, timeout=10).json()
        if job["finished_at"]:
            break
        time.sleep(0.1)
    assert job["status"] == "partial" and job["documents"] == job["done"] == 3, job
    assert [d["document_id"] for d in job["results"]] == ["canteen.md", "gym.md"]
    assert job["errors"][0]["document"] == "empty.md" and "no text" in job["errors"][0]["message"]
    hits = post(kb, "/search", query="When does the gym open?", collection="jobs").json()
    assert hits["passages"][0]["document_id"] == "gym.md"
    texts = {"documents": [{"text": "Parking is free on Fridays.", "document_id": "parking"}]}
    r = HTTP.post(f"{kb.url}/collections/jobs/jobs", json=texts, timeout=30)
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running", "succeeded")
    listed = HTTP.get(f"{kb.url}/jobs", timeout=10).json()["jobs"]
    assert listed[0]["job_id"] == r.json()["job_id"], "newest first"
    r = HTTP.post(f"{kb.url}/collections/nope/jobs", json=texts, timeout=30)
    assert r.status_code == 404 and "POST /collections" in r.json()["error"]["message"]
    for bad in ({"documents": []}, {"docs": 1}):
        r = HTTP.post(f"{kb.url}/collections/jobs/jobs", json=bad, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument"
    r = HTTP.get(f"{kb.url}/jobs/job-0-nothing", timeout=10)
    assert r.status_code == 404 and "GET /jobs" in r.json()["error"]["message"]
    hr = httpx.Client(base_url=kb.url, headers={"Authorization": f"Bearer {HR_KEY}"})
    assert hr.get(r.request.url.path.replace("job-0-nothing", job["job_id"])).status_code == 403
    assert hr.get("/jobs").json()["jobs"] == [], "the jobs of other collections are not listed"


def ingest(kb: Pipeline, folder, *flags: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "ingest", str(folder), "--collection", "synced",
         "--embed", f"127.0.0.1:{kb.ports['embed']}",
         "--retrieve", f"127.0.0.1:{kb.ports['retrieve']}", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ingest_sync_deletes_the_documents_whose_files_are_gone(kb, tmp_path) -> None:
    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "leave.md").write_text(HR["leave.md"])
    (tmp_path / "travel.md").write_text(FINANCE["travel.md"])
    ingest(kb, tmp_path)
    (tmp_path / "travel.md").unlink()
    out = ingest(kb, tmp_path, "--sync")
    assert "1 unchanged" in out and "1 deleted" in out, out
    docs = HTTP.get(f"{kb.url}/collections/synced/documents", timeout=10).json()["documents"]
    assert [d["id"] for d in docs] == ["hr/leave.md"]
    hits = post(kb, "/search", query="Which class is train travel booked in?",
                collection="synced").json()["passages"]  # fmt: skip
    assert hits and all(p["document_id"] == "hr/leave.md" for p in hits)
    assert "0 deleted" in ingest(kb, tmp_path, "--sync")


def test_openai_embeddings_are_the_embed_stages_vectors(kb) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{kb.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    texts = ["Annual leave is 28 days.", "Invoices are paid within 45 days."]

    async def stage(kind: InputKind) -> np.ndarray:
        embed = EmbedClient(f"127.0.0.1:{kb.ports['embed']}")
        try:
            return (await embed.embed(texts, kind))[0]
        finally:
            await embed.close()

    passages, queries = asyncio.run(stage(InputKind.PASSAGE)), asyncio.run(stage(InputKind.QUERY))
    default = client.embeddings.create(input=texts, model="any")  # the SDK asks for base64
    floats = client.embeddings.create(input=texts, model="any", encoding_format="float")
    for got in (default, floats):
        vectors = np.array([d.embedding for d in sorted(got.data, key=lambda d: d.index)])
        assert vectors.shape == passages.shape
        np.testing.assert_allclose(vectors, passages, atol=1e-5)
    assert default.usage.prompt_tokens > len(texts) and default.model
    query = client.embeddings.create(input=texts, model="any", extra_body={"input_type": "query"})
    # (The default model has no query instruction; a BGE model's QUERY vectors differ.)
    np.testing.assert_allclose([d.embedding for d in query.data], queries, atol=1e-5)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=[], model="any")
