"""Langchain-Chatchat 0.3, the write-up's real peer, as the load test's second baseline.

The seed ran Chatchat instances behind nginx ``least_conn``, each instance with its own LLM
server. This starts that layout on one machine, unprivileged, on loopback, everything in one
temporary directory:

- **Chatchat** (``langchain-chatchat==0.3.1.3``) in a virtualenv of its own, ``.venv-chatchat/``
  (``make chatchat`` or ``loadtest/chatchat/setup.sh``; created on first use): its library pins
  (langchain 0.1, pydantic 2.7, numpy 1.24, streamlit...) are not ragline's. Each instance is
  Chatchat's API server as ``chatchat start --api`` runs it (``run_api_server``, without the
  launcher's multiprocessing parent), with its own ``CHATCHAT_ROOT``: its yaml settings, its
  sqlite knowledge-base database and its copy of the FAISS store, as separate machines have.
- **the LLM**: llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``, the
  same llama-cpp-python build ragline uses) on the GGUF ragline generates with by default, with
  ``--interrupt_requests False`` (by default a new request cancels the one being generated).
  ``per-instance`` (the seed's layout, default): one server per instance, each with
  ``max(1, cpu_count // N)`` threads, as the monolith's instances share the cores;
  ``shared``: one server with every core for all instances. Chatchat talks to it as an
  OpenAI platform (langchain's ``ChatOpenAI``, streaming).
- **embeddings**: ``loadtest/chatchat/embeddings.py``, an OpenAI-compatible ``/v1/embeddings``
  over ragline's default ONNX model, in ragline's venv, one for every instance (the part
  Xinference plays in Chatchat's own docs). Chatchat's platform type is ``custom openai``:
  ``openai`` would fetch tiktoken's tables from the internet.
- **the knowledge base** ``handbook``: ``corpus/handbook/*.md`` ingested with Chatchat's own
  CLI (``chatchat init``, then ``chatchat kb -r -n handbook``: its loader, its
  ``ChineseRecursiveTextSplitter`` at 750/150 characters, its FAISS store), once, then copied
  into each instance's root.
- nginx in front, configured by ``loadtest.monolith.render_nginx_conf`` (``least_conn``,
  ``max_fails=3 fail_timeout=30s``). Chatchat streams with ``X-Accel-Buffering: no``, so nginx
  passes its events on as they come.

What is Chatchat's own is left as it ships (retrieval top_k 3, score threshold 2.0 = no filter,
one embedding call to check the model and one for the query per request, no batching, no
admission control). Two things are set for the comparison: the RAG prompt is Chatchat's default
template in English (it asks for answers in Chinese; the handbook and its questions are
English), and the load plan asks for greedy sampling and the ragline plan's ``max_tokens``, so
both systems' answers have the same cap.

A kb_chat request (``kb_chat_plan``) streams by default: the first event carries the sources
(``docs``), the next ones the answer's pieces (``choices[0].delta.content``); a non-streamed
answer omits the sources. Chatchat reports failures inside a 200: ``{"error": ...}`` in the
stream or as the body, ``{"code": 404, "msg": ...}`` for an unknown knowledge base, and an
answer that is just empty when the LLM call failed (it only logs that). ``kb_chat_error`` and
``KbChatTransport`` tell those apart from answers; the transport also re-tells the stream as
the edge's events for the load tool.

    make chatchat                                                 # the venv, once
    python -m loadtest.chatchat --port 8080                       # 3 instances behind nginx
    python -m loadtest.chatchat --instances 1 --layout shared --ask "How many days ..."
    loadtest sweep --compare-chatchat --chatchat-instances 3      # started and stopped there
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.monolith import DEFAULT_CORPUS, REPO, _Process, find_nginx, free_port, shut_down
from loadtest.monolith import render_nginx_conf as _render_nginx_conf

VENV = REPO / ".venv-chatchat"
SETUP = REPO / "loadtest" / "chatchat" / "setup.sh"
EMBEDDINGS_APP = REPO / "loadtest" / "chatchat" / "embeddings.py"
KB_NAME = "handbook"
KB_PATH = "/chat/kb_chat"
LAYOUTS = ("per-instance", "shared")
# What Chatchat's config calls the two models; the embedding name also names the FAISS folder.
# The LLM is the GGUF the generate stage's settings name (RAGLINE_GENERATE_MODEL; default
# SmolLM2-135M-Instruct), as the monolith loads it.
LLM_NAME = "ragline-generate-model"
EMBED_NAME = "all-MiniLM-L6-v2-int8"
# Chatchat's default RAG templates (prompt_settings.yaml ``rag``), translated; the only
# change is the answer's language.
RAG_PROMPTS = {
    "default": (
        "[Instruction] Based on the known information, answer the question concisely and "
        'professionally. If the answer cannot be obtained from it, say "The question cannot be '
        'answered based on the known information"; adding made-up content to the answer is '
        "not allowed. Answer in English.\n\n"
        "[Known information] {{context}}\n\n"
        "[Question] {{question}}\n"
    ),
    "empty": "Please answer my question:\n{{question}}",
}
# Chatchat's API server as `chatchat start --api` runs it in its child process.
SERVE_API = "from chatchat.startup import run_api_server; run_api_server()"
# The LLM call failed: Chatchat logs it (wrap_done) and ends the answer empty.
EMPTY_ANSWER = "empty answer (the LLM call failed: see the instance's log)"


def venv_python(venv: Path = VENV, create: bool = False) -> Path:
    """Chatchat's interpreter; ``create``: run the setup script when the venv is missing."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "chatchat").exists():
        if not create:
            raise RuntimeError(f"no Chatchat virtualenv at {venv}: run `make chatchat` first")
        print(f"creating {venv} with {SETUP} (once; about a minute)", file=sys.stderr)
        subprocess.run(["bash", str(SETUP), str(venv)], check=True)
    return python


