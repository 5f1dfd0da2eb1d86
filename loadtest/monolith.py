"""The replicated monolith: the write-up's architecture, as the load test's baseline.

One process does everything for a request, the way Langchain-Chatchat-style stacks do: embed the
question, search a FAISS index held in memory, stuff the passages into a prompt, run the LLM.
Requests do not share work: each embeds its own question alone and the LLM generates one answer
at a time (a lock around llama.cpp's high-level API; concurrent requests wait for it). The
index is rebuilt from the corpus at every start, as the write-up's instances did.

For a fair comparison it uses ragline's parts wherever the result should be the same: the same
embedding model (ONNX Runtime, `services/embed/model.py`), the same chunking and passage ids
as ragline's ingestion, exact inner-product search (ragline's flat policy below 20,000
passages), the same prompt assembly (`services/api/prompt.py`) and generation defaults, and the
same GGUF. `POST /chat` answers in ragline's JSON shape.

`MonolithCluster` starts N instances and Debian's nginx in front of them with `least_conn` and
`max_fails=3 fail_timeout=30s`, the write-up's configuration, everything in a temporary
directory on loopback. Threads: the instances share the machine, so each gets
`cpu_count // N` llama.cpp threads (at least one) and one ONNX Runtime thread; more would
only make them fight over the same cores.

    python -m loadtest.monolith --port 8090                     # one instance
    loadtest sweep --compare-monolith --monolith-instances 3    # N instances behind nginx
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import httpx
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO / "corpus" / "handbook"


@dataclass
class Passage:
    id: str
    text: str
    metadata: dict[str, str]


class Monolith:
    """Embed, search and generate in one process, one generation at a time."""

    def __init__(self, corpus: Path, threads: int, ort_threads: int = 1) -> None:
        from llama_cpp import Llama

        from ragline.chunking import ChunkingPolicy, chunk_text, document_title
        from ragline.ingest import decode_document, iter_documents
        from ragline.models import resolve_embed_model, resolve_generate_model
        from services.api.settings import ApiSettings
        from services.embed.model import EmbeddingModel
        from services.embed.settings import EmbedSettings
        from services.generate.settings import GenerateSettings

        self.settings = ApiSettings()
        embed_settings = EmbedSettings()
        gen_settings = GenerateSettings()
        model_dir = resolve_embed_model(embed_settings.model, embed_settings.data_dir)
        self.embedder = EmbeddingModel(model_dir, intra_op_threads=ort_threads)
        policy = ChunkingPolicy()  # what `ragline run` ingests with
        self.passages: list[Passage] = []
        base = corpus if corpus.is_dir() else corpus.parent
        for path in iter_documents(corpus):
            document_id = path.relative_to(base).as_posix()
            text = decode_document(path.read_bytes(), path.name)
            meta = {"source": document_id, "title": document_title(text, path.stem)}
            for chunk in chunk_text(text, policy):
                m = dict(meta)
                if chunk.heading:
                    m["heading"] = chunk.heading
                self.passages.append(Passage(f"{document_id}#{chunk.index}", chunk.text, m))
        if not self.passages:
            raise ValueError(f"no documents to index under {corpus}")
        vectors, _ = self.embedder.embed([p.text for p in self.passages], kind="passage")
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        self.llm = Llama(
            model_path=str(resolve_generate_model(gen_settings.model)),
            n_ctx=gen_settings.context_length,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.lock = threading.Lock()  # llama.cpp's context serves one request at a time
        self.served = 0

    def chat(self, query: str, top_k: int, max_tokens: int) -> dict:
        from ragline.v1 import retrieve_pb2
        from services.api.prompt import build_messages, select_passages

        start = time.perf_counter()
        vectors, _ = self.embedder.embed([query], kind="query")
        t_embed = time.perf_counter()
        scores, rows = self.index.search(vectors, top_k)
        hits = [
            retrieve_pb2.Hit(
                id=self.passages[r].id,
                score=float(s),
                text=self.passages[r].text,
                metadata=self.passages[r].metadata,
            )
            for s, r in zip(scores[0], rows[0], strict=True)
            if r >= 0
        ]
        t_search = time.perf_counter()
        chosen = select_passages(hits, self.settings.context_tokens, self.settings.prompt_strategy)
        messages = build_messages(query, chosen)
        with self.lock:
            out = self.llm.create_chat_completion(
                messages=messages,
                max_tokens=max_tokens,
                temperature=self.settings.temperature,
                seed=0,
            )
            self.served += 1
        end = time.perf_counter()
        choice = out["choices"][0]
        return {
            "answer": (choice["message"]["content"] or "").strip(),
            "sources": [
                {
                    "id": h.id,
                    "score": round(float(h.score), 6),
                    "text": h.text,
                    "metadata": dict(h.metadata),
                }
                for h in hits
            ],
            "timings_ms": {
                "embed": round((t_embed - start) * 1000, 2),
                "retrieve": round((t_search - t_embed) * 1000, 2),
                # Waiting for the lock is part of generation, as queueing for the generate stage
                # is part of ragline's generate timing.
                "generate": round((end - t_search) * 1000, 2),
                "total": round((end - start) * 1000, 2),
            },
            "usage": {
                "prompt_tokens": out["usage"]["prompt_tokens"],
                "completion_tokens": out["usage"]["completion_tokens"],
            },
            "finish_reason": choice.get("finish_reason") or "",
            "cached": False,
        }


class ChatRequest(BaseModel):
    query: str = Field(min_length=1, max_length=4000)
    top_k: int | None = Field(None, ge=1, le=20)
    max_tokens: int | None = Field(None, ge=1)


def create_app(corpus: Path, threads: int, ort_threads: int) -> FastAPI:
    state: dict[str, Monolith] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        state["m"] = await run_in_threadpool(Monolith, corpus, threads, ort_threads)
        yield

    app = FastAPI(title="ragline monolith baseline", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return JSONResponse(
            {"error": {"code": "invalid_argument", "message": message}}, status_code=400
        )

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "passages": len(state["m"].passages)}

    @app.get("/stats")
    async def stats():
        return {"served": state["m"].served, "pid": os.getpid()}

    @app.post("/chat")
    async def chat(body: ChatRequest):
        if not body.query.strip():
            return JSONResponse(
                {"error": {"code": "invalid_argument", "message": "query is empty"}},
                status_code=400,
            )
        m = state["m"]
        top_k = body.top_k or m.settings.default_top_k
        max_tokens = min(body.max_tokens or m.settings.max_tokens, m.settings.max_tokens)
        return await run_in_threadpool(m.chat, body.query, top_k, max_tokens)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="loadtest monolith",
        description="One instance of the replicated monolith (embed + search + LLM in-process).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    p.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all cores)")
    p.add_argument("--ort-threads", type=int, default=0, help="ONNX Runtime threads (0: auto)")
    args = p.parse_args(argv)
    import uvicorn

    threads = args.threads or os.cpu_count() or 1
    app = create_app(args.corpus, threads, args.ort_threads)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


# --- N instances behind nginx -------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
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
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout {read_timeout}s;
        }}
    }}
}}
"""


