"""The Chatchat compatibility routes without stages: the score_threshold mapping, what each
route hands the edge's services, the shapes Chatchat's clients read (``docs`` first when
streaming, ``{code, msg, data}``), and refusals with their status. The same routes run under
Chatchat's own client code in tests/integration/test_chatchat_compat.py."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ragline.errors import InvalidArgument, NotFound, StageError
from ragline.types import EmbedderInfo
from services.api.chat import ChatAnswer, ChatLimits, ChatStream
from services.api.chatchat_schemas import cosine_floor, l2_distance
from services.api.ingest import IngestResult
from tests.doubles import Recorder

LEAVE = {"id": "leave.md#0", "score": 0.82, "text": "Employees get 28 days of leave.",
         "metadata": {"source": "leave.md", "title": "Leave"}}  # fmt: skip
DOC = {"id": "leave.md", "chunks": 1, "ingested_at": "2026-01-02T03:04:05.000+00:00"}


async def events(*items):
    for item in items:
        if isinstance(item, Exception):
            raise item
        yield item


ANSWER = {"answer": "28 days [1].", "sources": [LEAVE], "citations": [1], "usage": {},
          "finish_reason": "stop", "timings_ms": {}, "cached": False}  # fmt: skip


def make_api(tmp_path: Path) -> tuple[TestClient, SimpleNamespace]:
    """An edge app over test doubles, with a key for every collection and one for hr only."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    keys = tmp_path / "keys"
    keys.write_text("k\nhr-only collections=hr\n")
    app = create_app(ApiSettings(api_keys_file=keys, collection="docs"))
    app.state.edge = SimpleNamespace(  # set by the lifespan in a real edge; none runs here
        chat=Recorder(
            answer=ChatAnswer(ANSWER, "miss"),
            stream=lambda q: ChatStream(
                events(
                    ("sources", [LEAVE]),
                    ("token", "28 "),
                    ("token", "days [1]."),
                    ("done", {"finish_reason": "stop"}),
                ),
                "miss",
            ),
        ),
        collections=Recorder(
            list=[{"name": "hr", "documents": 2}, {"name": "finance", "documents": 1}],
            documents=([DOC], ""),
            document=DOC,
            search={"passages": [LEAVE]},
        ),
        documents=Recorder(
            add_file=IngestResult("leave.md", "ingested", 1),
            add_text=IngestResult("faq.md", "ingested", 1),
        ),
        embed=Recorder(info=EmbedderInfo("bge-small", 384)),
        limits=ChatLimits(),
    )
    return TestClient(app, headers={"Authorization": "Bearer k"}), app.state.edge


@pytest.fixture
def api(tmp_path):
    return make_api(tmp_path)


def stream_events(r) -> list[dict]:
    assert r.headers["content-type"].startswith("text/event-stream"), r.text
    return [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]


def test_score_threshold_maps_unit_vector_distance_to_cosine() -> None:
    assert cosine_floor(None) is None, "left out: the server's floor"
    assert cosine_floor(0.0) == 1.0 and cosine_floor(1.0) == 0.5
    assert cosine_floor(2.0) == 0.0 and cosine_floor(math.sqrt(2)) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 16)))
        distance, cosine = float(np.linalg.norm(a - b)), float(a @ b)
        assert l2_distance(cosine) == pytest.approx(distance, abs=1e-5)
        if cosine >= 0:
            assert cosine_floor(distance) == pytest.approx(cosine, abs=1e-6)


def test_kb_chat_asks_the_chat_service_and_answers_in_chatchats_shape(api) -> None:
    client, e = api
    body = {"query": "How much leave?", "kb_name": "hr", "top_k": 3, "score_threshold": 1.0,
            "stream": False, "model": "qwen", "temperature": 0.2,
            "history": [{"role": "system", "content": "Be brief."},
                        {"role": "assistant", "content": "Hello."}]}  # fmt: skip
    r = client.post("/chat/kb_chat", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "qwen"
    assert out["choices"][0]["message"]["content"] == "28 days [1]."
    assert out["docs"][0].startswith("Source [1] [leave.md](http://testserver/collections/hr/")
    assert "28 days of leave" in out["docs"][0] and out["ragline"]["citations"] == [1]
    q = e.chat.calls[-1][1][0]
    assert (q.query, q.top_k, q.collection, q.score_threshold) == ("How much leave?", 3, "hr", 0.5)
    assert q.params.temperature == 0.2
    assert [m["role"] for m in q.history] == ["user", "assistant"], "system folded into user"


def test_kb_chat_streams_by_default_docs_first_then_the_answer(api) -> None:
    client, e = api
    r = client.post("/chat/kb_chat", json={"query": "How much leave?", "kb_name": "hr"})
    chunks = stream_events(r)
    assert chunks[0]["docs"][0].startswith("Source [1] [leave.md]")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks[1:])
    assert text == "28 days [1]." and "docs" not in chunks[1]
    q = e.chat.calls[-1][1][0]
    assert q.score_threshold is None and q.top_k == ChatLimits().default_top_k, "server's"


