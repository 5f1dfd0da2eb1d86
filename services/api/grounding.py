"""Is an answer grounded in its sources? Citations, the facts it states, and refusals.

A small LLM states numbers, dates, amounts and names that its passages do not contain. The
check here is deliberately literal: every number (with its unit folded away) and every name
(a capitalised word that does not start a sentence) in the answer must appear in the text of
the passages it cites, or of all the passages the prompt used when it cites none. An answer
that fails it is not shown as the answer (the pipeline replaces it by an extractive one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ragline.types import Hit

NOT_FOUND = "I could not find this in the knowledge base."
_CITATION = re.compile(r"\[([^\[\]\n]{1,200})\]")
_NUMBER = re.compile(r"\d+(?:[.,:/]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")
_SENTENCE_START = re.compile(r"(?:^|[.!?:;\n]\s*|\"\s*|^\s*[-*]\s*)$")
_REFUSAL = re.compile(
    r"\b(?:do(?:es)? not (?:contain|say|mention|know|specify|provide|include)|don't know|"
    r"not (?:mentioned|specified|stated|covered|provided|found|in the (?:sources|documents))|"
    r"no (?:information|mention)|cannot (?:find|answer)|can't (?:find|answer)|"
    r"unable to (?:find|answer))\b",
    re.IGNORECASE,
)
# Capitalised words that are not names: they carry no fact a passage must hold.
_COMMON = {
    "i", "you", "your", "yes", "no", "the", "a", "an", "if", "it", "this", "that", "these",
    "those", "they", "we", "our", "he", "she", "there", "here", "in", "on", "at", "for", "to",
    "of", "and", "or", "but", "as", "by", "with", "from", "after", "before", "when", "each",
    "every", "all", "any", "not", "only", "also", "however", "please", "note", "source",
    "sources", "answer", "according", "based", "per", "up", "within", "monday", "tuesday",
    "wednesday", "thursday", "friday", "saturday", "sunday",
}  # fmt: skip


_STOP = {
    "that", "this", "with", "from", "have", "will", "your", "they", "their", "there", "what",
    "when", "which", "would", "could", "should", "about", "into", "only", "also", "than",
    "then", "them", "these", "those", "been", "were", "answer", "question", "sources",
    "source", "according", "based", "information", "provided", "context",
}  # fmt: skip


@dataclass(frozen=True)
class Citation:
    id: str
    quote: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "quote": self.quote} if self.quote else {"id": self.id}


def citations(answer: str, sources: Sequence[Hit]) -> list[Citation]:
    """The ``[id]`` markers of the answer that name one of its sources, in order, once each
    (``[a#0, b#1]`` and ``[a#0; b#1]`` name two); a quoted sentence just before a marker
    (``"..." [id]``) is its quote."""
    known = {h.id for h in sources}
    found: dict[str, Citation] = {}
    for m in _CITATION.finditer(answer):
        quote = ""
        before = answer[: m.start()].rstrip()
        if before.endswith('"'):
            start = before.rfind('"', 0, len(before) - 1)
            if start >= 0:
                quote = before[start + 1 : -1].strip()
        for part in re.split(r"[;,]\s*", m.group(1)):
            part = part.strip()
            if part in known and part not in found:
                found[part] = Citation(part, quote)
    return list(found.values())


def strip_citations(answer: str) -> str:
    return _CITATION.sub("", answer)


def is_refusal(answer: str) -> bool:
    """The LLM said the passages do not hold the answer."""
    return bool(_REFUSAL.search(answer))


def _normal(text: str) -> str:
    return " ".join(text.casefold().replace(",", "").split())


def stated_facts(answer: str) -> list[str]:
    """Numbers and names the answer states (citation markers left out)."""
    text = strip_citations(answer)
    facts = [n.replace(",", "") for n in _NUMBER.findall(text)]
    for m in _WORD.finditer(text):
        word = m.group(0)
        if not word[0].isupper() or word.casefold() in _COMMON:
            continue
        if _SENTENCE_START.search(text[: m.start()]):
            continue  # a capital that starts a sentence or a list item says nothing
        facts.append(word)
    return facts


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.casefold()) if len(w) > 3 and w not in _STOP]


def unsupported(answer: str, passages: Sequence[str]) -> list[str]:
    """The stated facts that none of ``passages`` contains. An answer that says nothing the
    passages say (no content word in common with them, e.g. "The answer to this question is:")
    is unsupported as a whole."""
    haystack = _normal(" ".join(passages))
    words = content_words(strip_citations(answer))
    if not words or not any(w in haystack for w in words):
        return [answer.strip() or "(empty answer)"]
    numbers = set(_NUMBER.findall(haystack))
    missing = []
    for fact in stated_facts(answer):
        if fact[0].isdigit():
            if fact not in numbers and fact.rstrip(".") not in numbers:
                missing.append(fact)
        elif fact.casefold() not in haystack:
            missing.append(fact)
    return missing


def grounding_passages(answer: str, used: Sequence[Hit]) -> list[str]:
    """What an answer must be grounded in: its cited passages, or all it was given."""
    cited = {c.id for c in citations(answer, used)}
    return [h.text for h in used if h.id in cited] or [h.text for h in used]
