"""Documents as text: decoding uploaded or found files (.txt/.md, .html, .pdf) and finding them.

A file becomes Markdown-like text (headings as ``#`` lines, paragraphs separated by blank lines)
that ``ragline.chunking`` understands; anything else is refused with a message that says what
to send. Shared by the edge's uploads, ``ragline ingest`` and the monolith baseline.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

from ragline.errors import InvalidArgument

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
HTML_SUFFIXES = (".html", ".htm")
PDF_SUFFIXES = (".pdf",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + HTML_SUFFIXES + PDF_SUFFIXES
MAX_PDF_PAGES = 2000


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


def iter_documents(root: Path) -> Iterable[Path]:
    if root.is_file():
        yield root
        return
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in SUPPORTED_SUFFIXES:
            yield path