def test_a_replaced_answer_and_a_late_error_travel_in_the_stream(api) -> None:
    client, e = api
    e.chat.replies["stream"] = lambda q: ChatStream(events(
        ("sources", []), ("token", "99 days"), ("replace", {"answer": "28 days [1]."}),
        StageError("generate", "UNAVAILABLE", "replica gone")), "miss")  # fmt: skip
    chunks = stream_events(client.post("/chat/kb_chat", json={"query": "q", "kb_name": "hr"}))
    assert chunks[0]["docs"] == ["No passage of this knowledge base is relevant enough to "
                                 "answer from."]  # fmt: skip
    assert chunks[2]["ragline_replace"] == {"answer": "28 days [1]."}
    assert "replica gone" in chunks[3]["error"]


def test_the_web_uis_openai_route_takes_the_last_message_as_the_query(api) -> None:
    client, e = api
    body = {"model": "m", "stream": False, "top_k": 2, "score_threshold": 2.0,
            "messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"},
                         {"role": "user", "content": "How much leave?"}]}  # fmt: skip
    r = client.post("/knowledge_base/local_kb/hr/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["content"] == "28 days [1]."
    q = e.chat.calls[-1][1][0]
    assert (q.query, q.collection, q.top_k, q.score_threshold) == ("How much leave?", "hr", 2, 0)
    assert [m["content"] for m in q.history] == ["Hi", "Hello"]
    r = client.post("/knowledge_base/temp_kb/abc/chat/completions", json=body)
    assert r.status_code == 400 and "local_kb" in r.json()["msg"]


def test_return_direct_searches_and_generates_nothing(api) -> None:
    client, e = api
    r = client.post("/chat/kb_chat", json={"query": "leave?", "kb_name": "hr",
                                           "return_direct": True, "stream": False})  # fmt: skip
    assert r.json()["choices"][0]["message"]["content"] == ""
    assert "28 days of leave" in r.json()["docs"][0]
    assert e.collections.calls[-1][0] == "search" and not e.chat.calls


def test_management_routes_map_onto_collections_and_documents(api) -> None:
    client, e = api
    r = client.post("/knowledge_base/create_knowledge_base", json={"knowledge_base_name": "hr"})
    assert r.json()["code"] == 200 and e.collections.calls[-1][:2] == ("create", ("hr",))
    kbs = client.get("/knowledge_base/list_knowledge_bases").json()["data"]
    assert [(k["kb_name"], k["file_count"], k["embed_model"]) for k in kbs] == [
        ("hr", 2, "bge-small"), ("finance", 1, "bge-small")]  # fmt: skip
    r = client.get("/knowledge_base/list_files", params={"knowledge_base_name": "hr"})
    [f] = r.json()["data"]
    assert (f["file_name"], f["file_ext"], f["docs_count"]) == ("leave.md", ".md", 1)
    assert f["in_db"] and not f["in_folder"], "ragline keeps documents, not files"
    body = {"query": "leave?", "knowledge_base_name": "hr", "top_k": 3, "score_threshold": 1.0,
            "file_name": "leave.md", "metadata": {"dept": "hr"}}  # fmt: skip
    [doc] = client.post("/knowledge_base/search_docs", json=body).json()
    assert doc["page_content"] == LEAVE["text"] and doc["type"] == "Document"
    assert doc["score"] == pytest.approx(math.sqrt(2 - 2 * 0.82), abs=1e-6)
    assert e.collections.calls[-1] == ("search", ("leave?", 3), {
        "collection": "hr", "where": {"dept": "hr", "source": "leave.md"},
        "score_threshold": 0.5})  # fmt: skip
    r = client.post("/knowledge_base/delete_knowledge_base", json="hr")  # a bare JSON string
    assert r.json()["code"] == 200 and e.collections.calls[-1][:2] == ("delete", ("hr",))


def test_upload_reports_each_file_it_could_not_take(api) -> None:
    client, e = api
    e.documents.replies["add_file"] = lambda data, name, **kw: (
        IngestResult(name, "unchanged" if name == "same.md" else "ingested", 1))  # fmt: skip
    files = [("files", ("leave.md", b"# Leave\n28 days.")), ("files", ("same.md", b"x")),
             ("files", ("faq.md", b"ignored: custom docs win"))]  # fmt: skip
    docs = json.dumps({"faq.md": [{"page_content": "Q: leave?"}, {"page_content": "A: 28."}]})
    r = client.post(
        "/knowledge_base/upload_docs",
        files=files,
        data={"knowledge_base_name": "hr", "override": "false", "docs": docs},
    )
    assert r.status_code == 200 and r.json()["code"] == 200, r.text
    assert list(r.json()["data"]["failed_files"]) == ["same.md"], "unchanged, no override"
    assert [c[1][1] for c in e.documents.calls if c[0] == "add_file"] == ["leave.md", "same.md"]
    assert e.documents.calls[-1] == ("add_text", ("faq.md", "Q: leave?\n\nA: 28."),
                                     {"collection": "hr"})  # fmt: skip
    r = client.post(
        "/knowledge_base/upload_docs",
        files=files[:1],
        data={"knowledge_base_name": "hr", "to_vector_store": "false"},
    )
    assert r.status_code == 400 and "to_vector_store" in r.json()["msg"]


def only_leave(name: str, reply):
    if name != "leave.md":
        raise NotFound(f"no document {name!r}")
    return reply


def test_delete_and_update_docs_list_the_files_that_are_not_there(api) -> None:
    client, e = api
    e.documents.replies["delete"] = lambda kb, name: only_leave(name, 1)
    body = {"knowledge_base_name": "hr", "file_names": ["leave.md", "gone.md"]}
    r = client.post("/knowledge_base/delete_docs", json=body)
    assert list(r.json()["data"]["failed_files"]) == ["gone.md"]
    e.collections.replies["document"] = lambda kb, name: only_leave(name, DOC)
    r = client.post("/knowledge_base/update_docs", json=body)
    assert list(r.json()["data"]["failed_files"]) == ["gone.md"]
    r = client.post("/knowledge_base/recreate_vector_store", json={"knowledge_base_name": "hr"})
    [progress] = stream_events(r)
    assert (progress["code"], progress["total"], progress["doc"]) == (200, 1, "leave.md")


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/chat/kb_chat", {"kb_name": "hr"}, 400, "query"),
        ("/chat/kb_chat", {"query": " ", "kb_name": "hr"}, 400, "query is empty"),
        ("/chat/kb_chat", {"query": "\x1f\ufeff", "kb_name": "hr"}, 400, "query is empty"),
        ("/chat/kb_chat", {"query": "q", "score_threshold": 3}, 400, "score_threshold"),
        ("/chat/kb_chat", {"query": "q", "mode": "search_engine"}, 400, "local_kb"),
        ("/knowledge_base/search_docs", {"knowledge_base_name": "hr", "file_name": "a.md"},
         400, "needs a query"),
        ("/knowledge_base/update_docs", {"knowledge_base_name": "hr", "file_names": [],
                                         "docs": "{not json"}, 400, "docs"),
        ("/knowledge_base/delete_knowledge_base", {"knowledge_base_name": "hr"}, 400, "string"),
        # JSON's own types, as the schema says: no 0 for false, no "3" for 3
        ("/chat/kb_chat", {"query": "q", "return_direct": 0}, 400, "return_direct"),
        ("/chat/kb_chat", {"query": "q", "top_k": "3"}, 400, "top_k"),
        ("/chat/kb_chat", {"query": "q", "top_k": 21}, 400, "between 1 and 20"),
        ("/chat/kb_chat", {"query": "q", "kb_name": "h r"}, 400, "not a knowledge base name"),
        ("/knowledge_base/create_knowledge_base", {"knowledge_base_name": ""}, 400,
         "not a knowledge base name"),
        ("/knowledge_base/delete_knowledge_base", "", 400, "not a knowledge base name"),
        ("/knowledge_base/local_kb/hr/chat/completions",
         {"messages": [{"role": "user", "content": " "}, {"role": "user", "content": "q"}]},
         400, "messages.0.content: is blank"),
        ("/knowledge_base/search_docs", {"knowledge_base_name": "hr", "query": "",
                                         "top_k": 99}, 400, "top_k"),
        ("/knowledge_base/update_docs", {"knowledge_base_name": "hr", "file_names": [],
                                         "docs": " "}, 400, "docs"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_chatchats_shape(api, path, body, status, fragment) -> None:
    client, _ = api
    r = client.post(path, json=body)
    assert r.status_code == status and r.json()["code"] == status, r.text
    assert fragment in r.json()["msg"]


def test_a_whole_float_is_an_integer_and_form_booleans_are_true_or_false(api) -> None:
    client, e = api
    r = client.post("/chat/kb_chat", json={"query": "q", "kb_name": "hr", "top_k": 3.0,
                                           "stream": False})  # fmt: skip
    assert r.status_code == 200 and e.chat.calls[-1][1][0].top_k == 3, "3.0 is JSON's 3"
    files = [("files", ("leave.md", b"# Leave"))]
    for value, status in [("true", 200), ("False", 200), ("0", 400), ("yes", 400)]:
        data = {"knowledge_base_name": "hr", "override": value}
        r = client.post("/knowledge_base/upload_docs", files=files, data=data)
        assert r.status_code == status and r.json()["code"] == status, (value, r.text)


def test_a_file_name_no_document_can_have_is_a_failed_file_not_a_refusal(api) -> None:
    client, e = api
    e.documents.replies["delete"] = InvalidArgument("document_id is empty")
    body = {"knowledge_base_name": "hr", "file_names": [""]}
    r = client.post("/knowledge_base/delete_docs", json=body)
    assert r.status_code == 200 and r.json()["data"]["failed_files"] == {"": "document_id is empty"}


def test_the_schema_documents_the_routes_as_they_answer(api) -> None:
    client, _ = api
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, operations in schema["paths"].items():
        if not path.startswith(("/chat/kb_chat", "/knowledge_base/")):
            continue
        for op in operations.values():
            refusal = op["responses"]["404"]["content"]["application/json"]["schema"]
            assert refusal == {"$ref": "#/components/schemas/Refusal"}, path
            assert "422" not in op["responses"], path
    assert set(components["Refusal"]["required"]) == {"code", "msg"}
    for path in ("/chat/kb_chat", "/knowledge_base/{mode}/{kb}/chat/completions",
                 "/knowledge_base/recreate_vector_store"):  # fmt: skip
        assert "text/event-stream" in schema["paths"][path]["post"]["responses"]["200"]["content"]
    kb_chat = components["KbChatRequest"]["properties"]
    assert kb_chat["query"]["maxLength"] == 4000, "the server's max_query_chars"
    not_blank = re.compile(kb_chat["query"]["pattern"])  # blank as JSON Schema and strip() say
    assert not_blank.search("q") and not any(map(not_blank.search, (" ", "\x1f", "\ufeff")))
    assert kb_chat["top_k"]["anyOf"][0]["maximum"] == 20, "the server's max_top_k"
    assert "if" in components["SearchDocs"], "a blank query narrows nothing"
    completions = schema["paths"]["/knowledge_base/{mode}/{kb}/chat/completions"]["post"]
    mode, kb = (p["schema"] for p in completions["parameters"])
    assert mode["enum"] == ["local_kb"] and kb["pattern"] == "^[A-Za-z0-9_-]{1,64}$"


def test_refusals_keep_their_status_and_keys_their_collections(api) -> None:
    client, e = api
    e.chat.replies["stream"] = StageError("retrieve", "NOT_FOUND", "collection 'nope' not found")
    r = client.post("/chat/kb_chat", json={"query": "q", "kb_name": "nope"})
    assert r.status_code == 404 and r.json()["code"] == 404 and "nope" in r.json()["msg"]
    e.collections.replies["documents"] = NotFound("collection 'nope' does not exist")
    r = client.get("/knowledge_base/list_files", params={"knowledge_base_name": "nope"})
    assert r.status_code == 404 and r.json()["data"] is None
    scoped = TestClient(client.app, headers={"Authorization": "Bearer hr-only"})
    kbs = scoped.get("/knowledge_base/list_knowledge_bases").json()["data"]
    assert [k["kb_name"] for k in kbs] == ["hr"], "a scoped key lists only its own"
    for path, body in [("/chat/kb_chat", {"query": "q", "kb_name": "finance"}),
                       ("/chat/kb_chat", {"query": "q"}),  # the server's collection, "docs"
                       ("/knowledge_base/create_knowledge_base",
                        {"knowledge_base_name": "finance"})]:  # fmt: skip
        r = scoped.post(path, json=body)
        assert r.status_code == 403 and r.json()["code"] == 403, path
    anonymous = TestClient(client.app)
    r = anonymous.get("/knowledge_base/list_knowledge_bases")
    assert r.status_code == 401 and "API key" in r.json()["msg"]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One app for every generated example."""
    return make_api(tmp_path_factory.mktemp("keys"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
FIELDS = ["query", "kb_name", "knowledge_base_name", "top_k", "score_threshold", "history",
          "stream", "temperature", "max_tokens", "messages", "file_names", "docs", "metadata",
          "file_name", "mode", "return_direct"]  # fmt: skip
PATHS = ["/chat/kb_chat", "/knowledge_base/local_kb/hr/chat/completions",
         "/knowledge_base/create_knowledge_base", "/knowledge_base/delete_knowledge_base",
         "/knowledge_base/search_docs", "/knowledge_base/delete_docs",
         "/knowledge_base/update_docs", "/knowledge_base/recreate_vector_store"]  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(
    path=st.sampled_from(PATHS),
    body=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6) | json_values,
)
def test_no_body_makes_a_route_fail_with_a_500(fuzzed, path, body) -> None:  # fmt: skip
    client, _ = fuzzed
    r = client.post(path, json=body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["code"] == r.status_code and r.json()["msg"], r.text
