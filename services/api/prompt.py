"""Prompt assembly: sources within a token budget, deduplicated, cited by id.

The question (and any chat history) is never truncated; passages are added best first, whole,
until the context budget is spent. Tokens are estimated at 4 characters each (English prose
with BPE/WordPiece tokenizers averages 3.5-4.5), which keeps the edge independent of the
generation model's tokenizer. Strategies:
- ``stuff`` (default): every retrieved passage that fits the budget.
- ``score``: only passages scoring at least ``min_score_ratio`` x the best one, then as stuff.

A prompt is laid out so that what requests share comes first: the system prompt, then the
passages, then history and the question. Passages are chosen best first but, by default, laid
out in document order (by source, then position in it), so two questions that retrieve the same
passages get the same prompt prefix whatever their scores, and generate's prefix cache prefills
only the question (``passage_order="score"`` keeps the best-first order).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from ragline.types import Hit

SYSTEM_PROMPT = (
    "You answer questions using only the sources below. Cite the source id in square brackets "
    "after each fact, like [handbook.md#2]. Answer in one to three sentences. If the sources do "
    "not contain the answer, say that you do not know."
)
CHARS_PER_TOKEN = 4
STRATEGIES = ("stuff", "score")
ORDERS = ("document", "score")
# Bump when build_messages changes how a prompt is laid out: cached answers of the old layout
# are then never served (the revision is part of PromptPolicy.version, in the cache key).
TEMPLATE_REVISION = 1


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // CHARS_PER_TOKEN)


def select_passages(
    hits: Sequence[Hit],
    budget_tokens: int,
    strategy: str = "stuff",
    min_score_ratio: float = 0.8,
) -> list[Hit]:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}: use 'stuff' or 'score'")
    ordered = sorted(hits, key=lambda h: -h.score)
    if strategy == "score" and ordered:
        floor = ordered[0].score * min_score_ratio
        ordered = [h for h in ordered if h.score >= floor]
    chosen: list[Hit] = []
    seen: set[str] = set()
    used = 0
    for hit in ordered:
        key = " ".join(hit.text.split()).lower()
        if hit.id in seen or key in seen:
            continue
        cost = estimate_tokens(hit.text)
        if used + cost > budget_tokens:
            continue  # a shorter passage further down may still fit
        seen.update((hit.id, key))
        chosen.append(hit)
        used += cost
    return chosen


def document_order(hits: Sequence[Hit]) -> list[Hit]:
    """By source, then position in it (``doc#3`` before ``doc#12``): the same passages always
    come in the same order."""

    def key(hit: Hit) -> tuple[str, int, str]:
        source, _, chunk = hit.id.rpartition("#")
        if source and chunk.isdigit():
            return source, int(chunk), ""
        return hit.id, -1, hit.id

    return sorted(hits, key=key)


def build_messages(
    query: str,
    hits: Sequence[Hit],
    history: Sequence[Mapping[str, str]] = (),
    system_prompt: str = SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """System prompt with the sources, then the conversation so far, then the question."""
    sources = "\n\n".join(f"[{hit.id}] {hit.text}" for hit in hits)
    system = f"{system_prompt}\n\nSources:\n{sources}" if hits else system_prompt
    return [
        {"role": "system", "content": system},
        *({"role": m["role"], "content": m["content"]} for m in history),
        {"role": "user", "content": query},
    ]


@dataclass(frozen=True)
class PromptPolicy:
    """How the edge turns a question and its hits into chat messages."""

    context_tokens: int = 800
    strategy: str = "stuff"
    system_prompt: str = SYSTEM_PROMPT
    passage_order: str = "document"

    def __post_init__(self) -> None:
        if self.passage_order not in ORDERS:
            raise ValueError(f"passage_order must be one of {', '.join(ORDERS)}")

    @classmethod
    def from_settings(cls, settings) -> PromptPolicy:
        """From ``ApiSettings`` (the edge's and the monolith's prompts are the same)."""
        return cls(settings.context_tokens, settings.prompt_strategy,
                   passage_order=settings.passage_order)  # fmt: skip

    def select(self, hits: Sequence[Hit]) -> list[Hit]:
        """The passages a prompt would hold (the answer's ``sources``)."""
        return select_passages(hits, self.context_tokens, self.strategy)

    def layout(
        self, query: str, chosen: Sequence[Hit], history: Sequence[Mapping[str, str]] = ()
    ) -> list[dict[str, str]]:
        """The chat messages for passages already ``select``-ed."""
        if self.passage_order == "document":
            chosen = document_order(chosen)
        return build_messages(query, chosen, history, self.system_prompt)

    @cached_property
    def version(self) -> str:
        """Changes whenever a prompt would: part of the answer-cache key."""
        raw = (f"{TEMPLATE_REVISION}|{self.strategy}|{self.context_tokens}|{self.passage_order}|"
               f"{self.system_prompt}")  # fmt: skip
        return hashlib.sha256(raw.encode()).hexdigest()[:16]