def render_nginx_conf(directory: Path, port: int, upstreams: list[int], read_timeout: float) -> str:
    servers = "\n".join(
        f"        server 127.0.0.1:{u} max_fails=3 fail_timeout=30s;" for u in upstreams
    )
    return NGINX_CONF.format(
        dir=directory, servers=servers, port=port, read_timeout=int(read_timeout)
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MonolithCluster:
    """N monolith instances and nginx in front of them; ``url`` is nginx's address."""

    def __init__(
        self,
        instances: int = 3,
        corpus: Path = DEFAULT_CORPUS,
        nginx: str = "nginx",
        read_timeout_s: float = 60.0,
        startup_timeout_s: float = 300.0,
        threads: int = 0,
    ) -> None:
        if instances < 1:
            raise ValueError("instances must be at least 1")
        self.instances = instances
        self.corpus = corpus
        # Debian installs it in /usr/sbin, which a non-root PATH may lack.
        self.nginx = shutil.which(nginx) or shutil.which(nginx, path="/usr/sbin:/usr/local/sbin")
        if self.nginx is None:
            raise RuntimeError(
                f"{nginx!r} not found: install Debian's nginx (apt-get install nginx, or "
                "`make nginx`) or pass --monolith-url to use a monolith you run yourself"
            )
        self.read_timeout_s = read_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.threads = threads or max(1, (os.cpu_count() or 1) // instances)
        self.dir = Path(tempfile.mkdtemp(prefix="ragline-monolith-"))
        self.ports = [_free_port() for _ in range(instances)]
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []

    def instance_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = (self.dir / f"{name}.log").open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        self.procs.append(proc)
        return proc

    def _wait(self, url: str, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy in {self.startup_timeout_s}s")
            time.sleep(0.2)

    def start(self) -> MonolithCluster:
        try:
            instances = []
            for i, port in enumerate(self.ports):
                cmd = [sys.executable, "-m", "loadtest.monolith", "--port", str(port)]
                cmd += ["--corpus", str(self.corpus), "--threads", str(self.threads)]
                cmd += ["--ort-threads", "1"]
                instances.append(self._spawn(f"monolith-{i}", cmd))
            for i, (port, proc) in enumerate(zip(self.ports, instances, strict=True)):
                self._wait(f"http://127.0.0.1:{port}", proc, f"monolith-{i}")
            for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (self.dir / sub).mkdir(exist_ok=True)
            conf = self.dir / "nginx.conf"
            conf.write_text(render_nginx_conf(self.dir, self.port, self.ports, self.read_timeout_s))
            nginx = self._spawn("nginx", [self.nginx, "-p", str(self.dir), "-c", str(conf)])
            self._wait(self.url, nginx, "nginx")
        except BaseException:
            self.stop()
            raise
        return self

    def kill_instance(self, i: int) -> None:
        self.procs[i].kill()
        self.procs[i].wait()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> MonolithCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _served(urls: list[str]) -> list[int]:
    async with httpx.AsyncClient(timeout=5) as client:
        out = await asyncio.gather(*(client.get(f"{u}/stats") for u in urls))
    return [r.json()["served"] for r in out]


def served(cluster: MonolithCluster) -> list[int]:
    """Answers each live instance has generated (for tests and reports)."""
    live = [
        u for u, p in zip(cluster.instance_urls(), cluster.procs, strict=False) if p.poll() is None
    ]
    return asyncio.run(_served(live))


if __name__ == "__main__":
    sys.exit(main())
