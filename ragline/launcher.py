"""``ragline run``: the embedded deployment on one machine.

Starts embed, retrieve, generate and api as separate processes talking gRPC over loopback,
waits for each to report healthy, ingests the sample corpus (unchanged documents are skipped,
so a second start takes seconds), prints a ready-to-paste curl and stays in the foreground.
Ctrl-C (or SIGTERM) stops every child: SIGTERM first, SIGKILL after the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from ragline.chunking import ChunkingPolicy
from ragline.clients import EmbedClient, RetrieveClient, wait_for_serving
from ragline.config import default_data_dir
from ragline.ingest import Ingestor

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "corpus" / "handbook"
EXAMPLE_QUESTION = "How many days do I have to submit an expense claim?"


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A new session keeps the terminal's Ctrl-C away from children: the launcher decides
        # the shutdown order.
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def env_port(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragline run", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address every service binds")
    p.add_argument("--api-port", type=int, default=env_port("RAGLINE_API_PORT", 8080))
    p.add_argument("--embed-port", type=int, default=env_port("RAGLINE_EMBED_PORT", 50051))
    p.add_argument("--retrieve-port", type=int, default=env_port("RAGLINE_RETRIEVE_PORT", 50052))
    p.add_argument("--generate-port", type=int, default=env_port("RAGLINE_GENERATE_PORT", 50053))
    p.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="indexes, models, logs"
    )
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder to ingest at start")
    p.add_argument("--collection", default=os.environ.get("RAGLINE_API_COLLECTION", "default"))
    p.add_argument("--no-ingest", action="store_true", help="skip ingesting the corpus")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="stop everything once ready (smoke tests); default is to stay in the foreground",
    )
    return p


def children(ns: argparse.Namespace) -> list[Child]:
    py = sys.executable
    logs = ns.data_dir / "logs"
    h = ns.host
    return [
        Child("embed", [py, "-m", "services.embed", "--host", h, "--port", str(ns.embed_port)],
              logs / "embed.log"),
        Child("retrieve", [py, "-m", "services.retrieve", "--host", h,
                           "--port", str(ns.retrieve_port)], logs / "retrieve.log"),
        Child("generate", [py, "-m", "services.generate", "--host", h,
                           "--port", str(ns.generate_port)], logs / "generate.log"),
        Child("api", [py, "-m", "services.api", "--host", h, "--port", str(ns.api_port),
                      "--embed-address", f"{h}:{ns.embed_port}",
                      "--retrieve-address", f"{h}:{ns.retrieve_port}",
                      "--generate-address", f"{h}:{ns.generate_port}",
                      "--collection", ns.collection], logs / "api.log"),
    ]  # fmt: skip


async def wait_ready(ns: argparse.Namespace, procs: list[Child]) -> None:
    h = ns.host
    grpc_targets = [
        ("embed", f"{h}:{ns.embed_port}", "ragline.v1.Embed"),
        ("retrieve", f"{h}:{ns.retrieve_port}", "ragline.v1.Retrieve"),
        ("generate", f"{h}:{ns.generate_port}", "ragline.v1.Generate"),
    ]

    async def watch_children() -> None:
        while True:
            for child in procs:
                if child.process and child.process.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {child.process.returncode} during "
                        f"start-up; last lines of {child.log_path}:\n{child.tail()}"
                    )
            await asyncio.sleep(0.2)

    async def grpc_ready(name: str, address: str, service: str) -> None:
        t0 = time.monotonic()
        await wait_for_serving(address, service, timeout=ns.startup_timeout)
        print(f"  {name:<9} ready on {address} ({time.monotonic() - t0:.1f}s)", flush=True)

    async def api_ready() -> None:
        url = f"http://{h}:{ns.api_port}/livez"
        deadline = time.monotonic() + ns.startup_timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(url, timeout=2)).status_code == 200:
                        print(f"  {'api':<9} ready on http://{h}:{ns.api_port}", flush=True)
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"api not answering on {url} after {ns.startup_timeout}s")

    watcher = asyncio.create_task(watch_children())
    try:
        ready = asyncio.gather(*(grpc_ready(*t) for t in grpc_targets), api_ready())
        done, _ = await asyncio.wait({watcher, ready}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raise a child's death or a timeout
    finally:
        watcher.cancel()


async def ingest_corpus(ns: argparse.Namespace) -> None:
    embed = EmbedClient(f"{ns.host}:{ns.embed_port}")
    retrieve = RetrieveClient(f"{ns.host}:{ns.retrieve_port}")
    try:
        ingestor = Ingestor(embed, retrieve, ns.collection, ChunkingPolicy())
        counts = {"ingested": 0, "unchanged": 0}

        def progress(i: int, total: int, result) -> None:
            counts[result.status] += 1
            print(f"\r  ingesting {ns.corpus.name}: {i}/{total}", end="", flush=True)

        t0 = time.monotonic()
        await ingestor.ingest_paths(ns.corpus, progress)
        print(
            f"\r  corpus {ns.corpus}: {counts['ingested']} ingested, "
            f"{counts['unchanged']} unchanged ({time.monotonic() - t0:.1f}s)",
            flush=True,
        )
    finally:
        await embed.close()
        await retrieve.close()


def ports_in_use(ns: argparse.Namespace) -> list[str]:
    busy = []
    for port in (ns.api_port, ns.embed_port, ns.retrieve_port, ns.generate_port):
        with socket.socket() as sock:
            # SO_REUSEADDR: connections in TIME_WAIT from a previous run do not count as busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ns.host, port))
            except OSError:
                busy.append(str(port))
    return busy


def stop_all(procs: list[Child], grace: float = 10.0) -> None:
    for child in procs:
        if child.process and child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in procs:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    ns.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAGLINE_DATA_DIR": str(ns.data_dir), "PYTHONUNBUFFERED": "1"}
    # Children import services.* from the repository even when not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    procs = children(ns)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    # Installed explicitly: a shell that starts us in the background leaves SIGINT ignored.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    busy = ports_in_use(ns)
    if busy:
        print(
            f"ragline: port(s) {', '.join(busy)} already in use on {ns.host}: is ragline already "
            "running? Stop it, or pick other ports (--api-port, --embed-port, ...).",
            file=sys.stderr,
        )
        return 1
    print(f"ragline: starting 4 services (logs in {ns.data_dir / 'logs'})", flush=True)
    t0 = time.monotonic()
    try:
        for child in procs:
            child.start(env)
        asyncio.run(wait_ready(ns, procs))
        if not ns.no_ingest:
            asyncio.run(ingest_corpus(ns))
        body = '{"query": "' + EXAMPLE_QUESTION + '"}'
        print(
            f"ragline is up in {time.monotonic() - t0:.1f}s. Ask it:\n\n"
            f"  curl -s http://{ns.host}:{ns.api_port}/chat "
            f"-H 'Content-Type: application/json' -d '{body}'\n\n"
            "Ctrl-C stops every service.",
            flush=True,
        )
        if ns.exit_after_ready:
            return 0
        while True:
            for child in procs:
                if child.process and child.process.poll() is not None:
                    print(
                        f"ragline: {child.name} exited with code {child.process.returncode}; "
                        f"stopping.\n{child.tail()}",
                        file=sys.stderr,
                    )
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nragline: stopping...", flush=True)
        return 0
    except Exception as exc:  # start-up failure: say what broke, then clean up
        print(f"ragline: start-up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_all(procs)
        print("ragline: all services stopped", flush=True)
