from pathlib import Path

import pytest

from ragline.chunking import ChunkingPolicy, chunk_text, document_title

CORPUS = Path(__file__).resolve().parents[2] / "corpus" / "handbook"


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


@pytest.mark.parametrize("bad", [dict(max_words=4), dict(max_words=20, overlap_words=10)])
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
