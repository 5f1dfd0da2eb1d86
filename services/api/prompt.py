"""The RAG prompt: numbered sources, then the question.

Passages are added whole, best first, until the character budget is spent, instead of
"stuffing" every retrieved passage and letting the model's context truncate the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from ragline.v1 import retrieve_pb2

SYSTEM_PROMPT = (
    "You answer employees' questions using only the numbered sources provided. "
    "Answer in one to three sentences. If the sources do not contain the answer, say so."
)


def select_passages(hits: Sequence[retrieve_pb2.Hit], budget_chars: int) -> list[retrieve_pb2.Hit]:
    chosen: list[retrieve_pb2.Hit] = []
    used = 0
    for hit in hits:
        if chosen and used + len(hit.text) > budget_chars:
            break
        chosen.append(hit)
        used += len(hit.text)
    return chosen


def build_messages(query: str, hits: Sequence[retrieve_pb2.Hit]) -> list[dict[str, str]]:
    sources = "\n\n".join(
        f"[{i}] ({hit.metadata.get('title', hit.document_id)}) {hit.text}"
        for i, hit in enumerate(hits, 1)
    )
    user = f"Sources:\n{sources}\n\nQuestion: {query}" if hits else f"Question: {query}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
