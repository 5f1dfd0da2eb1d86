"""``ragline run``: the embedded deployment on one machine.

Starts embed, retrieve, generate and api as separate processes talking gRPC over loopback,
waits for each to report healthy, ingests the sample corpus (unchanged documents are skipped,
so a second start takes seconds), prints a ready-to-paste curl and stays in the foreground.
Once up, a child that dies is restarted on its port with backoff while the others keep serving
(``cli.supervisor``); Ctrl-C (or SIGTERM) stops every child: SIGTERM first, SIGKILL after the
grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx
from pydantic_settings import BaseSettings

from cli.supervisor import Child, Supervisor
from ragline.chunking import ChunkingPolicy
from ragline.clients import EmbedStageClient, RetrieveStageClient, wait_for_serving
from ragline.config import default_data_dir
from services.api.ingest import Ingestor
from services.api.settings import ApiSettings
from services.embed.settings import EmbedSettings
from services.generate.settings import GenerateSettings
from services.retrieve.settings import RetrieveSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO_ROOT / "corpus" / "handbook"
EXAMPLE_QUESTION = "How many days do I have to submit an expense claim?"


STAGE_SETTINGS: dict[str, type[BaseSettings]] = {
    "api": ApiSettings,
    "embed": EmbedSettings,
    "retrieve": RetrieveSettings,
    "generate": GenerateSettings,
}


def env_default(settings: type[BaseSettings], name: str):
    """What a service started with this environment and no flag for ``name`` gets: its
    ``RAGLINE_<SERVICE>_<NAME>`` variable, else the settings class's default."""
    default = settings.model_fields[name].default
    raw = os.environ.get(f"{settings.model_config['env_prefix']}{name.upper()}")
    return default if raw is None else type(default)(raw)


def chunking_policy() -> ChunkingPolicy:
    """The api child's policy, so the corpus and ``POST /documents`` hash documents alike."""
    return ChunkingPolicy(
        env_default(ApiSettings, "chunk_words"),
        env_default(ApiSettings, "chunk_overlap_words"),
        env_default(ApiSettings, "chunk_tokens"),
    )


def build_parser(prog: str = "ragline run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address every service binds")
    for stage, settings in STAGE_SETTINGS.items():
        p.add_argument(f"--{stage}-port", type=int, default=env_default(settings, "port"))
    p.add_argument(
        "--data-dir", type=Path, default=default_data_dir(), help="indexes, models, logs"
    )
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder to ingest at start")
    p.add_argument("--collection", default=env_default(ApiSettings, "collection"))
    p.add_argument("--no-ingest", action="store_true", help="skip ingesting the corpus")
    p.add_argument(
        "--replicas",
        type=parse_replicas,
        default=parse_replicas(""),
        help="replicas per stage, e.g. embed=2,retrieve=2,api=1 (retrieve: 1 writer + readers)",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="stop everything once ready (smoke tests); default is to stay in the foreground",
    )
    return p


STAGES = ("embed", "retrieve", "generate", "api")
GRPC_SERVICE = {"embed": "ragline.v1.Embed", "retrieve": "ragline.v1.Retrieve",
                "generate": "ragline.v1.Generate"}  # fmt: skip
REPLICA_PORT_STEP = 100  # replica i of a stage listens on its base port + i * 100 (api: + i)


