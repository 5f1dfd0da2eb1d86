"""The children of ``ragline run`` / ``ragline up``: start them, restart the ones that die, stop.

Once the stack is up, a child that exits on its own (a crash, an OOM kill, ``kill -9``) is
started again with the same command line, so on the same port, after an exponential backoff
(``Backoff``: 1 s doubling to 30 s, back to 1 s once a child stayed up 60 s), while every other
child keeps serving: the edge routes around a dead replica and takes it back when its health
check says SERVING again. Only the launcher's own Ctrl-C / SIGTERM stops everything. During
start-up the launcher does not restart anything: a child that dies then (a bad flag, a missing
model) fails ``ragline run`` with the child's log tail, as a restart loop would only hide it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Backoff:
    """Delay before the n-th restart in a row of a child (n from 0)."""

    initial_s: float = 1.0
    max_s: float = 30.0
    # A child that stayed up this long is healthy again: its next crash waits initial_s.
    reset_after_s: float = 60.0

    def delay(self, restarts_in_a_row: int) -> float:
        return min(self.max_s, self.initial_s * 2 ** min(restarts_in_a_row, 30))


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0  # in a row: back to 0 once the child stayed up Backoff.reset_after_s
    restart_at: float | None = None  # set while the child is dead and waiting for its restart

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # A new session keeps the terminal's Ctrl-C away from children: the launcher decides
        # the shutdown order.
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"code {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"code {code}"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Supervisor:
    """Keeps every child running until ``stop``; ``poll`` does one round of supervision."""

    def __init__(
        self,
        children: list[Child],
        env: dict[str, str],
        backoff: Backoff = Backoff(),
        say: Callable[[str], None] = _stderr,
    ) -> None:
        self.children = children
        self.env = env
        self.backoff = backoff
        self.say = say

    def start_all(self) -> None:
        for child in self.children:
            child.start(self.env)

    def poll(self, now: float | None = None) -> None:
        """Schedule a restart for each child that died since the last call; start those due."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.restart_at is None and child.exited:
                up = now - child.started_at
                if up >= self.backoff.reset_after_s:
                    child.restarts = 0
                delay = self.backoff.delay(child.restarts)
                child.restarts += 1
                child.restart_at = now + delay
                self.say(
                    f"ragline: {child.name} exited with {describe_exit(child.process.returncode)} "
                    f"after {up:.1f}s up; restarting it in {delay:g}s (restart {child.restarts} "
                    f"in a row; the other services keep serving). Last lines of "
                    f"{child.log_path}:\n{child.tail(10)}"
                )
            elif child.restart_at is not None and now >= child.restart_at:
                child.start(self.env)
                self.say(f"ragline: {child.name} restarted (pid {child.process.pid})")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every running child, SIGKILL to those still running after ``grace``."""
        for child in self.children:
            child.restart_at = None
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
