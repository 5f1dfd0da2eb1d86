"""The replicated monolith: the write-up's architecture, as the load test's baseline.

One process does everything for a request, the way Langchain-Chatchat-style stacks do: embed the
question, search a FAISS index held in memory, stuff the passages into a prompt, run the LLM.
Requests share no work: each embeds its own question alone (no micro-batching) and the LLM
generates one answer at a time (llama-cpp-python's high-level ``Llama`` behind a lock;
concurrent requests wait for it). The index is an exact ``IndexFlatIP`` rebuilt from the corpus
at every start, as the write-up's instances rebuilt theirs.

For a fair comparison it uses ragline's parts wherever the result should be the same:
- documents are read, titled and chunked as ``ragline ingest`` / ``POST /documents`` do (the
  edge's chunk size, overlap and token cap, counted with the same embedding model; passage ids
  ``<path relative to the corpus>#<chunk>``; metadata ``source``, ``title``, ``heading``),
  and embedded as PASSAGE with the embed stage's default model; questions are embedded as
  QUERY (its query instruction, truncation on);
- exact inner-product search, which is what ragline's retrieve does below 20,000 passages, so
  the same question finds the same passages in the same order;
- a request runs through the edge's own ``ChatPipeline`` (``services/api/pipeline.py``) with
  this process's models as its three stages: the prompt is assembled by the edge's
  ``PromptPolicy`` with the edge's context budget and strategy, rendered with the GGUF's own
  chat template and tokenised exactly as the generate stage does, and sampled with the
  edge's defaults (greedy, seed 0, top_p 0.95, top_k 40, no
  repetition penalty, the edge's max_tokens cap): the same question gets the same prompt tokens;
- ``POST /chat`` takes the edge's request model and limits (its ``answerer`` and
  ``score_threshold`` too; ``mode`` is ignored: dense search only), answers in the edge's JSON
  shape (``answer``, ``sources``, ``timings_ms``, ``usage``, ``finish_reason``, ``cached``
  always false) and refuses bad input with the edge's error handlers (400 ``{"error":
  {"code", "message"}}``); with ``stream: true`` it sends the edge's Server-Sent Events
  (``sources``, ``token``..., ``replace``, ``done`` with usage and timings, or ``error``) from
  the same pipeline's ``answer_stream``, tokens as llama.cpp samples them, so a load test times
  the first token of both the same way.
What it does not have is what ragline adds: batching across requests, caching, admission
control, tracing. llama-cpp-python reuses the KV cache of the previous prompt's common prefix
(the system prompt), as it does by default in any stack built on it; ``usage`` reports that
reuse as ``cached_prompt_tokens`` (llama-cpp-python's own prefix match, worked out before each
call: its results do not carry it).

`MonolithCluster` starts N instances (default 3) and Debian's nginx in front of them with
``least_conn`` and ``max_fails=3 fail_timeout=30s``, the write-up's configuration; everything
(config, pid, logs, nginx's temp paths) lives in one temporary directory, on loopback, so it
runs unprivileged and leaves nothing behind.

Threads: the write-up gave each instance its own GPU. On a CPU the equivalent is giving each
instance its own share of the cores, so an instance gets ``max(1, cpu_count // N)`` llama.cpp
threads and one ONNX Runtime thread (a single question is a few dozen tokens; intra-op threads
buy nothing at batch 1). Letting every instance use every core would make N x cpu_count
llama.cpp threads, which synchronise at every layer and stall whenever a peer is descheduled:
the baseline would look worse than the architecture is. ``threads=`` overrides it.

    python -m loadtest.monolith --port 8090                    # one instance on :8090
    python -m loadtest.monolith --port 8080 --instances 3      # 3 behind nginx on :8080
    loadtest sweep --compare-monolith --monolith-instances 3   # started and stopped by the sweep
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from services.api.schemas import ChatRequest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO / "corpus" / "handbook"
EMBED_BATCH = 32  # what ragline's ingestion sends per embed call
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    metadata: dict[str, str]


def read_corpus(
    corpus: Path,
    chunk_words: int,
    overlap_words: int,
    chunk_tokens: int = 0,
    count_tokens: Callable[[list[str]], tuple[list[int], int]] | None = None,
) -> list[list[Passage]]:
    """Passages per document, with the ids, text and metadata ragline's ingestion gives them.

    ``count_tokens`` (texts -> counts and the model's max input tokens, what ingestion asks
    the embed stage) fits the chunks to ``chunk_tokens``; without it sizes are in words only.
    """
    from ragline.chunking import ChunkingPolicy, TokenFit, chunk_text
    from ragline.documents import decode_document, iter_documents
    from services.api.ingest import chunk_metadata, document_metadata

    policy = ChunkingPolicy(chunk_words, overlap_words, chunk_tokens)
    base = corpus if corpus.is_dir() else corpus.parent
    documents = []
    for path in iter_documents(corpus):
        document_id = path.relative_to(base).as_posix()
        text = decode_document(path.read_bytes(), path.name)
        if not text.strip():
            continue  # ingestion refuses an empty document; the index would not have it
        meta = document_metadata(document_id, text)
        chunks = chunk_text(text, policy)
        if policy.max_tokens and count_tokens:
            fit = TokenFit(chunks, policy.max_tokens)
            while texts := fit.to_count():
                fit.counted(*count_tokens(texts))
            chunks = fit.chunks
        documents.append(
            [Passage(f"{document_id}#{chunk.index}", chunk.text, chunk_metadata(meta, chunk))
             for chunk in chunks]
        )  # fmt: skip
    return documents


class Monolith:
    """Embed, search and generate in one process, one generation at a time.

    It is the three stages of ``services.api.pipeline.ChatPipeline`` in one object (``embed_query``,
    ``search``, ``generate``), so the edge's pipeline assembles its prompt, splits its time
    budget and shapes its answer exactly as ragline's edge does.
    """

    def __init__(self, corpus: Path, threads: int = 0, ort_threads: int = 1) -> None:
        import faiss
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from ragline.models import resolve_embed_model, resolve_generate_model
        from services.api.chat import ChatLimits
        from services.api.pipeline import AnswerPolicy, ChatPipeline
        from services.api.prompt import PromptPolicy
        from services.api.settings import ApiSettings
        from services.embed.model import EmbeddingModel
        from services.embed.settings import EmbedSettings
        from services.generate.settings import GenerateSettings

        self.settings = settings = ApiSettings()
        embed_settings = EmbedSettings()
        gen_settings = GenerateSettings()
        # Before any model loads, so a wrong --corpus fails in a second (in words: no counter).
        if not any(read_corpus(corpus, settings.chunk_words, settings.chunk_overlap_words)):
            raise ValueError(f"no documents with text under {corpus}")
        # One query at a time per search: OpenMP workers would only spin (ragline's retrieve
        # workers also search with one OpenMP thread).
        faiss.omp_set_num_threads(1)
        model_dir = resolve_embed_model(embed_settings.model, embed_settings.data_dir)
        self.embedder = EmbeddingModel(model_dir, intra_op_threads=ort_threads)
        # Now in the model's tokens too, as ingestion counts them through the embed stage.
        documents = read_corpus(
            corpus,
            settings.chunk_words,
            settings.chunk_overlap_words,
            settings.chunk_tokens,
            lambda texts: (self.embedder.count_tokens(texts), self.embedder.config.max_length),
        )
        self.passages = [p for doc in documents for p in doc]
        # Per document in batches of 32, as ingestion sends them: vectors then differ from
        # ragline's by float rounding at most, and exact search ranks them the same.
        vectors = [
            self.embedder.embed([p.text for p in doc[i : i + EMBED_BATCH]], kind="passage")[0]
            for doc in documents
            for i in range(0, len(doc), EMBED_BATCH)
        ]
        matrix = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
        self.index = faiss.IndexFlatIP(matrix.shape[1])
        self.index.add(matrix)

        n_threads = threads or os.cpu_count() or 1
        self.llm = Llama(
            model_path=str(resolve_generate_model(gen_settings.model)),
            n_ctx=gen_settings.context_length,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            verbose=False,
        )
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("the GGUF carries no tokenizer.chat_template in its metadata")
        model = self.llm._model
        # The generate stage renders prompts with this formatter and these special tokens.
        self.formatter = Jinja2ChatFormatter(
            template,
            eos_token=model.token_get_text(self.llm.token_eos()),
            bos_token=model.token_get_text(self.llm.token_bos()),
        )
        # llama.cpp's context serves one request at a time; requests wait for it on the event
        # loop, so a waiting request holds no worker thread that an embedding could use.
        self.lock = asyncio.Lock()
        self.limits = ChatLimits.from_settings(settings)
        self.pipeline = ChatPipeline(
            self,
            self,
            self,
            collection="monolith",
            timeout_s=settings.timeout_s,
            prompt=PromptPolicy.from_settings(settings),
            # the edge's answering settings (its search mode aside: the monolith has no BM25)
            answering=AnswerPolicy.from_settings(settings, mode="", bm25_threshold=0.0),
            embed_timeout_s=settings.embed_timeout_s,
            retrieve_timeout_s=settings.retrieve_timeout_s,
        )
        self.served = 0
        self.in_flight = 0

    async def embed_query(self, query: str, timeout: float | None = None) -> np.ndarray:
        vectors, _ = await run_in_threadpool(self.embedder.embed, [query], "query", True)
        return vectors[0]

    async def embed(self, texts, kind, truncate: bool = True, timeout: float | None = None):
        from ragline.types import Embeddings

        vectors, counts = await run_in_threadpool(
            self.embedder.embed, list(texts), kind.value, truncate
        )
        return Embeddings(vectors, "", tuple(counts))

    async def search(
        self, collection: str, vector: np.ndarray, top_k: int, timeout=None, text="", mode=""
    ):
        """Dense exact search only: the write-up's stack has no BM25 (``text``/``mode``
        are accepted and ignored)."""
        from ragline.types import Hit, SearchResult

        # Exact search over a handbook-sized corpus takes microseconds: on the loop.
        scores, rows = self.index.search(vector[None, :], min(top_k, len(self.passages)))
        hits = [
            Hit(self.passages[r].id, float(s), self.passages[r].text, self.passages[r].metadata)
            for s, r in zip(scores[0], rows[0], strict=True)
            if r >= 0
        ]
        return SearchResult(hits, "flat")

    async def generate(self, messages, params, timeout: float | None = None):
        # Waiting for the lock counts as generation, as queueing for the generate stage is part
        # of ragline's generate timing. Every llama.cpp call (tokenising too, under a
        # millisecond) is under the lock: the high-level API promises no thread safety.
        async with self.lock:
            return await run_in_threadpool(self._generate, messages, params)

    async def stream(self, messages, params, timeout: float | None = None):
        """Chunks as llama.cpp samples them (``create_completion(stream=True)`` in a worker
        thread); the last carries the finish reason and usage. The lock is held until the
        worker has stopped, also when the client leaves early (it stops within a token)."""
        async with self.lock:
            loop = asyncio.get_running_loop()
            # Unbounded in form only: one generation puts at most max_tokens + 2 items in it.
            chunks: asyncio.Queue = asyncio.Queue()
            stop = threading.Event()

            def post(item: object) -> None:
                try:
                    loop.call_soon_threadsafe(chunks.put_nowait, item)
                except RuntimeError:  # the loop is gone: nobody to tell
                    stop.set()

            worker = loop.run_in_executor(None, self._stream, messages, params, post, stop)
            try:
                while (item := await chunks.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                stop.set()
                await worker

    def _prepare(self, messages, params) -> tuple[list[int], dict[str, Any]]:
        """The prompt's tokens, as the generate stage renders them, and the sampling arguments
        for ``create_completion`` (the generate stage's defaults where the edge sets none)."""
        from ragline.errors import InvalidArgument

        formatted = self.formatter(messages=list(messages))
        tokens = self.llm.tokenize(formatted.prompt.encode("utf-8"), add_bos=False, special=True)
        stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
        room = self.llm.n_ctx() - len(tokens)
        if room < 1:
            raise InvalidArgument(
                f"prompt is {len(tokens)} tokens; the context holds {self.llm.n_ctx()}: "
                "shorten the question or retrieve fewer passages"
            )
        return tokens, {
            "max_tokens": min(params.max_tokens, room),
            "temperature": params.temperature,
            "top_p": 0.95 if params.top_p is None else params.top_p,
            "top_k": 40 if params.top_k is None else params.top_k,
            "repeat_penalty": 1.0
            if params.repetition_penalty is None
            else params.repetition_penalty,
            "seed": params.seed,
            "stop": [s for s in [*stops, *params.stop] if s],
        }

    def _reused_prefix(self, tokens: list[int]) -> int:
        """Prompt tokens llama-cpp-python will not evaluate again: its own prefix match of the
        prompt against the sequence still in the context (``Llama.generate``), which always
        evaluates at least one token. Its results do not report this, so it is worked out the
        same way just before the call."""
        from llama_cpp import Llama

        if not self.llm.n_tokens or not tokens:
            return 0
        prefix = Llama.longest_token_prefix(self.llm._input_ids.tolist(), tokens)
        return min(prefix, len(tokens) - 1)

    def _generate(self, messages, params):
        from ragline.types import Completion, Usage

        tokens, kwargs = self._prepare(messages, params)
        cached = self._reused_prefix(tokens)
        out = self.llm.create_completion(tokens, **kwargs)
        choice = out["choices"][0]
        usage = Usage(
            prompt_tokens=out["usage"]["prompt_tokens"],
            completion_tokens=out["usage"]["completion_tokens"],
            cached_prompt_tokens=cached,
        )
        return Completion(choice["text"] or "", choice.get("finish_reason") or "", usage)

    def _stream(self, messages, params, post: Callable[[object], None], stop) -> None:
        """The worker thread of ``stream``: every piece of text to ``post``, then the last chunk
        with usage (or the exception), then ``_END``."""
        from ragline.types import CompletionChunk, Usage

        try:
            tokens, kwargs = self._prepare(messages, params)
            cached = self._reused_prefix(tokens)
            pieces, finish = [], ""
            completions = self.llm.create_completion(tokens, stream=True, **kwargs)
            try:
                for out in completions:
                    choice = out["choices"][0]
                    if choice["text"]:
                        pieces.append(choice["text"])
                        post(CompletionChunk(choice["text"]))
                    finish = choice.get("finish_reason") or finish
                    if stop.is_set():
                        finish = "cancelled"
                        break
            finally:
                completions.close()  # llama.cpp stops sampling here
            # A stream's results carry no usage: at the cap it is the cap, else the text's
            # tokens (a piece may hold several tokens: a character split across tokens).
            text = "".join(pieces)
            completion = (
                kwargs["max_tokens"]
                if finish == "length"
                else len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
            )
            usage = Usage(
                prompt_tokens=len(tokens),
                completion_tokens=completion if text or finish == "length" else 0,
                cached_prompt_tokens=cached,
            )
            post(CompletionChunk("", finish or "stop", usage))
        except BaseException as exc:  # handed to the request, raised there
            post(exc)
        finally:
            post(_END)

    async def chat(self, query: str, top_k: int, params, **choices) -> dict[str, Any]:
        """``choices``: the request's ``answerer`` and ``score_threshold``, as the edge takes
        them (its retrieval ``mode`` aside: the monolith searches dense vectors only)."""
        self.in_flight += 1
        try:
            result = await self.pipeline.answer(query, top_k, params, **choices)
            return result.to_dict(cached=False)
        finally:
            self.in_flight -= 1
            self.served += 1

    async def chat_stream(self, query: str, top_k: int, params, **choices):
        """The edge's events for one question (``ChatPipeline.answer_stream``), ``done``
        marked uncached as the edge marks a fresh answer."""
        self.in_flight += 1
        try:
            async for event, data in self.pipeline.answer_stream(query, top_k, params, **choices):
                yield event, ({**data, "cached": False} if event == "done" else data)
        finally:
            self.in_flight -= 1
            self.served += 1


_END = object()  # the last item a streaming worker posts


def create_app(corpus: Path, threads: int = 0, ort_threads: int = 1) -> FastAPI:
    """One instance's HTTP app; the models load (in a thread) before it accepts connections."""
    from services.api.http import install_error_handlers, sse_events

    state: dict[str, Monolith] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["m"] = await run_in_threadpool(Monolith, corpus, threads, ort_threads)
        yield

    app = FastAPI(title="ragline monolith baseline", lifespan=lifespan)
    install_error_handlers(app, internal="see the instance's log")

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "passages": len(state["m"].passages)}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        m = state["m"]
        return {"served": m.served, "in_flight": m.in_flight, "pid": os.getpid()}

    @app.post("/chat")
    async def chat(body: ChatRequest):
        m = state["m"]
        query, top_k = m.limits.query(body.query), m.limits.top_k(body.top_k)
        choices = {"answerer": body.answerer, "score_threshold": body.score_threshold}
        params = m.limits.params(body.max_tokens)
        if body.stream:
            return StreamingResponse(
                sse_events(m.chat_stream(query, top_k, params, **choices)),
                media_type="text/event-stream",
                # nginx would otherwise buffer the events and hold back the first token
                headers={"X-Accel-Buffering": "no"},
            )
        return await m.chat(query, top_k, params, **choices)

    return app


