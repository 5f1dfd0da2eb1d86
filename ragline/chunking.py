"""Split documents into overlapping passages that respect headings and paragraphs.

Sizes are counted in words, a close, model-independent proxy for tokens (English text averages
about 1.3 WordPiece tokens per word, so the 160-word default stays under MiniLM's 256-token
limit). Each chunk remembers the heading it sits under, so a passage cut from the middle of a
page still says what the page is about.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_HEADING = re.compile(r"^(#{1,6})\s+(.*\S)\s*$")


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

    def __post_init__(self) -> None:
        if self.max_words < 8:
            raise ValueError("max_words must be at least 8")
        if not 0 <= self.overlap_words < self.max_words // 2:
            raise ValueError("overlap_words must be >= 0 and less than half of max_words")


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


def document_title(text: str, fallback: str) -> str:
    for raw in text.splitlines():
        match = _HEADING.match(raw.strip())
        if match:
            return match.group(2)
    return fallback