def settings_files(
    root: Path, api_port: int, llm_url: str, embed_url: str
) -> dict[str, dict[str, Any]]:
    """The yaml settings of one Chatchat root (file name -> content); what is not named keeps
    Chatchat's default. JSON is YAML, so each is written as JSON."""
    kb_root = root / "data" / "knowledge_base"
    return {
        "basic_settings.yaml": {
            "KB_ROOT_PATH": str(kb_root),
            "DB_ROOT_PATH": str(kb_root / "info.db"),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{kb_root / 'info.db'}",
            "DEFAULT_BIND_HOST": "127.0.0.1",
            "API_SERVER": {
                "host": "127.0.0.1",
                "port": api_port,
                "public_host": "127.0.0.1",
                "public_port": api_port,
            },
            "WEBUI_SERVER": {"host": "127.0.0.1", "port": 0},
        },
        "kb_settings.yaml": {
            "DEFAULT_KNOWLEDGE_BASE": KB_NAME,
            "DEFAULT_VS_TYPE": "faiss",
            "KB_INFO": {KB_NAME: "the company handbook"},
        },
        "model_settings.yaml": {
            "DEFAULT_LLM_MODEL": LLM_NAME,
            "DEFAULT_EMBEDDING_MODEL": EMBED_NAME,
            "MODEL_PLATFORMS": [
                {
                    "platform_name": "llama-cpp",
                    "platform_type": "openai",
                    "api_base_url": f"{llm_url}/v1",
                    "api_key": "EMPTY",
                    "llm_models": [LLM_NAME],
                },
                {
                    "platform_name": "ragline-embeddings",
                    "platform_type": "custom openai",
                    "api_base_url": f"{embed_url}/v1",
                    "api_key": "EMPTY",
                    "embed_models": [EMBED_NAME],
                },
            ],
        },
        "prompt_settings.yaml": {"rag": RAG_PROMPTS},
    }


def write_settings(root: Path, files: dict[str, dict[str, Any]]) -> None:
    for name, content in files.items():
        (root / name).write_text(json.dumps(content, indent=1, ensure_ascii=False) + "\n")


# --- what a kb_chat request is, and how it fails -------------------------------------------


def kb_chat_plan(
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int = 3,
    score_threshold: float = 2.0,
    kb_name: str = KB_NAME,
    model: str = LLM_NAME,
) -> dict[str, Any]:
    """``Plan`` fields for Chatchat 0.3's ``POST /chat/kb_chat`` (``{question}`` is replaced):
    ``Plan(**{**asdict(plan), **kb_chat_plan(), "url": cluster.url})``. Streamed, Chatchat's
    default and the only way its answer carries its sources; top_k and score threshold are
    Chatchat's defaults (``kb_settings``)."""
    return {
        "path": KB_PATH,
        "stream": True,
        "body": {
            "query": "{question}",
            "mode": "local_kb",
            "kb_name": kb_name,
            "top_k": top_k,
            "score_threshold": score_threshold,
            "history": [],
            "stream": True,
            "model": model,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "prompt_name": "default",
            "return_direct": False,
        },
    }


