"""The chat page in a real headless browser (Debian's chromium and chromedriver, driven by
selenium) against the real stack: it asks for the key the edge wants, lists the knowledge
bases, streams an answer with its cited passage, shows a not-found answer as such, and uploads
a document that then shows in the collection's list. One edge with an API key for the module;
answers are extractive (no LLM), which keeps it quick.

``RAGLINE_CHAT_SCREENSHOT=docs/img/chat-page.png`` saves the README's screenshot after the
answer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO_ROOT, Pipeline

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # the test extra is not installed; chromium() says what is missing
    webdriver = None

pytestmark = pytest.mark.slow

KEY = "page-test-key"
HANDBOOK = ("annual-leave.md", "sick-leave.md", "remote-work.md", "parental-leave.md",
            "holidays-calendar.md", "learning-budget.md")  # fmt: skip
QUESTION = "How many days of paid annual leave does a full-time employee get per year?"
WAIT_S = 60


def chromium() -> tuple[str, str]:
    """chromedriver and the browser; without them the tests skip, except in CI, where `make
    install-test` installs them, so there a missing one is a failure."""
    driver = shutil.which("chromedriver")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if driver and browser and webdriver is not None:
        return driver, browser
    why = ("the chat page's test needs selenium (the test extra), chromium and chromedriver: "
           "`make install-test` installs them")  # fmt: skip
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    driver_path, browser_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,800"):  # fmt: skip
        options.add_argument(arg)
    # An explicit driver: Selenium Manager would go to the network to find one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def stack(base_env, tmp_path_factory):
    env = {**base_env, "RAGLINE_DATA_DIR": str(tmp_path_factory.mktemp("page-data")),
           "RAGLINE_API_ANSWERER": "extractive", "RAGLINE_API_API_KEYS": KEY}  # fmt: skip
    # The default relevance floor, so that a question the documents do not answer is not found.
    del env["RAGLINE_API_SCORE_THRESHOLD"]
    stack = Pipeline(env, tmp_path_factory.mktemp("page-logs"))
    try:
        auth = {"Authorization": f"Bearer {KEY}"}
        for name in HANDBOOK:
            text = (REPO_ROOT / "corpus" / "handbook" / name).read_text()
            r = httpx.post(f"{stack.url}/documents", json={"text": text, "document_id": name},
                           headers=auth, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
        yield stack
    finally:
        stack.stop()


def wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"the page never showed {what}"
    )


def text_of(driver, css: str) -> str:
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))


@pytest.fixture
def page(browser, stack):
    """The page, loaded with the key already entered and the knowledge bases listed."""
    browser.get(f"{stack.url}/")
    browser.execute_script("localStorage.clear(); localStorage.setItem(arguments[0], arguments[1])",
                           "ragline.apiKey", KEY)  # fmt: skip
    browser.refresh()
    wait(browser, lambda d: "annual-leave.md" in text_of(d, "#documents"), "the documents")
    return browser


def ask(driver, question: str) -> None:
    box = driver.find_element(By.ID, "query")
    box.clear()
    box.send_keys(question)
    driver.find_element(By.ID, "ask").click()


def test_the_page_asks_for_the_key_and_then_lists_the_knowledge_bases(browser, stack) -> None:
    browser.get(f"{stack.url}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait(browser, lambda d: "needs an API key" in text_of(d, "#notice"), "the 401 message")
    assert text_of(browser, "#documents") == ""
    browser.find_element(By.ID, "api-key").send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
    wait(browser, lambda d: "annual-leave.md" in text_of(d, "#documents"), "the documents")
    options = browser.find_elements(By.CSS_SELECTOR, "#collection option")
    assert [o.get_attribute("value") for o in options] == ["default"]
    assert f"{len(HANDBOOK)} documents" in options[0].text
    assert not browser.find_element(By.ID, "notice").is_displayed()
    assert browser.execute_script("return localStorage.getItem('ragline.apiKey')") == KEY


def test_a_question_streams_its_answer_and_marks_the_cited_source(page) -> None:
    # Every state the answer box goes through, to see text arrive while it still streams.
    page.execute_script("""
        window.seen = [];
        const answer = document.getElementById('answer');
        new MutationObserver(() => window.seen.push([answer.textContent, answer.className]))
            .observe(answer, {childList: true, characterData: true, subtree: true,
                              attributes: true});
    """)
    ask(page, QUESTION)
    wait(page, lambda d: d.find_element(By.ID, "ask").is_enabled(), "the answer finished")
    cited = text_of(page, "#sources li.cited .source")
    assert "annual-leave.md" in cited
    assert "27" in text_of(page, "#answer")
    seen = page.execute_script("return window.seen")
    assert any("27" in text and "streaming" in cls for text, cls in seen), seen
    assert "streaming" not in page.find_element(By.ID, "answer").get_attribute("class")
    if shot := os.environ.get("RAGLINE_CHAT_SCREENSHOT"):
        page.save_screenshot(str(REPO_ROOT / shot))


def test_a_follow_up_is_asked_with_the_conversation_before_it(page) -> None:
    def answered(d) -> bool:
        return d.find_element(By.ID, "ask").is_enabled() and text_of(d, "#answer-note") != ""

    ask(page, QUESTION)
    wait(page, answered, "the first answer")
    assert text_of(page, "#conversation") == QUESTION
    ask(page, "And how many of them can I carry over?")  # alone it finds nothing (below 0.35)
    wait(page, lambda d: answered(d) and "follow-up" in text_of(d, "#answer-note"),
         "the follow-up's answer")  # fmt: skip
    assert "5" in text_of(page, "#answer") and "annual-leave.md" in text_of(page, "#sources")
    page.find_element(By.ID, "new-conversation").click()
    assert text_of(page, "#conversation") == ""
    ask(page, "And how many of them can I carry over?")
    wait(page, lambda d: "not-found" in d.find_element(By.ID, "answer").get_attribute("class"),
         "a not-found answer once the conversation is new")  # fmt: skip


def test_a_question_the_documents_do_not_answer_is_shown_as_not_found(page) -> None:
    ask(page, "Which planet has the most moons in the solar system?")
    wait(page, lambda d: "not-found" in d.find_element(By.ID, "answer").get_attribute("class"),
         "a not-found answer")  # fmt: skip
    assert "could not find" in text_of(page, "#answer")
    assert "Closest passages" in text_of(page, "#sources-title")
    assert not page.find_elements(By.CSS_SELECTOR, "#sources li.cited")


def test_an_uploaded_document_shows_in_a_new_collection(page, tmp_path: Path) -> None:
    page.find_element(By.ID, "new-collection").send_keys("notes")
    page.find_element(By.CSS_SELECTOR, "#new-collection-form button").click()
    wait(page, lambda d: d.find_element(By.ID, "collection").get_attribute("value") == "notes"
         and text_of(d, "#documents") == "", "the new, empty collection chosen")  # fmt: skip
    doc = tmp_path / "parking.md"
    doc.write_text("# Parking\n\nThe staff car park opens at 7:00 and closes at 20:00.\n")
    page.find_element(By.ID, "file").send_keys(str(doc))
    page.find_element(By.ID, "upload").click()
    wait(page, lambda d: "parking.md: ingested" in text_of(d, "#upload-result"), "the upload")
    wait(page, lambda d: "parking.md" in text_of(d, "#documents"), "the new document")
    assert "notes (1 document)" in text_of(page, "#collection option")
    ask(page, "When does the staff car park open?")
    wait(page, lambda d: "parking.md" in text_of(d, "#sources li.cited .source"), "the citation")
    assert "7:00" in text_of(page, "#answer")


# A canned /chat stream, cut into pieces that split events, lines and a CRLF, as a proxy may.
CANNED_FETCH = """
    const pieces = arguments[0];
    const real = window.fetch;
    window.fetch = (path, options) => {
        if (path !== '/chat') return real(path, options);
        const body = new ReadableStream({start(c) {
            for (const p of pieces) c.enqueue(new TextEncoder().encode(p));
            c.close();
        }});
        const headers = {'Content-Type': 'text/event-stream'};
        return Promise.resolve(new Response(body, {headers}));
    };