# --- N instances behind nginx -------------------------------------------------------------

NGINX_CONF = """\
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format upstream '$remote_addr [$time_local] "$request" $status '
                        '$request_time $upstream_addr $upstream_status $upstream_response_time';
    access_log {dir}/access.log upstream buffer=64k flush=1s;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream monolith {{
        least_conn;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://monolith;
            proxy_read_timeout {read_timeout}s;
        }}
    }}
}}
"""


def render_nginx_conf(
    directory: Path,
    port: int,
    upstreams: Sequence[int],
    read_timeout: float = 60.0,
    workers: int = 1,
) -> str:
    """nginx.conf for ``upstreams`` (loopback ports) behind ``port``, all paths in ``directory``."""
    servers = "\n".join(
        f"        server 127.0.0.1:{u} max_fails=3 fail_timeout=30s;" for u in upstreams
    )
    return NGINX_CONF.format(
        dir=directory,
        servers=servers,
        port=port,
        read_timeout=max(1, round(read_timeout)),
        workers=workers,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx(nginx: str = "nginx") -> str:
    # Debian installs it in /usr/sbin, which a non-root PATH often lacks.
    found = shutil.which(nginx) or shutil.which(nginx, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError(
            f"{nginx!r} not found: install Debian's nginx (apt-get install nginx, or `make nginx`)"
            ", or point the load test at a monolith you run yourself (--monolith-url)"
        )
    return found


class _Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, grace_s: float) -> None:
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def shut_down(
    procs: Sequence[_Process], grace_s: float, directory: Path | None, logs_to: Path | None
) -> None:
    """SIGTERM every process, then wait (SIGKILL after ``grace_s``); the logs of ``directory``
    copied to ``logs_to`` when given, then the directory removed."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait_or_kill(grace_s)
    if directory is not None:
        if logs_to is not None:
            logs_to.mkdir(parents=True, exist_ok=True)
            for path in directory.glob("*.log"):
                shutil.copy(path, logs_to / path.name)
        shutil.rmtree(directory, ignore_errors=True)


class MonolithCluster:
    """N monolith instances and nginx (least_conn) in front of them; ``url`` is nginx's.

    ``with MonolithCluster(3) as cluster: ...`` or ``start()``/``stop()``. Ports default to free
    loopback ports; the instances inherit the environment (``RAGLINE_*`` settings included).
    ``logs_to``: a folder that keeps the instances' and nginx's logs after ``stop()``.
    """

    def __init__(
        self,
        instances: int = 3,
        corpus: Path = DEFAULT_CORPUS,
        nginx: str = "nginx",
        port: int = 0,
        instance_ports: Sequence[int] | None = None,
        read_timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        threads: int = 0,
        ort_threads: int = 1,
        nginx_workers: int = 1,
        env: dict[str, str] | None = None,
        logs_to: Path | None = None,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        if instance_ports is not None and len(instance_ports) != instances:
            raise ValueError(f"instance_ports has {len(instance_ports)} ports for {instances}")
        self.nginx = find_nginx(nginx)
        self.instances = instances
        self.corpus = Path(corpus)
        self.read_timeout_s = read_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.threads = threads or max(1, (os.cpu_count() or 1) // instances)
        self.ort_threads = ort_threads
        self.nginx_workers = nginx_workers
        self.logs_to = logs_to
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.ports = list(instance_ports or [free_port() for _ in range(instances)])
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir: Path | None = None
        self.procs: list[_Process] = []
        self.proxy: _Process | None = None
        # Loopback only: an HTTP(S)_PROXY in the environment must not catch these requests.
        self._http = httpx.Client(timeout=5, trust_env=False)

    def instance_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def _wait_healthy(self, url: str, proc: _Process, deadline: float) -> None:
        while True:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with status {proc.proc.returncode}; its log ends:\n"
                    f"{proc.tail()}"
                )
            try:
                if self._http.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} not healthy at {url} within {self.startup_timeout_s:.0f}s; "
                    f"its log ends:\n{proc.tail()}"
                )
            time.sleep(0.2)  # polling a condition with a deadline, not waiting blindly

    def start(self) -> MonolithCluster:
        self.dir = Path(tempfile.mkdtemp(prefix="ragline-monolith-"))
        # Run as root, nginx's workers drop to `nobody`: they must reach the temp paths (nginx
        # creates and chowns them itself) inside this directory.
        self.dir.chmod(0o755)
        try:
            for i, port in enumerate(self.ports):
                cmd = [sys.executable, "-m", "loadtest.monolith", "--port", str(port)]
                cmd += ["--corpus", str(self.corpus), "--threads", str(self.threads)]
                cmd += ["--ort-threads", str(self.ort_threads)]
                log = self.dir / f"monolith-{i}.log"
                self.procs.append(_Process(f"monolith instance {i}", cmd, log, self.env))
            # They load in parallel; the deadline covers all of them.
            deadline = time.monotonic() + self.startup_timeout_s
            for url, proc in zip(self.instance_urls(), self.procs, strict=True):
                self._wait_healthy(url, proc, deadline)
            conf = self.dir / "nginx.conf"
            conf.write_text(
                render_nginx_conf(
                    self.dir, self.port, self.ports, self.read_timeout_s, self.nginx_workers
                )
            )
            # -e: the error log before the config is read would otherwise be /var/log/nginx's.
            cmd = [self.nginx, "-p", str(self.dir), "-e", str(self.dir / "error.log")]
            cmd += ["-c", str(conf)]
            self.proxy = _Process("nginx", cmd, self.dir / "nginx.log", self.env)
            try:
                self._wait_healthy(self.url, self.proxy, time.monotonic() + 30)
            except RuntimeError as exc:
                raise RuntimeError(f"{exc}\nnginx error.log:\n{self.nginx_errors()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def nginx_errors(self) -> str:
        path = (self.dir or Path("/nonexistent")) / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill_instance(self, i: int) -> None:
        """SIGKILL instance ``i`` (a crash, for fault tests)."""
        self.procs[i].proc.kill()
        self.procs[i].proc.wait()

    def served(self) -> list[int | None]:
        """Requests each instance has answered (None for a dead one)."""
        counts: list[int | None] = []
        for url, proc in zip(self.instance_urls(), self.procs, strict=True):
            try:
                counts.append(
                    self._http.get(f"{url}/stats").json()["served"] if proc.alive() else None
                )
            except httpx.HTTPError:
                counts.append(None)
        return counts

    def stop(self, grace_s: float = 10.0) -> None:
        """nginx first (no new requests), then the instances: SIGTERM, then SIGKILL after
        ``grace_s``; the temporary directory goes with them."""
        shut_down(([self.proxy] if self.proxy else []) + self.procs, grace_s, self.dir,
                  self.logs_to)  # fmt: skip
        self.proxy, self.procs, self.dir = None, [], None

    def __enter__(self) -> MonolithCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._http.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="loadtest monolith",
        description="The replicated-monolith baseline: one instance (embed, exact FAISS search "
        "and llama.cpp in one process), or N of them behind nginx least_conn (--instances).",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (one instance)")
    p.add_argument("--port", type=int, default=8090, help="the instance's port, or nginx's")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="file or folder to index")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="llama.cpp threads per instance (0: all cores, or cpu_count // N with --instances)",
    )
    p.add_argument("--ort-threads", type=int, default=1, help="ONNX Runtime threads (0: auto)")
    p.add_argument(
        "--instances", type=int, default=0, help="run N instances behind nginx on --port"
    )
    p.add_argument("--nginx", default="nginx", help="nginx binary (with --instances)")
    p.add_argument("--read-timeout-s", type=float, default=60.0, help="nginx proxy_read_timeout")
    args = p.parse_args(argv)
    if not args.corpus.exists():
        p.error(f"--corpus {args.corpus} does not exist")
    if args.instances:
        return _serve_cluster(args)
    import uvicorn

    app = create_app(args.corpus, args.threads, args.ort_threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", workers=1)
    return 0


def _serve_cluster(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster = MonolithCluster(
        args.instances,
        corpus=args.corpus,
        nginx=args.nginx,
        port=args.port,
        read_timeout_s=args.read_timeout_s,
        threads=args.threads,
        ort_threads=args.ort_threads,
    )
    with cluster:
        print(f"{args.instances} monolith instances behind nginx at {cluster.url}", flush=True)
        while not stop.wait(1.0):
            if cluster.proxy is None or not cluster.proxy.alive():
                print("nginx exited; stopping", file=sys.stderr)
                return 1
            if not any(p.alive() for p in cluster.procs):
                print("every instance exited; stopping", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
