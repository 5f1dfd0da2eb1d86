"""corpus/load_questions.csv is a load-test workload that is new, large and covers every page."""

from __future__ import annotations

import csv
import re
from collections import Counter

from loadtest.httpload import read_questions
from tests.conftest import REPO_ROOT

CORPUS = REPO_ROOT / "corpus"
LOAD_QUESTIONS = CORPUS / "load_questions.csv"
HANDBOOK = CORPUS / "handbook"


def normalise(question: str) -> str:
    """Case, whitespace and punctuation do not make a question new (nor miss a cache)."""
    return re.sub(r"[\W_]+", " ", question.lower()).strip()


def rows() -> list[dict[str, str]]:
    with LOAD_QUESTIONS.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["question", "expected_source"]
        return list(reader)


def test_load_questions_parse_as_a_question_csv_with_hundreds_of_distinct_questions() -> None:
    questions = read_questions(LOAD_QUESTIONS)
    assert len(questions) >= 500
    assert len(questions) == len(rows())  # no row dropped as blank by the reader
    repeated = [q for q, n in Counter(map(normalise, questions)).items() if n > 1]
    assert not repeated


def test_load_questions_share_none_with_the_other_question_sets() -> None:
    others = [CORPUS / "questions.csv", *sorted((CORPUS / "answer_quality").glob("*.csv"))]
    assert len(others) >= 3
    seen = {normalise(q) for path in others for q in read_questions(path)}
    overlap = [q for q in read_questions(LOAD_QUESTIONS) if normalise(q) in seen]
    assert not overlap


def test_load_questions_cover_every_handbook_page_and_name_only_real_ones() -> None:
    pages = {p.name for p in HANDBOOK.glob("*.md")}
    assert len(pages) == 30
    sources = [r["expected_source"].strip() for r in rows()]
    named = Counter(s for s in sources if s)
    assert set(named) <= pages, set(named) - pages
    thin = {p: named[p] for p in pages if named[p] < 10}
    assert not thin
    # A few unanswerable questions, as real users ask, but not enough to skew the workload.
    unanswerable = sources.count("")
    assert 0 < unanswerable <= len(sources) // 10


def test_locustfile_defaults_to_the_load_questions() -> None:
    source = (REPO_ROOT / "loadtest" / "locustfile.py").read_text()
    assert '"corpus" / "load_questions.csv"' in source
