"""The answer-quality benchmark's scoring, on hand-made /chat responses, and its question sets."""

from __future__ import annotations

import math
import re

import pytest

from benchmarks import answer_quality as aq

LEAVE = "annual-leave.md"
DAYS = r"\b27\b|twenty[\s-]seven"  # h001
BUY = r"(?s)(?=.*(\b3\b|\bthree\b))(?=.*november)"  # h004
NOT_EURO = (  # h015: a "no" verdict and a place
    r"(?s)^(?!\W*yes\b)(?=.*(\bno\b|\bnot\b|\bnever\b|cannot|n['’]t\b|\bonly\b))"
    r"(?=.*(euro\s*(area|zone)|eurozone))"
)


def q(pattern: str = DAYS, source: str = LEAVE, answerable: bool = True) -> aq.Question:
    kind = "number" if answerable else "unanswerable"
    return aq.Question("x1", "tune", "how many days?", answerable, source, pattern, kind)


def passage(pid: str, text: str, source: str | None = None) -> dict:
    return {"id": pid, "score": 0.7, "text": text,
            "metadata": {"source": source or pid.split("#")[0], "title": "t"}}  # fmt: skip


ALLOWANCE = passage(f"{LEAVE}#0", "Full-time staff get 27 days of annual leave a year.")
CANTEEN = passage("office-locations.md#2", "The canteen opens at 12:00.")
BUY_DAYS = passage(f"{LEAVE}#3", "You can buy up to 3 extra days a year.")
BUY_WHEN = passage(f"{LEAVE}#4", "Requests to buy days close on 30 November.")


def test_right_answer_is_correct_and_precisely_cited():
    body = {"answer": "Answer: Full-time staff get 27 days [annual-leave.md#0].",
            "sources": [ALLOWANCE, CANTEEN]}  # fmt: skip
    s = aq.score_answer(q(), body)
    assert s == aq.Score("correct", extractive=False, cited=1, cited_text_ok=1, cited_page_ok=1)


def test_wrong_number_is_wrong_even_with_the_right_number_nearby():
    for said in ("You get 25 days [annual-leave.md#0].", "You get 127 days."):
        assert aq.score_answer(q(), {"answer": said, "sources": [ALLOWANCE]}).outcome == "wrong"


def test_refusal_on_an_answerable_row_is_a_false_refusal():
    flagged = {"answer": "The documents don't say.", "not_found": True, "sources": [],
               "closest": [ALLOWANCE]}  # fmt: skip
    assert aq.score_answer(q(), flagged).outcome == "false_refusal"
    # not_found wins over a fact that only the closest passages (echoed in the text) hold
    echoed = {**flagged, "answer": "Not found; the closest page says 27 days."}
    assert aq.score_answer(q(), echoed).outcome == "false_refusal"
    # an edge without the flag: the wording decides
    unflagged = {"answer": "The handbook does not mention it.", "sources": [ALLOWANCE]}
    assert aq.score_answer(q(), unflagged).outcome == "false_refusal"


def test_a_right_fact_beside_refusal_wording_is_correct_without_the_flag():
    body = {"answer": "27 days; carry-over is not covered here [annual-leave.md#0].",
            "sources": [ALLOWANCE]}  # fmt: skip
    assert aq.score_answer(q(), body).outcome == "correct"


def test_refusal_wording_does_not_pass_a_no_verdict_pattern():
    no_verdict = r"(?s)^(?!\W*yes\b).*(\bno\b|\bnot\b|\bnever\b|cannot|n['’]t\b|prohibit|forbid)"
    row = q(no_verdict)
    for refusal in ("I do not know.", "The handbook doesn't mention that.", "I'm not sure."):
        assert aq.score_answer(row, {"answer": refusal}).outcome == "false_refusal", refusal
    flagged = {"answer": "The sources do not mention it.", "not_found": False}
    assert aq.score_answer(row, flagged).outcome == "wrong"
    assert aq.score_answer(row, {"answer": "No, that is not allowed."}).outcome == "correct"
    # "not include" is an answer, not "not in" the documents
    assert not aq.refused({"answer": "The plan does not include dental cover."})


