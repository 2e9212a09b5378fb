"""The last step of stopping `amalia-serve run`: whatever it started and still runs is killed."""

from __future__ import annotations

import os
import subprocess
import time

from amalia_serve.local_run import is_running, kill_survivors, process_tree


def wait_until(condition, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_survivors_are_killed_when_orphaned_by_their_parent() -> None:
    # A shell with two children, like a replica and the engine process it started.
    shell = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"])
    assert wait_until(lambda: len(process_tree(shell.pid)) == 2)
    started = {pid: start for pid, start in process_tree(os.getpid()).items()
               if pid == shell.pid or pid in process_tree(shell.pid)}  # fmt: skip
    shell.kill()
    shell.wait()
    sleeps = set(started) - {shell.pid}
    assert not sleeps & set(process_tree(os.getpid()))  # orphans: no longer in this process's tree
    assert kill_survivors(started) == sorted(sleeps)
    assert wait_until(lambda: not any(is_running(pid, started[pid]) for pid in sleeps))


def test_survivors_spare_a_process_that_reused_a_pid_when_start_time_differs() -> None:
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert kill_survivors({other.pid: -1}) == []  # recorded with another start time
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()

