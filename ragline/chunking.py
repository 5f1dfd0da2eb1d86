"""Split documents into overlapping passages that respect headings and paragraphs.

Sizes are counted in words, a model-independent proxy for tokens that holds for prose (English
averages about 1.3 WordPiece tokens per word) but not for code, paths and parameter names, which
cost several tokens a word. With ``max_tokens`` the caller also counts each chunk in the
embedding model's tokens and splits those over the limit (``split_to_fit``, driven by
``TokenFit``), so no passage loses its tail to the model's truncation. Each chunk remembers the
heading it sits under, so a passage cut from the middle of a page still says what the page is
about.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")
# A word that ends a sentence: terminal punctuation, maybe inside closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*$")
# Rounds of count-then-split before giving up on a chunk (one that is a single long word).
MAX_FIT_ROUNDS = 6


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    heading: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkingPolicy:
    max_words: int = 160
    overlap_words: int = 30
    # Also at most this many embedding-model tokens per chunk (0: words only). The caller counts.
    max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_words < 8:
            raise ValueError("max_words must be at least 8")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ValueError("overlap_words must be >= 0 and less than half of max_words")
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0 (0: sizes in words only)")


def _sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading path, paragraphs) per section; the path joins the enclosing headings."""
    sections: list[tuple[str, list[str]]] = []
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []

    def flush_paragraph() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    def flush_section() -> None:
        flush_paragraph()
        if paragraphs:
            sections.append((" > ".join(title for _, title in path), list(paragraphs)))
            paragraphs.clear()

    for raw in text.splitlines():
        line = raw.strip()
        match = _HEADING.match(line)
        if match:
            flush_section()
            level = len(match.group(1))
            path[:] = [p for p in path if p[0] < level]
            path.append((level, match.group(2)))
        elif not line:
            flush_paragraph()
        else:
            current.append(line)
    flush_section()
    return sections


def chunk_text(text: str, policy: ChunkingPolicy | None = None) -> list[Chunk]:
    """Pack whole paragraphs into chunks of at most ``max_words``; split only long paragraphs."""
    policy = policy or ChunkingPolicy()
    chunks: list[Chunk] = []
    for heading, paragraphs in _sections(text):
        words: list[str] = []
        for paragraph in paragraphs:
            pwords = paragraph.split()
            if words and len(words) + len(pwords) > policy.max_words:
                chunks.append(_make(len(chunks), heading, words))
                words = words[-policy.overlap_words :] if policy.overlap_words else []
            words.extend(pwords)
            while len(words) > policy.max_words:
                chunks.append(_make(len(chunks), heading, words[: policy.max_words]))
                step = policy.max_words - policy.overlap_words
                words = words[step:]
        if words:
            chunks.append(_make(len(chunks), heading, words))
    return chunks


def _make(index: int, heading: str, words: list[str]) -> Chunk:
    body = " ".join(words)
    text = f"{heading}\n{body}" if heading else body
    return Chunk(index=index, text=text, heading=heading)


def split_to_fit(chunks: Sequence[Chunk], counts: Sequence[int], limit: int) -> list[Chunk]:
    """Split every chunk counted over ``limit`` tokens; the chunks renumbered from 0.

    Every piece starts with its chunk's heading line and keeps its heading and metadata. Cuts
    fall between sentences, and inside a sentence only where the sentence alone is too long.
    The chunk's own tokens per character size the pieces, an estimate: recount the result and
    call again until every chunk fits (``TokenFit`` does). A chunk that is one word past its
    heading cannot be split and comes back as it was.
    """
    out: list[Chunk] = []
    for chunk, count in zip(chunks, counts, strict=True):
        prefix = f"{chunk.heading}\n" if chunk.heading else ""
        body = chunk.text[len(prefix) :] if chunk.text.startswith(prefix) else ""
        if count <= limit or len(body.split()) < 2:
            out.append(replace(chunk, index=len(out)))
            continue
        # Characters of body a piece may hold if the chunk's tokens were spread evenly.
        budget = max(1, math.floor(limit * len(chunk.text) / count) - len(prefix))
        for piece in _pack(_sentence_units(body, budget), budget):
            out.append(replace(chunk, index=len(out), text=prefix + piece))
    return out


def _sentence_units(body: str, budget: int) -> list[str]:
    """The body's sentences; one longer than ``budget`` comes as word runs that fit it."""
    units: list[str] = []
    sentence: list[str] = []
    words = body.split()
    for i, word in enumerate(words):
        sentence.append(word)
        if _SENTENCE_END.search(word) or i == len(words) - 1:
            joined = " ".join(sentence)
            units.extend([joined] if len(joined) <= budget else _pack(sentence, budget))
            sentence = []
    return units


def _pack(units: list[str], budget: int) -> list[str]:
    """Join units with spaces into pieces of at most ``budget`` characters (a unit longer than
    that alone), about equal in size rather than full ones and a scrap."""
    total = sum(len(u) for u in units) + len(units) - 1
    target = total / math.ceil(total / budget)
    pieces: list[str] = []
    current = ""
    for unit in units:
        if current and (len(current) >= target or len(current) + 1 + len(unit) > budget):
            pieces.append(current)
            current = ""
        current = f"{current} {unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


class TokenFit:
    """Counts and splits chunks until each fits a token limit, with any counter, in bounded
    rounds; ingestion counts through the embed stage, the monolith with its model in-process::

        fit = TokenFit(chunks, policy.max_tokens)
        while texts := fit.to_count():
            fit.counted(*count(texts))  # (counts, the model's max input tokens)
        chunks = fit.chunks

    Only texts not counted before are asked for. Chunks still over the limit after
    ``MAX_FIT_ROUNDS`` splits (or that cannot be split) are kept; the model truncates them.
    """

    def __init__(self, chunks: Sequence[Chunk], limit: int, rounds: int = MAX_FIT_ROUNDS) -> None:
        """``limit``: the policy's ``max_tokens`` (0: the model's own, given to ``counted``)."""
        self.chunks = list(chunks)
        self.limit = limit
        self.rounds = rounds
        self.counts: dict[str, int] = {}
        self.done = not self.chunks

    def to_count(self) -> list[str]:
        """Texts whose counts are needed next, in order and distinct; empty when done."""
        if self.done:
            return []
        return list(dict.fromkeys(c.text for c in self.chunks if c.text not in self.counts))

    def counted(self, counts: Sequence[int], max_input_tokens: int = 0) -> None:
        """Record the counts of ``to_count()``'s texts; split what is over the limit, which is
        the smaller of the policy's and the model's (``max_input_tokens``, when known)."""
        self.counts.update(zip(self.to_count(), counts, strict=True))
        if max_input_tokens:
            self.limit = min(self.limit, max_input_tokens) if self.limit else max_input_tokens
        self.done = self.done or not self.limit  # no limit from either: nothing to fit
        while not self.done and not self.to_count():
            if not self.over_limit() or self.rounds <= 0:
                self.done = True
                break
            counts = [self.counts[c.text] for c in self.chunks]
            split = split_to_fit(self.chunks, counts, self.limit)
            self.rounds -= 1
            self.done = split == self.chunks  # nothing over the limit could be split
            self.chunks = split

    def over_limit(self) -> list[Chunk]:
        """The chunks counted over the limit (after the last round: those the model cuts)."""
        return [c for c in self.chunks if self.counts.get(c.text, 0) > self.limit]


def document_title(text: str, fallback: str) -> str:
    for raw in text.splitlines():
        match = _HEADING.match(raw.strip())
        if match:
            return match.group(2)
    return fallback