def test_refusals_on_unanswerable_rows():
    row = q("", "", answerable=False)
    assert aq.score_answer(row, {"answer": "x", "not_found": True}).outcome == "refused"
    assert aq.score_answer(row, {"answer": "I don't know."}).outcome == "refused"
    assert aq.score_answer(row, {"answer": "It is EUR 40 a day."}).outcome == "answered"
    # an edge that sends the flag is believed over the wording
    said = {"answer": "I don't know.", "not_found": False}
    assert aq.score_answer(row, said).outcome == "answered"
    assert aq.score_answer(row, None).outcome == "error"


def test_extractive_right_answers_are_counted_apart():
    extractive = {"answer": '"Full-time staff get 27 days of annual leave a year." '
                  "[annual-leave.md#0]", "extractive": True, "sources": [ALLOWANCE],
                  "citations": [{"id": f"{LEAVE}#0", "quote": "27 days"}]}  # fmt: skip
    generated = {"answer": "27 days.", "sources": [ALLOWANCE]}
    records = [
        {**vars(aq.score_answer(q(), b)), "answerable": True, "latency_ms": ms,
         "hit1": True, "hit5": True, "retrieved": 4}
        for b, ms in ((extractive, 10.0), (generated, 30.0))
    ]  # fmt: skip
    s = aq.summarize(records)
    assert (s["correct"], s["extractive_right"], s["generated_right"]) == (2, 1, 1)
    assert s["uncited"] == 1 and s["cited_rows"] == 1 and s["citations"] == 1
    assert s["cited_text_precision"] == 1.0 and s["p50_ms"] == 10.0 and s["p95_ms"] == 30.0


def test_citation_precision_counts_each_cited_passage():
    body = {"answer": "27 days [annual-leave.md#0][office-locations.md#2].",
            "sources": [ALLOWANCE, CANTEEN]}  # fmt: skip
    s = aq.score_answer(q(), body)
    assert (s.cited, s.cited_text_ok, s.cited_page_ok) == (2, 1, 1)
    # the fact on a page other than the expected one: text precise, page not
    elsewhere = passage("payroll.md#1", "Leave: 27 days.")
    assert aq.citation_precision(DAYS, LEAVE, [elsewhere]) == (1, 0)


def test_the_edges_citations_win_over_markers_and_unknown_ids_hold_nothing():
    body = {"answer": "27 days [office-locations.md#2].", "sources": [ALLOWANCE, CANTEEN],
            "citations": [{"id": f"{LEAVE}#0"}, {"id": "ghost.md#9"}]}  # fmt: skip
    assert [p["id"] for p in aq.cited_passages(body)] == [f"{LEAVE}#0", "ghost.md#9"]
    s = aq.score_answer(q(), body)
    assert (s.cited, s.cited_text_ok, s.cited_page_ok) == (2, 1, 1)
    assert aq.cited_passages({**body, "citations": []}) == []


def test_markers_name_sources_several_per_bracket_or_a_whole_page():
    body = {"answer": "See [annual-leave.md#0, office-locations.md#2] and [1] and [annual-leave.md]"
            " again [annual-leave.md#0].", "sources": [ALLOWANCE, CANTEEN, BUY_DAYS]}  # fmt: skip
    ids = [p["id"] for p in aq.cited_passages(body)]
    # "[1]" names no source; the page marker adds that page's other passage; no repeats
    assert ids == [f"{LEAVE}#0", "office-locations.md#2", f"{LEAVE}#3"]


def test_two_fact_citations_hold_the_fact_together_and_each_one_part():
    assert aq.fact_parts(BUY) == [r"(?s).*(\b3\b|\bthree\b)", "(?s).*november"]
    both = [BUY_DAYS, BUY_WHEN]
    assert aq.citation_precision(BUY, LEAVE, both) == (2, 2)
    # an irrelevant extra citation still counts against precision
    assert aq.citation_precision(BUY, LEAVE, [*both, CANTEEN]) == (2, 2)
    # one half of the facts alone holds nothing
    assert aq.citation_precision(BUY, LEAVE, [BUY_DAYS]) == (0, 1)
    right = {"answer": "Up to three days, by 30 November [annual-leave.md#3] [annual-leave.md#4].",
             "sources": both}  # fmt: skip
    assert aq.score_answer(q(BUY), right).outcome == "correct"
    half = {"answer": "Up to three days [annual-leave.md#3].", "sources": both}
    assert aq.score_answer(q(BUY), half).outcome == "wrong"