def kb_chat_error(payload: str | dict) -> str:
    """The failure a kb_chat body or stream event reports inside its 200, else ``""``.

    ``payload``: a non-streamed body, or one event's data (a JSON text or already parsed).
    """
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except ValueError:
            return f"not JSON: {payload[:150]}"
    if not isinstance(payload, dict):
        return f"unexpected answer: {json.dumps(payload)[:150]}"
    if "error" in payload:  # kb_chat's `except Exception` in the stream
        return str(payload["error"])[:200] or "error"
    if isinstance(payload.get("data"), str) and payload["data"].startswith("{"):
        return kb_chat_error(payload["data"])  # the same, not streamed: {"data": "{\"error\"..."}
    code = payload.get("code")
    if isinstance(code, int) and code != 200:  # BaseResponse: an unknown knowledge base
        return f"{code}: {payload.get('msg', '')}"[:200]
    return ""


@dataclass
class KbChatReply:
    """A kb_chat answer read whole: its text, its sources, or what went wrong."""

    answer: str = ""
    docs: list[str] = field(default_factory=list)
    error: str = ""
    chunks: int = 0


def _content(event: dict) -> str:
    choices = event.get("choices") or [{}]
    delta = choices[0].get("delta") or choices[0].get("message") or {}
    return delta.get("content") or ""


def read_kb_chat(text: str) -> KbChatReply:
    """A kb_chat response body: Server-Sent Events (``data: {...}`` per event) or one JSON."""
    reply = KbChatReply()
    if not text.lstrip().startswith("data:"):
        payloads: Iterable[str] = [text]
    else:
        payloads = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    for payload in payloads:
        if error := kb_chat_error(payload):
            reply.error = error
            return reply
        event = json.loads(payload)
        reply.chunks += 1
        reply.docs += event.get("docs") or []
        reply.answer += _content(event)
    if not reply.answer:
        reply.error = EMPTY_ANSWER
    return reply


def _sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class EdgeEvents:
    """One kb_chat stream's events re-told as the edge's (``loadtest/chatstream.py``), so the
    load tool times and counts Chatchat as it does ragline: the sources event as ``sources``,
    each piece of answer as ``token``, a failure as ``error``, and at the end ``done`` with
    the pieces as completion tokens (llama.cpp's server streams one token per chunk; Chatchat
    reports no usage), or ``error`` when no answer came."""

    def __init__(self) -> None:
        self.pieces = 0
        self.failed = False

    def event(self, data: str) -> bytes:
        if self.failed:
            return b""
        if error := kb_chat_error(data):
            self.failed = True
            return _sse("error", {"code": "chatchat", "message": error})
        event = json.loads(data)
        out = b""
        if docs := event.get("docs"):
            out += _sse("sources", [{"id": str(i), "text": d} for i, d in enumerate(docs)])
        if text := _content(event):
            self.pieces += 1
            out += _sse("token", {"text": text})
        return out

    def end(self) -> bytes:
        if self.failed:
            return b""
        if not self.pieces:
            return _sse("error", {"code": "chatchat", "message": EMPTY_ANSWER})
        usage = {"prompt_tokens": 0, "completion_tokens": self.pieces}
        return _sse("done", {"usage": usage, "finish_reason": "", "cached": False})


