import math
from pathlib import Path

import pytest

from ragline.chunking import (
    MAX_FIT_ROUNDS,
    Chunk,
    ChunkingPolicy,
    TokenFit,
    chunk_text,
    document_title,
    split_to_fit,
)

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "handbook"
POSTFIX = Path(__file__).resolve().parents[2] / "corpus" / "debian" / "postfix-doc"


def test_paragraphs_stay_whole_and_carry_their_heading() -> None:
    text = "# Leave\n\n## Annual\nYou get 25 days.\n\nCarry over 5.\n\n## Sick\nCall your manager."
    chunks = chunk_text(text, ChunkingPolicy(max_words=50, overlap_words=5))
    assert [c.heading for c in chunks] == ["Leave > Annual", "Leave > Sick"]
    assert chunks[0].text == "Leave > Annual\nYou get 25 days. Carry over 5."
    assert [c.index for c in chunks] == [0, 1]


def test_long_paragraph_is_split_with_overlap() -> None:
    words = [f"w{i}" for i in range(100)]
    chunks = chunk_text(" ".join(words), ChunkingPolicy(max_words=40, overlap_words=10))
    bodies = [c.text.split() for c in chunks]
    assert all(len(b) <= 40 for b in bodies)
    assert bodies[0][-10:] == bodies[1][:10], "consecutive chunks overlap"
    covered = {w for b in bodies for w in b}
    assert covered == set(words), "no word is lost"


def test_empty_and_whitespace_documents_have_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text("\n\n   \n# Only a heading\n") == []


@pytest.mark.parametrize(
    "bad", [dict(max_words=4), dict(max_words=20, overlap_words=10), dict(max_tokens=-1)]
)
def test_policy_rejects_nonsense(bad) -> None:
    with pytest.raises(ValueError):
        ChunkingPolicy(**bad)


def test_sample_corpus_chunks_fit_the_embedding_model() -> None:
    pages = sorted(CORPUS.glob("*.md"))
    assert len(pages) >= 24, "the sample handbook has a few dozen pages"
    for page in pages:
        text = page.read_text()
        chunks = chunk_text(text)
        assert chunks, page.name
        # 160 words + heading stays well under MiniLM's 256 tokens
        assert all(len(c.text.split()) <= 180 for c in chunks), page.name
        assert document_title(text, "x") != "x", f"{page.name} has a # title"


# --- chunks sized in model tokens ------------------------------------------------------------
def fake_count(texts: list[str]) -> list[int]:
    """A stand-in tokenizer: one token per 4 characters, plus [CLS] and [SEP]."""
    return [math.ceil(len(t) / 4) + 2 for t in texts]


def fit(chunks: list[Chunk], limit: int, count=fake_count) -> tuple[list[Chunk], int]:
    """Drive TokenFit as ingestion does; also return how many count calls it made."""
    fitter, calls = TokenFit(chunks, limit), 0
    while texts := fitter.to_count():
        calls += 1
        fitter.counted(count(texts))
    return fitter.chunks, calls


def body_words(chunks: list[Chunk]) -> list[str]:
    return [w for c in chunks for w in c.text.split("\n", 1)[-1].split()]


CODE = "\n".join(
    f"smtpd_param_{i}_restrictions = /etc/postfix/maps/value_{i}.cf" for i in range(40)
)


def test_over_long_chunks_are_split_to_fit_keeping_heading_and_words() -> None:
    text = "# Postfix\n\n## Parameters\n\nA short intro.\n\n" + CODE + "\n\n## Next\n\nTail."
    chunks = chunk_text(text, ChunkingPolicy(max_words=160, overlap_words=30))
    meta = Chunk(0, "", "x", {"k": "v"}).metadata
    chunks = [Chunk(c.index, c.text, c.heading, meta) for c in chunks]
    assert max(fake_count([c.text for c in chunks])) > 200, "the code paragraph is over"

    fitted, calls = fit(chunks, 100)
    assert all(n <= 100 for n in fake_count([c.text for c in fitted]))
    assert [c.index for c in fitted] == list(range(len(fitted)))
    assert body_words(fitted) == body_words(chunks), "no word lost, none repeated, in order"
    for c in fitted:
        assert c.text.startswith(f"{c.heading}\n") and c.metadata == {"k": "v"}
    pieces = [c for c in fitted if c.heading == "Postfix > Parameters"]
    assert len(pieces) >= 3 and fitted[-1].text == "Postfix > Next\nTail."
    # About equal pieces rather than full ones and a scrap.
    sizes = [len(c.text) for c in pieces]
    assert min(sizes) > max(sizes) / 3, sizes
    assert calls <= 3, "the density estimate gets there in few rounds"