def test_fact_parts_of_one_fact_and_verdict_patterns():
    assert aq.fact_parts(DAYS) == []
    assert aq.fact_parts(r"(?s)^(?!\W*yes\b)(?=.*(\b90\b|ninety))") == []  # h028: one fact
    assert len(aq.fact_parts(NOT_EURO)) == 2
    # a bracket inside a character class opens no group
    assert aq.fact_parts(r"(?=.*[(])(?=.*\))") == [".*[(]", r".*\)"]


def test_verdict_patterns_see_the_answer_without_its_wrapper():
    assert aq.answer_text("**Answer:** No, only in the euro area.") == "No, only in the euro area."
    assert aq.score_answer(q(NOT_EURO), {"answer": "Answer: No, only the euro area."}).outcome == (
        "correct"
    )
    wrong = {"answer": "Answer: Yes, but not outside the euro area."}
    assert aq.score_answer(q(NOT_EURO), wrong).outcome == "wrong"


def test_ranked_pages_use_closest_when_not_found():
    assert aq.ranked_pages({"sources": [CANTEEN, ALLOWANCE]}) == ["office-locations.md", LEAVE]
    refused = {"not_found": True, "sources": [], "closest": [ALLOWANCE]}
    assert aq.ranked_pages(refused) == [LEAVE]
    assert aq.ranked_pages(None) == []


def test_percentile_and_empty_summaries():
    assert aq.percentile([5, 1, 4, 2, 3], 50) == 3
    assert aq.percentile(list(range(1, 101)), 95) == 95
    assert math.isnan(aq.percentile([], 50))
    s = aq.summarize([])
    assert s["answerable"] == 0 and math.isnan(s["hit1"])
    assert "-" in aq.format_table("tune", {"gen": s})


def test_parse_config():
    assert aq.parse_config("auto-t35:answerer=auto,score_threshold=0.35,top_k=5") == (
        "auto-t35",
        {"answerer": "auto", "score_threshold": 0.35, "top_k": 5},
    )
    assert aq.parse_config("extractive") == ("extractive", {"answerer": "extractive"})
    for bad in ("x:answerer", "x:temprature=0", "nameless"):
        with pytest.raises(ValueError):
            aq.parse_config(bad)


# ------------------------------------------------------------- the question sets themselves

# Rows whose fact pattern need not appear on the expected page, and why.
NOT_ON_PAGE = {
    "h054": "a computed answer: the page gives the pro-rata rule and an 8-month example, the "
    "question's 6 months of EUR 1,800 works out to half (EUR 900)",
}
SETS = {
    name: (aq.load_questions(aq.QUESTION_DIR / f"{name}.csv"), directory)
    for name, (directory, _) in aq.CORPORA.items()
}
ROWS = [(row, directory) for rows, directory in SETS.values() for row in rows]


@pytest.mark.parametrize("row,directory", ROWS, ids=[r.id for r, _ in ROWS])
def test_fact_pattern_compiles_and_matches_its_page(row, directory):
    if not row.answerable:
        assert row.fact_pattern == row.expected_source == "" and row.kind == "unanswerable"
        return
    re.compile(row.fact_pattern)
    for part in aq.fact_parts(row.fact_pattern):
        re.compile(part)
    page = directory / row.expected_source
    assert page.is_file(), f"{row.id}: no page {page}"
    on_page = aq.holds_fact(row.fact_pattern, page.read_text(encoding="utf-8"))
    # an allowlisted row that starts matching its page is a stale entry
    assert on_page is (row.id not in NOT_ON_PAGE), NOT_ON_PAGE.get(row.id, row.fact_pattern)


def test_question_sets_are_whole():
    for name, (rows, directory) in SETS.items():
        assert len({r.id for r in rows}) == len(rows), name
        assert {r.split for r in rows} == {"tune", "heldout"}, name
        documents = {p.name for p in directory.glob(aq.CORPORA[name][1])}
        assert {r.expected_source for r in rows if r.answerable} <= documents, name
    assert set(NOT_ON_PAGE) <= {r.id for r, _ in ROWS}
