"""The Chatchat compatibility routes under Langchain-Chatchat 0.3's own client code, against a
real stack: ``tests/chatchat_client/drive.py`` runs in the Chatchat client venv (`make
install-test` makes it; it is not ragline's venv) and uses Chatchat's ``ApiRequest`` and the
openai call of its web UI to create a knowledge base, upload documents, list and search them,
ask ``kb_chat`` streamed and not, update, rebuild, and delete. One driver run for the module;
each test asserts on what Chatchat's clients got. Answers are extractive (no LLM)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import REPO_ROOT, Pipeline

pytestmark = pytest.mark.slow

CLIENT_PYTHON = REPO_ROOT / ".venv-chatchat-client" / "bin" / "python"
HANDBOOK = {
    "leave.md": (
        "# Annual leave\n\nEvery employee gets 28 days of paid annual leave per year. Up to 5 "
        "unused days carry over to the next year; the rest lapse on 31 March."
    ),
    "remote.md": (
        "# Remote work\n\nStaff may work from home two days a week. Agree the days with your "
        "team lead and keep your calendar up to date."
    ),
}


def client_python() -> str:
    """Without the client venv the tests skip, except in CI, where `make install-test` makes
    it, so there a missing one is a failure."""
    if CLIENT_PYTHON.exists():
        return str(CLIENT_PYTHON)
    why = (f"the Chatchat client venv is missing ({CLIENT_PYTHON}): `make install-test` "
           "makes it")  # fmt: skip
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def got(base_env, tmp_path_factory) -> dict:
    """What Chatchat's clients got, step by step (see drive.py)."""
    python = client_python()
    folder = tmp_path_factory.mktemp("chatchat-files")
    for name, text in HANDBOOK.items():
        (folder / name).write_text(text)
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("chatchat-data")),
           "RAGLINE_API_ANSWERER": "extractive"}  # fmt: skip
    stack = Pipeline(env, tmp_path_factory.mktemp("chatchat-logs"), "--kb-poll-s", "0.2")
    try:
        client_env = {"PATH": os.environ.get("PATH", ""), "NO_PROXY": "127.0.0.1,localhost",
                      "CHATCHAT_ROOT": str(tmp_path_factory.mktemp("chatchat-root"))}  # fmt: skip
        done = subprocess.run(
            [python, str(REPO_ROOT / "tests" / "chatchat_client" / "drive.py"), stack.url,
             str(folder)],
            env=client_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, f"{done.stderr[-4000:]}\n{stack.logs()}"
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stack.stop()


def test_a_knowledge_base_is_created_once_and_listed(got) -> None:
    assert got["create"]["code"] == 200, got["create"]
    assert got["create_again"]["code"] == 409 and "exists" in got["create_again"]["msg"]
    assert "handbook" in got["kbs"]


def test_uploaded_files_are_ingested_and_listed(got) -> None:
    assert got["upload"]["code"] == 200 and got["upload"]["data"]["failed_files"] == {}
    again = got["upload_again"]["data"]["failed_files"]
    assert sorted(again) == ["leave.md", "remote.md"], "unchanged, without override"
    files = {f["file_name"]: f for f in got["files"]}
    assert sorted(files) == ["leave.md", "remote.md"]
    assert files["leave.md"]["docs_count"] >= 1 and files["leave.md"]["in_db"] is True


def test_search_docs_finds_the_passage_closest_first(got) -> None:
    best = got["search"][0]
    assert "28 days" in best["page_content"] and best["metadata"]["source"] == "leave.md"
    scores = [d["score"] for d in got["search"]]
    assert scores == sorted(scores) and 0 <= scores[0] < 2, "distances: smaller is closer"


def test_kb_chat_streams_docs_first_then_the_answer(got) -> None:
    first, *rest = got["chat_stream"]
    assert "leave.md" in first["docs"][0] and "28 days" in first["docs"][0]
    assert rest and all("docs" not in c for c in rest)
    answer = "".join(c["choices"][0]["delta"]["content"] for c in rest)
    assert "28 days" in answer


def test_kb_chat_answers_whole_when_not_streamed(got) -> None:
    [whole] = got["chat"]
    assert whole["object"] == "chat.completion"
    assert "28 days" in whole["choices"][0]["message"]["content"]
    assert "leave.md" in whole["docs"][0]


def test_kb_chat_on_an_unknown_knowledge_base_is_a_404_chatchat_reads(got) -> None:
    [refusal] = got["chat_unknown_kb"]
    assert refusal["code"] == 404 and "no_such_kb" in refusal["msg"]


def test_the_web_uis_openai_call_gets_docs_and_the_answer(got) -> None:
    for reply in (got["web_ui_stream"], got["web_ui"]):
        assert "leave.md" in reply["docs"][0] and "28 days" in reply["text"]


def test_updates_rebuilds_and_deletes(got) -> None:
    assert got["update_custom"]["data"]["failed_files"] == {}
    assert "30 days" in got["search_updated"][0]["page_content"], "custom docs replaced it"
    assert list(got["update"]["data"]["failed_files"]) == ["not_there.md"]
    assert [p["doc"] for p in got["recreate"]] == ["leave.md", "remote.md"]
    assert all(p["code"] == 200 for p in got["recreate"])
    assert got["delete_docs"]["data"]["failed_files"] == {}
    assert [f["file_name"] for f in got["files_after_delete"]] == ["remote.md"]
    assert all("leave.md" != d["metadata"]["source"] for d in got["search_after_delete"])
    assert got["delete_kb"]["code"] == 200 and "handbook" not in got["kbs_after_delete"]