def test_chunks_that_fit_come_back_unchanged() -> None:
    chunks = chunk_text("# A\n\nOne two three.\n\n# B\n\nFour five.")
    counts = fake_count([c.text for c in chunks])
    assert split_to_fit(chunks, counts, max(counts)) == chunks
    assert fit(chunks, 256) == (chunks, 1)


def test_cuts_fall_between_sentences_first() -> None:
    sentences = [f"Sentence number {i} says something about mail relay." for i in range(12)]
    chunk = Chunk(0, "Relay\n" + " ".join(sentences), "Relay")
    (count,) = fake_count([chunk.text])
    pieces = split_to_fit([chunk], [count], count // 2)
    assert len(pieces) >= 2
    for p in pieces:
        body = p.text.removeprefix("Relay\n")
        assert body.startswith("Sentence") and body.endswith("relay."), body


def test_a_sentence_too_long_alone_is_cut_between_words() -> None:
    words = [f"word{i:03d}" for i in range(200)]
    chunk = Chunk(0, " ".join(words) + ".")
    (count,) = fake_count([chunk.text])
    pieces = split_to_fit([chunk], [count], 60)
    assert len(pieces) > 2 and body_words(pieces) == body_words([chunk])
    assert all(len(p.text) <= 60 * len(chunk.text) / count for p in pieces)


def test_an_unsplittable_chunk_is_kept_and_fitting_stops() -> None:
    blob = Chunk(0, "Keys\n" + "A" * 2000, "Keys")
    fitter = TokenFit([blob, Chunk(1, "Keys\nshort one", "Keys")], 100)
    texts = fitter.to_count()
    fitter.counted(fake_count(texts))
    assert fitter.to_count() == [] and fitter.chunks == [blob, Chunk(1, "Keys\nshort one", "Keys")]
    assert fitter.over_limit() == [blob], "what the model will truncate is known"


def test_fitting_is_bounded_and_counts_each_text_once() -> None:
    seen: list[str] = []

    def never_fits(texts: list[str]) -> list[int]:
        assert not set(texts) & set(seen), "a text is counted once"
        seen.extend(texts)
        return [190] * len(texts)  # near twice the limit whatever the length: halves a round

    chunks = [Chunk(0, " ".join(f"w{i:03d}" for i in range(500)))]
    fitted, calls = fit(chunks, 100, never_fits)
    assert calls == MAX_FIT_ROUNDS + 1 and body_words(fitted) == body_words(chunks)
    assert 2 ** (MAX_FIT_ROUNDS - 1) < len(fitted) < 500, "split every round, stopped before words"


def test_the_limit_is_the_smaller_of_policy_and_model() -> None:
    chunks = [Chunk(0, " ".join(["parameter_name"] * 100))]  # about 377 fake tokens
    for policy, model, bound in [(0, 200, 200), (300, 200, 200), (150, 200, 150)]:
        fitter = TokenFit(chunks, policy)
        while texts := fitter.to_count():
            fitter.counted(fake_count(texts), model)
        assert fitter.limit == bound
        assert max(fake_count([c.text for c in fitter.chunks])) <= bound


def test_real_code_heavy_docs_fit_a_token_limit() -> None:
    pages = sorted(POSTFIX.glob("*_README.txt"))[:8]
    assert pages, "the Debian postfix-doc corpus is in the repository"
    for page in pages:
        chunks = chunk_text(page.read_text())
        fitted, calls = fit(chunks, 240)
        assert all(n <= 240 for n in fake_count([c.text for c in fitted])), page.name
        assert body_words(fitted) == body_words(chunks) and calls <= 4, page.name


# --- html and pdf -------------------------------------------------------------------------------
HTML = """<!doctype html><html><head><title>Travel policy</title><style>p{color:red}</style>
<script>var x = "<h1>not a heading</h1>";</script></head>
<body><nav><a href="/">Home</a> | <a href="/hr">HR</a></nav>
<h1>Travel</h1><p>Book trains for trips under 4 hours.</p>
<h2>Hotels</h2><p>Up to &euro;150 a night,
  breakfast included.</p><ul><li>Use the portal.</li><li>Keep receipts.</li></ul>
<h2>Meals</h2><div>Per diem of 40 &amp; no alcohol.</div></body></html>"""


def test_html_headings_and_paragraphs_become_sections() -> None:
    from ragline.documents import decode_document

    text = decode_document(HTML.encode(), "travel.html")
    assert "not a heading" not in text and "color" not in text and "Home" not in text
    chunks = chunk_text(text, ChunkingPolicy(max_words=50, overlap_words=5))
    assert [c.heading for c in chunks] == ["Travel", "Travel > Hotels", "Travel > Meals"]
    assert chunks[1].text == (
        "Travel > Hotels\nUp to €150 a night, breakfast included. Use the portal. Keep receipts."
    )
    assert chunks[2].text.endswith("Per diem of 40 & no alcohol.")
    assert document_title(text, "x") == "Travel"
    # No <h1>: the <title> names the document.
    bare = decode_document(b"<title>Only title</title><p>Body text.</p>", "b.htm")
    assert document_title(bare, "x") == "Only title"


def _pdf(pages: list[list[str]], outline: list[tuple[str, int]], title: str) -> bytes:
    """A real PDF (Helvetica text, one line per string) with bookmarks and a title."""
    import io

    from pypdf import PdfReader, PdfWriter

    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 "
               "/BaseFont /Helvetica >>"]  # fmt: skip
    kids = []
    for lines in pages:
        ops = ["BT /F1 11 Tf 14 TL 72 760 Td"]
        ops += [f"({line}) Tj T*" if line else "T*" for line in lines] + ["ET"]
        stream = "\n".join(ops)
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R"
            " /Resources << /Font << /F1 3 0 R >> >> >>"
        )
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(out)))
    for text, page in outline:
        writer.add_outline_item(title=text, page_number=page)
    writer.add_metadata({"/Title": title})
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def test_pdf_pages_bookmarks_and_paragraphs() -> None:
    from ragline.documents import decode_document

    pdf = _pdf(
        [
            ["Staff must book travel through the portal and keep every", "receipt for audit.",
             "", "Trains are preferred for trips under four hours."],
            ["Expense claims are due within thirty days of the trip, signed", "by a manager."],
        ],
        [("Booking", 0), ("Claims", 1)],
        "Travel handbook",
    )  # fmt: skip
    text = decode_document(pdf, "handbook.pdf")
    chunks = chunk_text(text, ChunkingPolicy(max_words=60, overlap_words=5))
    assert document_title(text, "x") == "Travel handbook"
    assert [c.heading for c in chunks] == ["Travel handbook > Booking", "Travel handbook > Claims"]
    assert "keep every receipt for audit. Trains are preferred" in chunks[0].text
    assert chunks[1].text.endswith("within thirty days of the trip, signed by a manager.")


@pytest.mark.parametrize(
    ("data", "name", "fragment"),
    [
        (b"not a pdf at all", "x.pdf", "not a readable PDF"),
        (b"%PDF-1.4\n%%EOF", "y.pdf", "not a readable PDF"),
        (b"\xff\xfe<p>x</p>", "z.html", "not valid UTF-8"),
        (b"data", "sheet.xlsx", "upload one of .txt, .md, .markdown, .html, .htm, .pdf"),
    ],
)
def test_unreadable_documents_say_what_to_fix(data, name, fragment) -> None:
    from ragline.documents import decode_document
    from ragline.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=fragment):
        decode_document(data, name)


def test_pdf_without_text_asks_for_ocr() -> None:
    from ragline.documents import decode_document
    from ragline.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="needs OCR"):
        decode_document(_pdf([[""]], [], ""), "scan.pdf")