def parse_replicas(text: str) -> dict[str, int]:
    counts = dict.fromkeys(STAGES, 1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        stage, _, n = part.partition("=")
        if stage not in counts or not n.isdigit() or not 1 <= int(n) <= 16:
            raise argparse.ArgumentTypeError(
                f"bad replica count {part!r}: use stage=N with stage in {', '.join(STAGES)} "
                "and 1 <= N <= 16, e.g. embed=2,retrieve=2"
            )
        counts[stage] = int(n)
    return counts


def replica_ports(ns: argparse.Namespace) -> dict[str, list[int]]:
    base = {"embed": ns.embed_port, "retrieve": ns.retrieve_port,
            "generate": ns.generate_port, "api": ns.api_port}  # fmt: skip
    return {
        stage: [base[stage] + i * (1 if stage == "api" else REPLICA_PORT_STEP)
                for i in range(ns.replicas[stage])]
        for stage in STAGES
    }  # fmt: skip


def children(ns: argparse.Namespace) -> list[Child]:
    """The compose topology as processes: replicas per stage, retrieve replica 0 the writer and
    the others read-only followers of its database, every api pointing at every replica."""
    py = sys.executable
    logs = ns.data_dir / "logs"
    h = ns.host
    ports = replica_ports(ns)

    def addresses(stage: str) -> str:
        return ",".join(f"{h}:{p}" for p in ports[stage])

    procs = []
    for stage in ("embed", "retrieve", "generate"):
        for i, port in enumerate(ports[stage]):
            argv = [py, "-m", f"services.{stage}", "--host", h, "--port", str(port)]
            if stage == "retrieve" and i > 0:
                argv.append("--read-only")
            name = stage if len(ports[stage]) == 1 else f"{stage}-{i}"
            procs.append(Child(name, argv, logs / f"{name}.log"))
    for i, port in enumerate(ports["api"]):
        name = "api" if len(ports["api"]) == 1 else f"api-{i}"
        argv = [py, "-m", "services.api", "--host", h, "--port", str(port),
                "--embed-address", addresses("embed"),
                "--retrieve-address", addresses("retrieve"),
                "--retrieve-write-address", f"{h}:{ports['retrieve'][0]}",
                "--generate-address", addresses("generate"),
                "--collection", ns.collection]  # fmt: skip
        procs.append(Child(name, argv, logs / f"{name}.log"))
    return procs


async def wait_ready(ns: argparse.Namespace, procs: list[Child]) -> None:
    h = ns.host
    ports = replica_ports(ns)

    async def watch_children() -> None:
        while True:
            for child in procs:
                if child.process and child.process.poll() is not None:
                    raise RuntimeError(
                        f"{child.name} exited with code {child.process.returncode} during "
                        f"start-up; last lines of {child.log_path}:\n{child.tail()}"
                    )
            await asyncio.sleep(0.2)

    pids = {child.name: child.process.pid for child in procs if child.process}

    async def grpc_ready(name: str, address: str, service: str) -> None:
        t0 = time.monotonic()
        await wait_for_serving(address, service, timeout=ns.startup_timeout)
        print(f"  {name:<11} ready on {address} ({time.monotonic() - t0:.1f}s, pid {pids[name]})",
              flush=True)  # fmt: skip

    async def api_ready(name: str, port: int) -> None:
        # /readyz, not /livez: the edge must itself see every stage SERVING (its first health
        # probe may predate a stage's start), or the first curl after "up" gets a 503.
        url = f"http://{h}:{port}/readyz"
        deadline = time.monotonic() + ns.startup_timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                try:
                    if (await client.get(url, timeout=2)).status_code == 200:
                        print(f"  {name:<11} ready on http://{h}:{port} (pid {pids[name]})",
                              flush=True)  # fmt: skip
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"api not answering on {url} after {ns.startup_timeout}s")

    waits = []
    for stage, service in GRPC_SERVICE.items():
        for i, port in enumerate(ports[stage]):
            name = stage if len(ports[stage]) == 1 else f"{stage}-{i}"
            waits.append(grpc_ready(name, f"{h}:{port}", service))
    for i, port in enumerate(ports["api"]):
        waits.append(api_ready("api" if len(ports["api"]) == 1 else f"api-{i}", port))
    watcher = asyncio.create_task(watch_children())
    try:
        ready = asyncio.gather(*waits)
        done, _ = await asyncio.wait({watcher, ready}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # re-raise a child's death or a timeout
    finally:
        watcher.cancel()


async def wait_readers_caught_up(ns: argparse.Namespace, timeout: float = 60.0) -> None:
    """Read-only retrieve replicas serve what was just ingested before we say "ready"."""
    ports = replica_ports(ns)["retrieve"]
    # One stage client per replica: a pool over all of them would ask whichever answers first.
    replicas = [RetrieveStageClient.connect(f"{ns.host}:{p}") for p in ports]
    try:
        deadline = time.monotonic() + timeout
        while True:
            stats = [await r.stats(ns.collection, timeout=5) for r in replicas]
            if all(s.indexed == s.count for s in stats):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("read-only retrieve replicas did not catch up with the writer")
            await asyncio.sleep(0.1)
    finally:
        for r in replicas:
            await r.close()


async def ingest_corpus(ns: argparse.Namespace) -> None:
    embed = EmbedStageClient.connect(f"{ns.host}:{ns.embed_port}")
    retrieve = RetrieveStageClient.connect(f"{ns.host}:{ns.retrieve_port}")  # replica 0, the writer
    try:
        ingestor = Ingestor(embed, retrieve, ns.collection, chunking_policy())
        counts = {"ingested": 0, "unchanged": 0}

        def progress(i: int, total: int, result) -> None:
            counts[result.status] += 1
            print(f"\r  ingesting {ns.corpus.name}: {i}/{total}", end="", flush=True)

        t0 = time.monotonic()
        await ingestor.ingest_paths(ns.corpus, progress)
        await wait_readers_caught_up(ns)
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
    for port in (p for ports in replica_ports(ns).values() for p in ports):
        with socket.socket() as sock:
            # SO_REUSEADDR: connections in TIME_WAIT from a previous run do not count as busy.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((ns.host, port))
            except OSError:
                busy.append(str(port))
    return busy


def main(argv: list[str] | None = None, prog: str = "ragline run") -> int:
    ns = build_parser(prog).parse_args(argv)
    ns.data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAGLINE_DATA_DIR": str(ns.data_dir), "PYTHONUNBUFFERED": "1"}
    # Children import services.* from the repository even when not installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    procs = children(ns)
    supervisor = Supervisor(procs, env)
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
    print(f"ragline: starting {len(procs)} services (logs in {ns.data_dir / 'logs'})", flush=True)
    t0 = time.monotonic()
    try:
        supervisor.start_all()
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
        while True:  # until Ctrl-C / SIGTERM: a child that dies now is restarted, not fatal
            supervisor.poll()
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("\nragline: stopping...", flush=True)
        return 0
    except Exception as exc:  # start-up failure: say what broke, then clean up
        print(f"ragline: start-up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop()
        print("ragline: all services stopped", flush=True)
