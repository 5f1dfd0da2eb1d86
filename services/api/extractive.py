"""The extractive answerer: the passages' sentences closest to the question, quoted and cited.

No LLM: the passages the prompt would use are split into sentences (list items and table rows
count as sentences; a heading line is kept only as context), each sentence is embedded with the
embed stage as a PASSAGE (with its heading path in front, so "Carrying over" helps a bullet that
only says "up to 5 days"), and the one or two that rank highest are returned as
``"sentence" [passage id]``: a sentence ranks by its cosine to the question's vector plus half
its passage's score; the second is added when it ranks at least 0.75 of the first. Sentence
vectors are remembered by text (an LRU), so passages that answer many questions are embedded
once.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ragline.types import Hit, InputKind

# Sentence ends (not after a title or "e.g."), list items run into one line, line breaks.
_SPLIT = re.compile(
    r"(?<!\bDr\.)(?<!\bMr\.)(?<!\bMs\.)(?<!\bMrs\.)(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\bvs\.)"
    r"(?<=[.!?])\s+(?=[A-Z0-9\"(])|\s+[-*]\s+(?=[A-Z0-9])|\n+"
)
_MARKUP = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+|\*\*|__|`")


@dataclass(frozen=True)
class Sentence:
    passage_id: str
    text: str  # as quoted
    context: str  # what is embedded: heading path and sentence


@dataclass(frozen=True)
class Extract:
    answer: str
    quotes: list[Sentence]
    best_score: float  # cosine of the closest sentence: low means the passages miss the point


def sentences(hits: Sequence[Hit]) -> list[Sentence]:
    out: list[Sentence] = []
    for hit in hits:
        lines = hit.text.split("\n")
        heading = hit.metadata.get("heading", "")
        if lines and heading and lines[0].strip() == heading.strip():
            lines = lines[1:]  # the chunker puts the heading path on the first line
        for piece in _SPLIT.split("\n".join(lines)):
            text = _MARKUP.sub("", piece).strip().strip("|").strip()
            if len(text) < 12 or not any(c.isalpha() for c in text):
                continue
            if text.startswith("#"):
                heading = text.lstrip("# ").strip()
                continue
            context = f"{heading}: {text}" if heading else text
            out.append(Sentence(hit.id, text, context))
    return out


class ExtractiveAnswerer:
    def __init__(
        self,
        embed,
        max_sentences: int = 2,
        second_ratio: float = 0.75,
        passage_weight: float = 0.5,
        cache_size: int = 20_000,
    ) -> None:
        self.embed = embed
        self.max_sentences = max_sentences
        self.second_ratio = second_ratio
        # A sentence is ranked by its own cosine plus this share of its passage's: the passage
        # (embedded whole, with its heading) says more about the topic than a bare list item.
        self.passage_weight = passage_weight
        self.cache_size = cache_size
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    async def _vectors_of(self, texts: list[str], timeout: float | None) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if missing:  # the embed client splits what the stage takes in one call
            found = await self.embed.embed(missing, InputKind.PASSAGE, True, timeout)
            for text, vector in zip(missing, found.vectors, strict=True):
                self._vectors[text] = vector
        for text in texts:
            self._vectors.move_to_end(text)
        while len(self._vectors) > self.cache_size:
            self._vectors.popitem(last=False)
        return np.stack([self._vectors[t] for t in texts])

    async def answer(
        self, query_vector: np.ndarray, hits: Sequence[Hit], timeout: float | None = None
    ) -> Extract | None:
        """None when the passages have no usable sentence."""
        candidates = sentences(hits)
        if not candidates:
            return None
        matrix = await self._vectors_of([s.context for s in candidates], timeout)
        cosine = matrix @ np.asarray(query_vector, dtype=np.float32).reshape(-1)
        passage = {h.id: float(h.score) for h in hits}
        scores = cosine + self.passage_weight * np.array(
            [passage[s.passage_id] for s in candidates], dtype=np.float32
        )
        order = [int(i) for i in np.argsort(-scores)]
        best = float(cosine[order[0]])
        chosen = [candidates[order[0]]]
        for i in order[1 : self.max_sentences]:
            near = float(scores[i]) >= self.second_ratio * float(scores[order[0]])
            if near and candidates[i].text not in {c.text for c in chosen}:
                chosen.append(candidates[i])
        answer = " ".join(f'"{s.text}" [{s.passage_id}]' for s in chosen)
        return Extract(answer, chosen, best)
