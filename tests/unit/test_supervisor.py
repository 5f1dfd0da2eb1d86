"""The launcher's supervision: a child that dies is restarted with backoff, stop ends all."""

from __future__ import annotations

import time

from cli.supervisor import Backoff, Child, Supervisor


def test_backoff_doubles_to_its_cap() -> None:
    b = Backoff()
    assert [b.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30


def wait_exited(child: Child) -> None:
    child.process.wait(timeout=10)


def test_a_dead_child_is_restarted_after_its_backoff_and_the_others_are_left_alone(
    tmp_path,
) -> None:
    said: list[str] = []
    crash = Child("generate-1", ["/bin/sh", "-c", "echo boom; exit 3"], tmp_path / "g1.log")
    steady = Child("generate-0", ["/bin/sh", "-c", "sleep 30"], tmp_path / "g0.log")
    sup = Supervisor([steady, crash], env={}, backoff=Backoff(1, 30, 60), say=said.append)
    sup.start_all()
    try:
        steady_pid = steady.process.pid
        wait_exited(crash)
        t0 = crash.started_at
        sup.poll(now=t0 + 0.5)
        assert crash.restart_at == t0 + 1.5 and crash.restarts == 1
        assert "generate-1 exited with code 3 after 0.5s up; restarting it in 1s" in said[0]
        assert "boom" in said[0], "the log's tail is shown"
        first = crash.process.pid
        sup.poll(now=t0 + 1.0)  # not yet due
        assert crash.process.pid == first and len(said) == 1
        sup.poll(now=t0 + 1.5)
        assert crash.process.pid != first and said[1].startswith("ragline: generate-1 restarted")
        # dying again at once doubles the wait; staying up past reset_after_s resets it
        wait_exited(crash)
        sup.poll(now=crash.started_at + 0.1)
        assert crash.restart_at == crash.started_at + 0.1 + 2 and crash.restarts == 2
        sup.poll(now=crash.restart_at)
        wait_exited(crash)
        sup.poll(now=crash.started_at + 61)
        assert crash.restarts == 1 and crash.restart_at == crash.started_at + 62
        assert steady.process.pid == steady_pid and steady.process.poll() is None
    finally:
        t = time.monotonic()
        sup.stop(grace=5)
    assert steady.process.returncode == -15, "SIGTERM first"
    assert time.monotonic() - t < 5
    assert crash.restart_at is None, "nothing restarts after stop"