class _Retold(httpx.AsyncByteStream):
    """Chatchat's event bytes in, the edge's out, as each event arrives."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self.inner = inner

    async def __aiter__(self):
        from loadtest.chatstream import SseParser

        parser, events, pending = SseParser(), EdgeEvents(), b""
        async for chunk in self.inner:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if event := parser.feed(line.decode("utf-8", "replace").rstrip("\r")):
                    yield events.event(event[1])
        if pending and (event := parser.feed(pending.decode("utf-8", "replace").rstrip("\r"))):
            yield events.event(event[1])
        if event := parser.flush():  # the last event, when the stream ended without its blank line
            yield events.event(event[1])
        yield events.end()

    async def aclose(self) -> None:
        await self.inner.aclose()


class KbChatTransport(httpx.AsyncBaseTransport):
    """The load tool's transport for Chatchat (``sweep(..., transport=)``): a kb_chat stream
    reaches the tool as the edge's events (``EdgeEvents``), and a failure Chatchat answers as a
    200 JSON body (an unknown knowledge base, a non-streamed error) as a 502 in the edge's error
    shape, so both count as errors. It reads the bytes as they arrive, in the client's process:
    no hop is added. Anything else passes through."""

    def __init__(self) -> None:
        self._inner: httpx.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._inner is None:  # one pool per run: the client closes it at the run's end
            self._inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=None))
        resp = await self._inner.handle_async_request(request)
        if request.url.path != KB_PATH or resp.status_code != 200:
            return resp
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-length"]
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            return httpx.Response(200, headers=headers, stream=_Retold(resp.stream))
        body = await resp.aread()
        if error := kb_chat_error(body.decode("utf-8", "replace")):
            message = {"error": {"code": "chatchat", "message": error}}
            return httpx.Response(502, json=message)
        return httpx.Response(200, headers=headers, content=body)

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
            self._inner = None


# --- N instances, their LLM servers, the embeddings, nginx -------------------------------


class ChatchatCluster:
    """N Chatchat API servers, their llama.cpp server(s), the embeddings and nginx in front.

    ``with ChatchatCluster(3) as cluster: ...`` (``cluster.url`` is nginx's) or
    ``start()``/``stop()``. ``logs_to``: a folder that keeps every process's log after
    ``stop()``.
    """

    def __init__(
        self,
        instances: int = 3,
        layout: str = "per-instance",
        corpus: Path = DEFAULT_CORPUS,
        nginx: str = "nginx",
        port: int = 0,
        read_timeout_s: float = 120.0,
        startup_timeout_s: float = 300.0,
        threads: int = 0,
        embed_threads: int = 1,
        nginx_workers: int = 1,
        venv: Path = VENV,
        env: dict[str, str] | None = None,
        logs_to: Path | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r}: one of {', '.join(LAYOUTS)}")
        self.python = venv_python(venv, create=True)
        self.chatchat = venv / "bin" / "chatchat"
        self.nginx = find_nginx(nginx)
        self.instances = instances
        self.layout = layout
        self.corpus = Path(corpus)
        self.documents = sorted(
            p for p in (self.corpus.glob("*.md") if self.corpus.is_dir() else [self.corpus])
        )
        if not self.documents:
            raise ValueError(f"no .md documents under {self.corpus}")
        llm_servers = instances if layout == "per-instance" else 1
        self.threads = threads or max(1, (os.cpu_count() or 1) // llm_servers)
        self.embed_threads = embed_threads
        self.read_timeout_s = read_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.nginx_workers = nginx_workers
        self.logs_to = logs_to
        base = dict(os.environ if env is None else env)
        # Loopback only: an HTTP(S)_PROXY must not catch Chatchat's calls to its platforms.
        no_proxy = ",".join(x for x in ("127.0.0.1", "localhost", base.get("NO_PROXY")) if x)
        self.env = {**base, "PYTHONUNBUFFERED": "1", "NO_PROXY": no_proxy, "no_proxy": no_proxy}
        self.ports = [free_port() for _ in range(instances)]
        self.llm_ports = [free_port() for _ in range(llm_servers)]
        self.embed_port = free_port()
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir: Path | None = None
        self.procs: list[_Process] = []  # the Chatchat instances
        self.llms: list[_Process] = []
        self.embedder: _Process | None = None
        self.proxy: _Process | None = None
        self._http = httpx.Client(timeout=5, trust_env=False)

    def instance_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def llm_url(self, instance: int) -> str:
        return f"http://127.0.0.1:{self.llm_ports[instance % len(self.llm_ports)]}"

    @property
    def embed_url(self) -> str:
        return f"http://127.0.0.1:{self.embed_port}"

    def _spawn(self, name: str, cmd: list[str], log: str, **env: str) -> _Process:
        assert self.dir is not None
        return _Process(name, cmd, self.dir / log, {**self.env, **env})

    def _wait(
        self,
        proc: _Process,
        url: str,
        deadline: float,
        ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    ) -> None:
        while True:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with status {proc.proc.returncode}; its log ends:\n"
                    f"{proc.tail()}"
                )
            try:
                if ready(self._http.get(url, timeout=2)):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} not ready at {url} within {self.startup_timeout_s:.0f}s; "
                    f"its log ends:\n{proc.tail()}"
                )
            time.sleep(0.25)  # polling a condition with a deadline, not waiting blindly

    def _run(self, name: str, cmd: list[str], root: Path) -> None:
        """A Chatchat CLI step, to completion, its output in the cluster's log folder."""
        assert self.dir is not None
        log = self.dir / f"{name}.log"
        with log.open("wb") as out:
            done = subprocess.run(
                cmd,
                cwd=root,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, "CHATCHAT_ROOT": str(root)},
                timeout=self.startup_timeout_s,
            )
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"`{' '.join(cmd[1:])}` failed ({done.returncode}):\n{tail}")

    def _ingest(self) -> Path:
        """The knowledge base, built once with Chatchat's CLI in a root of its own."""
        assert self.dir is not None
        root = self.dir / "kb"
        root.mkdir()
        self._run("chatchat-init", [str(self.chatchat), "init"], root)
        shutil.rmtree(root / "data" / "knowledge_base" / "samples", ignore_errors=True)
        # The ingest root's API address is never served; only its platforms matter.
        write_settings(root, settings_files(root, 0, self.llm_url(0), self.embed_url))
        content = root / "data" / "knowledge_base" / KB_NAME / "content"
        content.mkdir(parents=True)
        for path in self.documents:
            shutil.copy(path, content / path.name)
        cmd = [str(self.chatchat), "kb", "-r", "-n", KB_NAME, "-e", EMBED_NAME]
        self._run("chatchat-kb", cmd, root)
        store = root / "data" / "knowledge_base" / KB_NAME / "vector_store" / EMBED_NAME
        if not (store / "index.faiss").exists():
            log = (self.dir / "chatchat-kb.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"`chatchat kb -r` wrote no FAISS index under {store}:\n{log}")
        return root

    def start(self) -> ChatchatCluster:
        self.dir = Path(tempfile.mkdtemp(prefix="ragline-chatchat-"))
        self.dir.chmod(0o755)  # nginx's workers (as `nobody` under root) use its temp paths
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        from ragline.models import resolve_generate_model
        from services.generate.settings import GenerateSettings

        assert self.dir is not None
        deadline = time.monotonic() + self.startup_timeout_s
        cmd = [sys.executable, str(EMBEDDINGS_APP), "--port", str(self.embed_port)]
        self.embedder = self._spawn(
            "embeddings", cmd + ["--threads", str(self.embed_threads)], "embeddings.log"
        )
        generate = GenerateSettings()
        gguf = resolve_generate_model(generate.model)
        for i, port in enumerate(self.llm_ports):
            # -I: the repo root (the cwd) must not shadow the venv's packages.
            cmd = [str(self.python), "-I", "-m", "llama_cpp.server", "--model", str(gguf)]
            cmd += ["--model_alias", LLM_NAME, "--host", "127.0.0.1", "--port", str(port)]
            cmd += ["--n_ctx", str(generate.context_length), "--n_threads", str(self.threads)]
            cmd += ["--n_threads_batch", str(self.threads), "--interrupt_requests", "False"]
            self.llms.append(self._spawn(f"llama.cpp server {i}", cmd, f"llm-{i}.log"))
        self._wait(self.embedder, f"{self.embed_url}/health", deadline)
        kb_root = self._ingest()
        for i, port in enumerate(self.ports):
            root = self.dir / f"instance-{i}"
            root.mkdir()
            shutil.copytree(kb_root / "data", root / "data")
            write_settings(root, settings_files(root, port, self.llm_url(i), self.embed_url))
            cmd = [str(self.python), "-I", "-u", "-c", SERVE_API]
            name = f"chatchat instance {i}"
            self.procs.append(self._spawn(name, cmd, f"chatchat-{i}.log", CHATCHAT_ROOT=str(root)))
        for i, proc in enumerate(self.llms):
            self._wait(proc, f"{self.llm_url(i)}/v1/models", deadline)

        def has_kb(resp: httpx.Response) -> bool:
            if resp.status_code != 200:
                return False
            names = [kb.get("kb_name") for kb in resp.json().get("data") or []]
            if KB_NAME not in names:  # up, but without it: no point waiting
                raise RuntimeError(f"Chatchat serves knowledge bases {names}, not {KB_NAME!r}")
            return True

        for url, proc in zip(self.instance_urls(), self.procs, strict=True):
            self._wait(proc, f"{url}/knowledge_base/list_knowledge_bases", deadline, has_kb)
        conf = self.dir / "nginx.conf"
        conf.write_text(
            _render_nginx_conf(
                self.dir, self.port, self.ports, self.read_timeout_s, self.nginx_workers
            )
        )
        cmd = [self.nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log")]
        self.proxy = self._spawn("nginx", cmd + ["-c", str(conf)], "nginx.log")
        self._wait(
            self.proxy, f"{self.url}/knowledge_base/list_knowledge_bases", time.monotonic() + 30
        )

    def ask(self, question: str, timeout_s: float = 120.0, **body: Any) -> KbChatReply:
        """One kb_chat through nginx, read whole (streamed unless ``stream=False``)."""
        plan = kb_chat_plan()
        payload = {**plan["body"], **body, "query": question}
        resp = self._http.post(f"{self.url}{KB_PATH}", json=payload, timeout=timeout_s)
        if resp.status_code != 200:
            return KbChatReply(error=f"HTTP {resp.status_code}: {resp.text[:200]}")
        return read_kb_chat(resp.text)

    def stop(self, grace_s: float = 10.0) -> None:
        """nginx first, then the instances, the LLM servers and the embeddings: SIGTERM, then
        SIGKILL after ``grace_s``; the temporary directory goes with them."""
        ordered = [self.proxy] if self.proxy else []
        ordered += self.procs + self.llms + ([self.embedder] if self.embedder else [])
        shut_down(ordered, grace_s, self.dir, self.logs_to)
        self.proxy, self.procs, self.llms, self.embedder, self.dir = None, [], [], None, None

    def __enter__(self) -> ChatchatCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._http.close()


def sweep_chatchat(
    args: argparse.Namespace,
    plan: Any,
    run: Callable[[Any, httpx.AsyncBaseTransport], Any],
) -> Any:
    """The sweep's Chatchat run: ``run(plan, transport)`` (the sweep over its levels) against
    ``--chatchat-url`` or a cluster started here, with the kb_chat request and
    ``KbChatTransport``. The ragline plan's questions, timeouts, SLO and ``max_tokens`` are
    kept, so both systems answer the same questions at the same length."""
    from dataclasses import replace

    cc_plan = replace(plan, **kb_chat_plan(max_tokens=int(plan.body.get("max_tokens") or 256)))
    if args.chatchat_url:
        return run(replace(cc_plan, url=args.chatchat_url), KbChatTransport())
    if not args.quiet:
        print(
            f"starting {args.chatchat_instances} Chatchat instances ({args.chatchat_layout} "
            "LLM servers) behind nginx",
            file=sys.stderr,
            flush=True,
        )
    # nginx must not cut off an answer the client still waits for
    read_timeout = max(60.0, plan.timeout_s)
    with ChatchatCluster(
        args.chatchat_instances, layout=args.chatchat_layout, read_timeout_s=read_timeout
    ) as cluster:
        return run(replace(cc_plan, url=cluster.url), KbChatTransport())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.chatchat",
        description="Langchain-Chatchat 0.3 instances behind nginx least_conn, with llama.cpp "
        "server(s) and ragline's embeddings, the handbook as their knowledge base.",
    )
    p.add_argument("--port", type=int, default=0, help="nginx's port (0: a free one)")
    p.add_argument("--instances", type=int, default=3)
    p.add_argument("--layout", choices=LAYOUTS, default="per-instance", help="LLM servers")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder of .md files")
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads per LLM server")
    p.add_argument("--nginx", default="nginx")
    p.add_argument("--logs", type=Path, help="keep every process's log here")
    p.add_argument("--ask", action="append", default=[], help="ask this (repeatable), print, stop")
    args = p.parse_args(argv)
    cluster = ChatchatCluster(
        args.instances,
        layout=args.layout,
        corpus=args.corpus,
        nginx=args.nginx,
        port=args.port,
        threads=args.threads,
        logs_to=args.logs,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    t0 = time.monotonic()
    with cluster:
        print(
            f"{args.instances} Chatchat instances ({args.layout}) behind nginx at {cluster.url}"
            f", started in {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        if args.ask:
            failed = 0
            for question in args.ask:
                start = time.perf_counter()
                reply = cluster.ask(question)
                ms = (time.perf_counter() - start) * 1000
                print(json.dumps({**asdict(reply), "latency_ms": round(ms)}, indent=1))
                failed += bool(reply.error)
            return 1 if failed else 0
        while not stop.wait(1.0):
            if cluster.proxy is None or not cluster.proxy.alive():
                print("nginx exited; stopping", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
