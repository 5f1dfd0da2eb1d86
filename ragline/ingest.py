"""Ingestion: chunk documents, embed them as PASSAGE in batches, upsert them by stable id.

Shared by ``POST /documents`` on the edge and ``ragline ingest PATH``. A document's content
hash (of its text and the chunking policy) is recorded by retrieve; re-ingesting an unchanged
document is skipped, and a changed one replaces its chunks in one upsert.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

from opentelemetry import trace

from ragline.chunking import ChunkingPolicy, chunk_text, document_title
from ragline.clients import EmbedClient, RetrieveClient
from ragline.errors import InvalidArgument
from ragline.v1 import embed_pb2, retrieve_pb2

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
MAX_DOCUMENT_ID = 200
MAX_PDF_PAGES = 2000


@dataclass(frozen=True)
class IngestResult:
    document_id: str
    status: str  # "ingested" | "unchanged"
    chunks: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def decode_document(data: bytes, name: str) -> str:
    """Text of an uploaded file as Markdown-like text (headings as ``#`` lines, paragraphs
    separated by blank lines) that the chunker understands; refuse other types clearly."""
    suffix = Path(name).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise InvalidArgument(
            f"unsupported file type {suffix or '(none)'!r} for {name!r}: "
            f"upload one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if suffix in PDF_SUFFIXES:
        return pdf_to_text(data, name)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(
            f"{name!r} is not valid UTF-8 text (byte {exc.start}): re-save it as UTF-8"
        ) from None
    return html_to_text(text) if suffix in HTML_SUFFIXES else text


class _HtmlText(HTMLParser):
    """HTML to Markdown-like text: h1-h6 become ``#`` headings, block elements end paragraphs,
    script/style/head/nav content is dropped."""

    BLOCK = {
        "p", "div", "li", "ul", "ol", "br", "tr", "table", "section", "article", "blockquote",
        "pre", "dd", "dt", "dl", "hr", "header", "footer", "main", "figure", "figcaption",
    }  # fmt: skip
    SKIP = {"script", "style", "head", "nav", "noscript", "template", "svg"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skipping = 0
        self.heading = 0
        self.title: list[str] = []
        self.in_title = False

    def _end_block(self) -> None:
        text = " ".join("".join(self.current).split())
        self.current.clear()
        if text:
            self.lines.append(("#" * self.heading + " " if self.heading else "") + text)
            self.lines.append("")

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self.in_title = True
        if tag in self.SKIP:
            self.skipping += 1
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._end_block()
            self.heading = int(tag[1])
        elif tag in self.BLOCK:
            self._end_block()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif len(tag) == 2 and tag[0] == "h" and tag[1] in "123456":
            self._end_block()
            self.heading = 0
        elif tag in self.BLOCK:
            self._end_block()

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title.append(data)
        elif not self.skipping:
            self.current.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    parser._end_block()
    lines = parser.lines
    title = " ".join("".join(parser.title).split())
    if title and not any(line.startswith("# ") for line in lines):
        lines = [f"# {title}", "", *lines]
    return "\n".join(lines).strip() + "\n"


def pdf_to_text(data: bytes, name: str) -> str:
    """Text of a PDF, page by page, with its outline entries (bookmarks) as headings."""
    import pypdf  # imported on first PDF only
    from pypdf.errors import PdfReadError

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise InvalidArgument(f"{name!r} is encrypted: upload a PDF without a password")
        pages = reader.pages
        if len(pages) > MAX_PDF_PAGES:
            raise InvalidArgument(f"{name!r} has {len(pages)} pages; the limit is {MAX_PDF_PAGES}")
        headings = _pdf_outline(reader)
        out: list[str] = []
        title = (reader.metadata.title if reader.metadata else None) or ""
        if title.strip():
            out += [f"# {' '.join(title.split())}", ""]
        for number, page in enumerate(pages):
            for level, text in headings.get(number, []):
                out += [f"{'#' * min(level + 2, 6)} {text}", ""]
            out += _pdf_paragraphs(page.extract_text() or "")
    except InvalidArgument:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidArgument(f"{name!r} is not a readable PDF ({exc})") from None
    text = "\n".join(out).strip()
    if not any(line and not line.startswith("#") for line in out):
        raise InvalidArgument(
            f"{name!r} has no extractable text (a scanned PDF needs OCR before ingestion)"
        )
    return text + "\n"


def _pdf_outline(reader) -> dict[int, list[tuple[int, str]]]:
    found: dict[int, list[tuple[int, str]]] = {}

    def walk(items, level: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, level + 1)
                continue
            try:
                page = reader.get_destination_page_number(item)
            except Exception:  # a dangling bookmark names no page: skip it
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            if title and page is not None:
                found.setdefault(page, []).append((level, title))

    try:
        walk(reader.outline, 0)
    except Exception:  # outlines are optional and often malformed
        return {}
    return found


def _pdf_paragraphs(text: str) -> list[str]:
    """PDF text lines joined into paragraphs: a blank line, or a line that ends a sentence and is
    clearly shorter than the page's lines, ends a paragraph."""
    lines = [line.strip() for line in text.splitlines()]
    width = max((len(line) for line in lines), default=0)
    out: list[str] = []
    current: list[str] = []
    for line in lines:
        if not line:
            if current:
                out += [" ".join(current), ""]
                current = []
            continue
        if current and current[-1].endswith("-") and line[:1].islower():
            current[-1] = current[-1][:-1] + line  # a word hyphenated across lines
        else:
            current.append(line)
        if line[-1:] in ".!?:" and len(line) < 0.7 * width:
            out += [" ".join(current), ""]
            current = []
    if current:
        out += [" ".join(current), ""]
    return out


