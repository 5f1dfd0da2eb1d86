"""The edge's HTTP routes without stages: what each route hands its service, and the JSON 4xx
it answers for bad input. The services are test doubles; the same routes run over the real
stack in tests/integration/test_knowledge_base.py."""

from __future__ import annotations

import base64
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ragline.errors import AlreadyExists, NotFound
from ragline.types import Embeddings
from services.api.chat import ChatLimits
from services.api.ingest import IngestResult
from tests.doubles import Recorder


@pytest.fixture
def api():
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    app = create_app(ApiSettings(api_keys="k"))
    vectors = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    app.state.edge = SimpleNamespace(  # set by the lifespan in a real edge; none runs here
        collections=Recorder(
            create={"name": "hr"},
            document={"id": "policies/leave.md"},
            documents=([], ""),
            delete=NotFound("collection 'nope' does not exist"),
            search={"passages": []},
        ),
        documents=Recorder(
            add_text=IngestResult("a.md", "ingested", 1),
            delete=NotFound("collection 'hr' has no document 'gone.md'"),
        ),
        limits=ChatLimits(),
        embed=Recorder(embed=Embeddings(vectors, "bge-test", (3, 4))),
    )
    client = TestClient(app, headers={"Authorization": "Bearer k"})
    return client, app.state.edge


def error(r) -> dict:
    assert r.headers["content-type"] == "application/json", r.text
    return r.json()["error"]


def test_collection_and_document_routes_hand_their_service_the_path(api) -> None:
    client, e = api
    assert client.post("/collections", json={"name": "hr"}).status_code == 201
    assert e.collections.calls[-1][:2] == ("create", ("hr",))
    r = client.get("/collections/hr/documents/policies/leave.md")  # an id with a folder in it
    assert r.status_code == 200 and e.collections.calls[-1][1] == ("hr", "policies/leave.md")
    r = client.get("/collections/hr/documents", params={"limit": 5, "after": "b.md"})
    assert r.json() == {"collection": "hr", "documents": [], "next_after": None}
    assert e.collections.calls[-1][1] == ("hr", 5, "b.md")
    r = client.put("/collections/hr/documents/a.md", json={"text": "Leave: 30 days."})
    assert r.status_code == 200 and r.json()["status"] == "ingested"
    assert e.documents.calls[-1] == ("add_text", ("a.md", "Leave: 30 days.", {}),
                                     {"collection": "hr"})  # fmt: skip
    client.post("/collections/hr/documents", json={"text": "t", "metadata": {"dept": "hr"}})
    assert e.documents.calls[-1] == ("add_text", (None, "t", {"dept": "hr"}), {"collection": "hr"})
    client.post("/documents", json={"text": "t"})
    assert e.documents.calls[-1][2] == {"collection": None}, "/documents: the default collection"


def test_search_hands_on_collection_filter_and_threshold(api) -> None:
    client, e = api
    body = {"query": "leave?", "collection": "hr", "filter": {"source": ["a.md"]}, "top_k": 3}
    assert client.post("/search", json=body).status_code == 200
    name, args, kwargs = e.collections.calls[-1]
    assert (name, args) == ("search", ("leave?", 3))
    assert kwargs == {"collection": "hr", "where": {"source": ["a.md"]},
                      "score_threshold": None, "mode": None, "history": [],
                      "condense": None}  # fmt: skip
    turns = [{"role": "user", "content": "How much leave?"}]
    client.post("/search", json={"query": "And after?", "history": turns, "condense": "off"})
    assert (
        e.collections.calls[-1][2] | {"history": turns, "condense": "off"}
        == e.collections.calls[-1][2]
    ), "history and condense reach the search"


@pytest.mark.parametrize(
    ("method", "path", "body", "fragment"),
    [
        ("post", "/collections", {}, "name"),
        ("get", "/collections/hr/documents?limit=0", None, "limit"),
        ("put", "/collections/hr/documents/a.md", {"text": "t", "document_id": "b"}, "not a field"),
        ("post", "/search", {"query": " "}, "query is empty"),
        ("post", "/search", {"query": "q", "top_k": 500}, "top_k"),
        ("post", "/chat", {"query": "q", "filter": {"source": 3}}, "filter"),
        ("post", "/chat", {"query": "q", "history": [{"role": "system", "content": "x"}]}, "role"),
        ("post", "/v1/embeddings", {"input": []}, "empty list"),
        ("post", "/v1/embeddings", {"input": ["a", ""]}, "empty text"),
        ("post", "/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_input_is_a_json_400_that_names_the_field(api, method, path, body, fragment) -> None:
    client, _ = api
    r = client.request(method.upper(), path, json=body)
    assert r.status_code == 400, r.text
    assert fragment in error(r)["message"]


def test_service_refusals_keep_their_status_and_every_route_needs_the_key(api) -> None:
    client, e = api
    r = client.delete("/collections/nope")
    assert r.status_code == 404 and error(r)["code"] == "not_found"
    r = client.delete("/collections/hr/documents/gone.md")
    assert r.status_code == 404 and "gone.md" in error(r)["message"]
    e.collections.replies["create"] = AlreadyExists("collection 'hr' already exists")
    r = client.post("/collections", json={"name": "hr"})
    assert r.status_code == 409 and error(r)["code"] == "already_exists"
    anonymous = TestClient(client.app)
    routes = [("get", "/collections"), ("post", "/search"), ("delete", "/collections/x"),
              ("post", "/v1/embeddings"), ("get", "/collections/x/documents/y")]  # fmt: skip
    for method, path in routes:
        assert anonymous.request(method.upper(), path).status_code == 401, path


def test_embeddings_in_openai_shape_as_floats_or_base64(api) -> None:
    client, e = api
    r = client.post("/v1/embeddings", json={"input": ["a b", "c d e"], "model": "x"})
    body = r.json()
    assert body["object"] == "list" and body["model"] == "bge-test"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == pytest.approx([0.6, 0.8])
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    kind = e.embed.calls[-1][1][1]
    assert kind.value == "passage" and e.embed.calls[-1][2]["truncate"] is False
    r = client.post("/v1/embeddings", json={"input": "q", "encoding_format": "base64",
                                            "input_type": "query"})  # fmt: skip
    raw = base64.b64decode(r.json()["data"][1]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == [1.0, 0.0]
    assert e.embed.calls[-1][1][1].value == "query"


def test_the_openapi_schema_shows_the_knowledge_base_routes(api) -> None:
    client, _ = api
    paths = client.get("/openapi.json").json()["paths"]
    one = "/collections/{name}/documents/{document_id}"
    assert {"/collections", "/collections/{name}", "/collections/{name}/documents", one,
            "/search", "/v1/embeddings"} <= set(paths)  # fmt: skip
    assert {"get", "put", "delete"} <= set(paths[one])