"""


def sse(*events: tuple[str, object]) -> list[str]:
    text = "".join(f"event: {e}\r\ndata: {json.dumps(d)}\r\n\r\n" for e, d in events)
    return [text[i : i + 7] for i in range(0, len(text), 7)]


def passage(doc: str, text: str) -> dict:
    return {"id": f"{doc}#0", "score": 0.5, "text": text, "metadata": {"source": doc}}


def test_a_replaced_answer_stands_instead_of_the_streamed_text(page) -> None:
    a, b = passage("a.md", "Staff get 30 days."), passage("b.md", "Staff get 27 days.")
    checked = '"Staff get 27 days." [b.md#0]'
    page.execute_script(CANNED_FETCH, sse(
        ("sources", [a, b]),
        ("token", {"text": "The answer is "}),
        ("token", {"text": "31 days."}),
        ("replace", {"answer": checked, "sources": [b], "citations": [{"id": "b.md#0"}]}),
        ("done", {"citations": [{"id": "b.md#0"}], "not_found": False, "timings_ms": {}}),
    ))  # fmt: skip
    ask(page, "How many days?")
    wait(page, lambda d: "grounding check" in text_of(d, "#answer-note"), "the replaced note")
    assert text_of(page, "#answer") == checked
    assert "b.md" in text_of(page, "#sources li.cited .source")
    assert "a.md" not in text_of(page, "#sources")


def test_an_error_in_the_stream_is_shown(page) -> None:
    page.execute_script(CANNED_FETCH, sse(
        ("sources", []),
        ("token", {"text": "Partial"}),
        ("error", {"code": "unavailable", "message": "generate stage went away: retry"}),
    ))  # fmt: skip
    ask(page, "How many days?")
    wait(page, lambda d: "went away" in text_of(d, "#notice"), "the stream's error")
    assert page.find_element(By.ID, "ask").is_enabled()