def check_document_id(document_id: str) -> str:
    document_id = unicodedata.normalize("NFC", document_id.strip())
    if not document_id:
        raise InvalidArgument("document_id is empty: give the document a stable name")
    if len(document_id) > MAX_DOCUMENT_ID:
        raise InvalidArgument(f"document_id is longer than {MAX_DOCUMENT_ID} characters")
    if any(unicodedata.category(c) == "Cc" for c in document_id):
        raise InvalidArgument("document_id contains control characters")
    return document_id


def content_hash(text: str, policy: ChunkingPolicy, metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([asdict(policy), sorted(metadata.items())]).encode())
    h.update(text.encode("utf-8"))
    return h.hexdigest()


class Ingestor:
    """Turns documents into passages in one collection of the retrieve stage."""

    def __init__(
        self,
        embed: EmbedClient,
        retrieve: RetrieveClient,
        collection: str,
        policy: ChunkingPolicy | None = None,
        embed_batch: int = 32,
        timeout_s: float = 120.0,
    ) -> None:
        self.embed = embed
        self.retrieve = retrieve
        self.collection = collection
        self.policy = policy or ChunkingPolicy()
        self.embed_batch = embed_batch
        self.timeout_s = timeout_s
        self._collection_ready = False

    async def ensure_collection(self) -> None:
        if self._collection_ready:
            return
        info = await self.embed.info(timeout=self.timeout_s)
        await self.retrieve.create_collection(
            self.collection, info.dimension, exist_ok=True, timeout=self.timeout_s
        )
        self._collection_ready = True

    async def ingest_text(
        self, document_id: str, text: str, metadata: dict[str, str] | None = None
    ) -> IngestResult:
        document_id = check_document_id(document_id)
        if not text.strip():
            raise InvalidArgument(f"document {document_id!r} has no text to ingest")
        metadata = {"source": document_id, **(metadata or {})}
        metadata.setdefault("title", document_title(text, Path(document_id).stem))
        digest = content_hash(text, self.policy, metadata)
        with tracer.start_as_current_span("ingest.document") as span:
            span.set_attribute("ragline.document_id", document_id)
            await self.ensure_collection()
            known = await self.retrieve.get_documents(
                self.collection, [document_id], timeout=self.timeout_s
            )
            if document_id in known and known[document_id].content_hash == digest:
                span.set_attribute("ragline.unchanged", True)
                return IngestResult(document_id, "unchanged", known[document_id].chunks)
            chunks = chunk_text(text, self.policy)
            passages: list[retrieve_pb2.Passage] = []
            for start in range(0, len(chunks), self.embed_batch):
                batch = chunks[start : start + self.embed_batch]
                vecs, _ = await self.embed.embed(
                    [c.text for c in batch],
                    kind=embed_pb2.INPUT_KIND_PASSAGE,
                    truncate=True,
                    timeout=self.timeout_s,
                )
                for chunk, vec in zip(batch, vecs, strict=True):
                    meta = dict(metadata)
                    if chunk.heading:
                        meta["heading"] = chunk.heading
                    passages.append(
                        retrieve_pb2.Passage(
                            id=f"{document_id}#{chunk.index}",
                            document_id=document_id,
                            chunk=chunk.index,
                            text=chunk.text,
                            metadata=meta,
                            vector=vec.astype("<f4").tobytes(),
                        )
                    )
            await self.retrieve.upsert(
                self.collection,
                passages,
                [
                    retrieve_pb2.Document(
                        document_id=document_id, content_hash=digest, chunks=len(passages)
                    )
                ],
                timeout=self.timeout_s,
            )
            span.set_attribute("ragline.chunks", len(passages))
            return IngestResult(document_id, "ingested", len(passages))

    async def ingest_paths(
        self,
        root: Path,
        on_progress: Callable[[int, int, IngestResult], None] | None = None,
    ) -> list[IngestResult]:
        """Ingest a file or every supported file under a folder; ids are paths relative to it."""
        files = list(iter_documents(root))
        if not files:
            raise InvalidArgument(f"no {', '.join(SUPPORTED_SUFFIXES)} files under {root}")
        base = root if root.is_dir() else root.parent
        results = []
        for i, path in enumerate(files, 1):
            text = decode_document(path.read_bytes(), path.name)  # html/pdf become text
            result = await self.ingest_text(path.relative_to(base).as_posix(), text)
            results.append(result)
            if on_progress:
                on_progress(i, len(files), result)
        return results


def iter_documents(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES:
            yield path
