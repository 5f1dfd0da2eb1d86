"""A ragline stack for reliability runs: N replicas per stage, one edge, every process its own.

Each stage replica gets a gRPC port and a Prometheus port, so a run can kill, stop or restart
one replica (on the same port) and read what each one served. Retrieve replica 0 is the
writer; the others are read-only followers of its database. Used by benchmarks/faults.py and
benchmarks/soak.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ragline.clients import wait_for_serving  # noqa: E402

SERVICES = {"embed": "ragline.v1.Embed", "retrieve": "ragline.v1.Retrieve",
            "generate": "ragline.v1.Generate"}  # fmt: skip
DATA_METHODS = {
    "embed": ("/ragline.v1.Embed/Embed",),
    "retrieve": ("/ragline.v1.Retrieve/Search",),
    "generate": ("/ragline.v1.Generate/Generate", "/ragline.v1.Generate/GenerateStream"),
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str]
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/", timeout=5).text

    def handled(self, stage: str) -> float:
        """Data-path RPCs this replica completed (any status); 0 when it is down."""
        if not self.alive():
            return 0.0
        try:
            text = self.metrics()
        except httpx.HTTPError:
            return 0.0
        total = 0.0
        for m in re.finditer(r"ragline_grpc_server_handled_total\{([^}]*)\} (\S+)", text):
            method = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))).get("method")
            if method in DATA_METHODS[stage]:
                total += float(m.group(2))
        return total

    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else -1


class Stack:
    def __init__(
        self, workdir: Path, replicas: dict[str, int], api_args: list[str] = (), log_level="INFO"
    ) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAGLINE_")}
        self.env.update(RAGLINE_DATA_DIR=str(workdir / "data"), PYTHONUNBUFFERED="1")
        self.stages: dict[str, list[Proc]] = {}
        for stage, n in replicas.items():
            self.stages[stage] = []
            for i in range(n):
                port, mport = free_port(), free_port()
                argv = [sys.executable, "-m", f"services.{stage}", "--port", str(port),
                        "--metrics-port", str(mport), "--log-level", log_level]  # fmt: skip
                if stage == "retrieve" and i > 0:
                    argv += ["--read-only", "--refresh-s", "0.5"]
                name = f"{stage}-{i}"
                self.stages[stage].append(
                    Proc(name, argv, self.logs / f"{name}.log", self.env, port, mport)
                )
        self.api_port = free_port()
        addresses = {s: ",".join(p.address for p in procs) for s, procs in self.stages.items()}
        api_argv = [
            sys.executable, "-m", "services.api", "--port", str(self.api_port),
            "--log-level", log_level,
            "--embed-address", addresses["embed"],
            "--retrieve-address", addresses["retrieve"],
            "--retrieve-write-address", self.stages["retrieve"][0].address,
            "--generate-address", addresses["generate"],
            *api_args,
        ]  # fmt: skip
        self.api = Proc("api", api_argv, self.logs / "api.log", self.env)
        self.base = f"http://127.0.0.1:{self.api_port}"

    def all(self) -> list[Proc]:
        return [p for procs in self.stages.values() for p in procs] + [self.api]

    def start(self, timeout: float = 120) -> None:
        for procs in self.stages.values():
            for p in procs:
                p.start()
        asyncio.run(self._grpc_ready(timeout))
        self.api.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or not self.api.alive():
                raise RuntimeError("edge not ready:\n" + self.api.log_path.read_text()[-3000:])
            time.sleep(0.1)

    async def _grpc_ready(self, timeout: float) -> None:
        await asyncio.gather(
            *(
                wait_for_serving(p.address, SERVICES[stage], timeout)
                for stage, procs in self.stages.items()
                for p in procs
            )
        )

    def restart(self, stage: str, index: int, timeout: float = 120) -> None:
        proc = self.stages[stage][index]
        proc.start()
        asyncio.run(wait_for_serving(proc.address, SERVICES[stage], timeout))

    def ingest(self, directory: Path) -> int:
        n = 0
        for path in sorted(directory.glob("*.md")):
            r = httpx.post(
                f"{self.base}/documents",
                json={"text": path.read_text(), "document_id": path.name},
                timeout=120,
            )
            r.raise_for_status()
            n += 1
        return n

    def replica_state(self, stage: str, index: int) -> str:
        ready = httpx.get(f"{self.base}/readyz", timeout=5).json()
        return ready["stages"][stage].get(self.stages[stage][index].address, "GONE")

    def stop(self) -> None:
        for p in [self.api, *[p for procs in self.stages.values() for p in procs]]:
            p.stop()


def process_stats(pid: int) -> dict[str, int]:
    """Resident memory (KiB), open file descriptors and threads of a live process (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kib": rss, "fds": fds, "threads": threads}
