"""The /chat plan as shipped for JMeter (chat.jmx) and Locust (locustfile.py) matches ours."""

from __future__ import annotations

import ast
import csv
import json
import re
import xml.etree.ElementTree as ET

from loadtest.httpload import read_questions
from tests.conftest import REPO_ROOT

LOADTEST = REPO_ROOT / "loadtest"


def prop(element: ET.Element, name: str) -> str:
    found = element.find(f"*[@name='{name}']")
    assert found is not None, f"{element.tag} has no {name}"
    return found.text or ""


def default(value: str) -> str:
    """``${__P(name,default)}`` -> default."""
    m = re.fullmatch(r"\$\{__P\((\w+),(.*)\)\}", value)
    assert m, value
    return m.group(2)


def test_jmeter_plan_is_the_write_ups_thread_group_over_the_question_csv() -> None:
    root = ET.parse(LOADTEST / "chat.jmx").getroot()
    group = root.find(".//ThreadGroup")
    assert default(prop(group, "ThreadGroup.num_threads")) == "50"
    assert default(prop(group, "ThreadGroup.ramp_time")) == "60"
    assert prop(group, "ThreadGroup.scheduler") == "true"
    assert int(default(prop(group, "ThreadGroup.duration"))) >= 300
    assert (
        prop(group.find("elementProp[@elementType='LoopController']"), "LoopController.loops")
        == "-1"
    )

    data = root.find(".//CSVDataSet")
    questions = REPO_ROOT / default(prop(data, "filename"))
    with questions.open() as fh:
        header = next(csv.reader(fh))
    assert prop(data, "variableNames").split(",") == header
    assert prop(data, "ignoreFirstLine") == "true" and prop(data, "recycle") == "true"
    assert prop(data, "shareMode") == "shareMode.all"

    headers = {
        prop(h, "Header.name"): prop(h, "Header.value")
        for h in root.findall(".//HeaderManager//elementProp[@elementType='Header']")
    }
    assert headers == {"Content-Type": "application/json", "Cache-Control": "no-cache"}

    sampler = root.find(".//HTTPSamplerProxy")
    assert prop(sampler, "HTTPSampler.method") == "POST"
    assert prop(sampler, "HTTPSampler.path") == "/chat"
    body = sampler.find(".//stringProp[@name='Argument.value']").text
    # JMeter's groovy call JSON-encodes the question; so does json.dumps.
    question = read_questions(questions)[0] + ' with "quotes"'
    rendered = re.sub(r"\$\{__groovy\(.*\)\}", lambda _: json.dumps(question), body)
    assert json.loads(rendered) == {"query": question}
    defaults = root.find(".//ConfigTestElement")
    assert default(prop(defaults, "HTTPSampler.port")) == "8080"


def test_locustfile_posts_the_csv_questions_uncached_and_names_shed_requests() -> None:
    source = (LOADTEST / "locustfile.py").read_text()
    tree = ast.parse(source)
    user = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ChatUser")
    assert [b.id for b in user.bases if isinstance(b, ast.Name)] == ["HttpUser"]
    tasks = [
        f
        for f in user.body
        if isinstance(f, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "task" for d in f.decorator_list)
    ]
    assert [t.name for t in tasks] == ["chat"]
    text = ast.unparse(tasks[0])
    assert "'/chat'" in text and "429" in text and "failure" in text
    assert '"Cache-Control": "no-cache"' in source

    # Its CSV reader agrees with loadtest http's (run without importing locust).
    loader = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "load_questions"
    )
    namespace: dict = {}
    exec(  # noqa: S102 - our own file's function, to test it without locust installed
        compile(ast.Module([*_imports(tree), loader], []), "locustfile", "exec"), namespace
    )
    csv_path = REPO_ROOT / "corpus" / "questions.csv"
    assert namespace["load_questions"](csv_path) == read_questions(csv_path)


def _imports(tree: ast.Module) -> list[ast.stmt]:
    return [
        n
        for n in tree.body
        if isinstance(n, ast.Import | ast.ImportFrom) and getattr(n, "module", "") != "locust"
    ]
