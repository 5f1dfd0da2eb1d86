"""Drives a live ragline edge with Langchain-Chatchat 0.3's own client code, in the Chatchat
client venv (make's .venv-chatchat-client, never ragline's): ``ApiRequest`` from
``chatchat.webui_pages.utils`` for the knowledge-base routes and ``/chat/kb_chat`` (posted and
read as Chatchat's own ``chat_chat`` and ``file_chat`` do), and the openai SDK call that
Chatchat's web UI makes for its knowledge-base chat. Prints what the clients got as one JSON
object on the last stdout line; tests/integration/test_chatchat_compat.py asserts on it.

    CHATCHAT_ROOT=$(mktemp -d) .venv-chatchat-client/bin/python tests/chatchat_client/drive.py \
        http://127.0.0.1:8080 FOLDER_WITH_MD_FILES
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import openai
from chatchat.webui_pages.utils import ApiRequest

KB = "handbook"
LEAVE_Q = "How many days of paid annual leave does an employee get?"
UPDATED = "# Annual leave\n\nEvery employee gets 30 days of paid annual leave per year."


def kb_chat(api: ApiRequest, query: str, stream: bool, kb: str = KB) -> list:
    """``/chat/kb_chat`` as ApiRequest's chat methods call a chat route: post with
    stream=True, then its SSE-to-JSON generator (one item when the answer is not streamed)."""
    body = {"query": query, "mode": "local_kb", "kb_name": kb, "top_k": 3,
            "score_threshold": 2.0, "history": [], "stream": stream, "model": "qwen",
            "temperature": 0.7, "max_tokens": 200, "prompt_name": "default"}  # fmt: skip
    response = api.post("/chat/kb_chat", json=body, stream=True)
    return list(api._httpx_stream2generator(response, as_json=True))


def web_ui_chat(base_url: str, query: str, stream: bool) -> dict:
    """What ``chatchat/webui_pages/kb_chat.py`` does: the openai SDK on
    ``/knowledge_base/local_kb/{kb}``, ``docs`` from the first chunk, text from the rest."""
    client = openai.Client(base_url=f"{base_url}/knowledge_base/local_kb/{KB}", api_key="NONE")
    extra_body = {"top_k": 3, "score_threshold": 1.0, "temperature": 0.7,
                  "prompt_name": "default", "return_direct": False}  # fmt: skip
    messages = [{"role": "user", "content": query}]
    reply = client.chat.completions.create(
        messages=messages, model="qwen", stream=stream, extra_body=extra_body
    )
    if not stream:
        return {"docs": reply.docs, "text": reply.choices[0].message.content}
    docs, text, first = [], "", True
    for d in reply:
        if first:
            docs, first = d.docs, False
            continue
        text += d.choices[0].delta.content or ""
    return {"docs": docs, "text": text}


def main(base_url: str, folder: Path) -> dict:
    api = ApiRequest(base_url=base_url)
    out: dict = {}
    out["create"] = api.create_knowledge_base(KB)
    out["create_again"] = api.create_knowledge_base(KB)
    out["kbs"] = [kb["kb_name"] for kb in api.list_knowledge_bases()]
    files = sorted(str(p) for p in folder.glob("*.md"))
    out["upload"] = api.upload_kb_docs(files, KB, override=True)
    out["upload_again"] = api.upload_kb_docs(files, KB, override=False)
    out["files"] = api.list_kb_docs(KB)
    out["search"] = api.search_kb_docs(KB, query=LEAVE_Q)
    out["chat_stream"] = kb_chat(api, LEAVE_Q, stream=True)
    out["chat"] = kb_chat(api, LEAVE_Q, stream=False)
    out["chat_unknown_kb"] = kb_chat(api, LEAVE_Q, stream=True, kb="no_such_kb")
    out["web_ui_stream"] = web_ui_chat(base_url, LEAVE_Q, stream=True)
    out["web_ui"] = web_ui_chat(base_url, LEAVE_Q, stream=False)
    out["update_custom"] = api.update_kb_docs(
        KB, ["leave.md"], docs={"leave.md": [{"page_content": UPDATED, "metadata": {}}]}
    )
    out["search_updated"] = api.search_kb_docs(KB, query=LEAVE_Q)
    out["update"] = api.update_kb_docs(KB, ["leave.md", "not_there.md"])
    out["recreate"] = list(api.recreate_vector_store(KB))
    out["delete_docs"] = api.delete_kb_docs(KB, ["leave.md"])
    out["files_after_delete"] = api.list_kb_docs(KB)
    out["search_after_delete"] = api.search_kb_docs(KB, query=LEAVE_Q)
    out["delete_kb"] = api.delete_knowledge_base(KB)
    out["kbs_after_delete"] = [kb["kb_name"] for kb in api.list_knowledge_bases()]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2])), ensure_ascii=False))
