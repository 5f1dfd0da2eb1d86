"""The chat page as the edge serves it: HTML at ``/`` without a key (the data routes still want
one), only same-origin files, each with its type, and all of them packaged. The page's
behaviour in a browser is tests/integration/test_chat_page.py."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from services.api.app import create_app
from services.api.page import STATIC
from services.api.settings import ApiSettings
from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(create_app(ApiSettings(api_keys="k")))  # no lifespan: no stages needed


class References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href", "action") and v]


def test_the_page_is_served_at_the_root_without_a_key(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<select id="collection">' in r.text and 'type="file"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/collections").status_code == 401  # the page is open, the data is not


def test_everything_the_page_loads_comes_from_the_edge(client: TestClient) -> None:
    refs = References()
    refs.feed(client.get("/").text)
    assert {"/static/chat.js", "/static/chat.css"} <= set(refs.urls)
    types = {".js": "text/javascript", ".css": "text/css"}
    for url in refs.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        r = client.get(url)
        assert r.status_code == 200, url
        assert r.headers["content-type"].startswith(types[url[url.rindex(".") :]]), url
    for path in STATIC.iterdir():
        found = re.findall(r"(?:https?:)?//[\w.-]+\.\w", path.read_text())
        assert not found, f"{path.name} refers to another origin: {found}"


def test_only_the_page_files_are_served(client: TestClient) -> None:
    assert client.get("/static/nope.js").status_code == 404
    assert client.get("/static/..%2Fpage.py").status_code == 404
    assert client.get("/static/../page.py").status_code == 404


def test_a_non_editable_install_carries_the_page() -> None:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["services"]
    for path in STATIC.iterdir():
        inside = str(path.relative_to(REPO_ROOT / "services"))
        assert any(fnmatch.fnmatch(inside, p) for p in patterns), f"{inside} is not packaged"
