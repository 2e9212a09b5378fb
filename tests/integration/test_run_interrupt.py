"""Ctrl-C on `make run` stops `amalia-serve run` and every process it started within 10 s.

`make` runs `amalia-serve run` in its own session, as a terminal would: a Makefile recipe like the
project's `run` target, the demo models, a free loopback port. Once /readyz answers, SIGINT goes to the
foreground process group (what the terminal's Ctrl-C does), and the test times until no process of
that session, nor any process descended from it, is left. Once with the server idle, once with
streams in flight, which Serve's own graceful shutdown would wait 20 s for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from serve_harness import demo_app_config, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

STOP_BOUND_S = 10.0


def session_processes(session: int) -> set[psutil.Process]:
    found = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session:
                found.add(proc)
        except (ProcessLookupError, PermissionError):
            continue
    return found


def alive(procs: set[psutil.Process]) -> set[psutil.Process]:
    """Those still running; a zombie has ended and only waits for its parent to reap it."""
    running = set()
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                running.add(proc)
        except psutil.NoSuchProcess:
            continue
    return running


def describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[:80]}"
    except psutil.NoSuchProcess:
        return f"{proc.pid} (gone)"


class Streams:
    """Long streaming chat completions in threads; in_flight() counts those still streaming."""

    def __init__(self, url: str, count: int) -> None:
        self.url, self.first_chunk = url, threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        body = {"model": "amalia-sft", "max_tokens": 1900, "stream": True,
                "messages": [{"role": "user", "content": "Conta-me uma história longa."}]}  # fmt: skip
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    self.first_chunk.set()
        except httpx.HTTPError:
            pass  # cut by the stop: expected

    def in_flight(self) -> int:
        return sum(t.is_alive() for t in self.threads)


# Streams in flight make the harder stop (each must be cut, not waited for); an idle stack takes the same path
# with nothing to cut, so it gets no run of its own.
STREAMS = 4


def test_ctrl_c_stops_make_run_and_all_it_started_within_bound_when_streams_are_in_flight(
    demo_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    sft, dpo = demo_checkpoints
    port = free_port()
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(demo_app_config(sft, dpo, port)), encoding="utf-8")
    command = f"{Path(sys.executable).parent / 'amalia-serve'} run --config {config} --port {port}"
    (tmp_path / "Makefile").write_text(f"export RAY_AUTH_MODE ?= disabled\nrun:\n\t{command}\n")
    log = (tmp_path / "run.log").open("wb")
    make = subprocess.Popen(["make", "-C", str(tmp_path), "run"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    started: set[psutil.Process] = set()
    try:
        deadline = time.monotonic() + 300
        while True:
            assert make.poll() is None, (tmp_path / "run.log").read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready after 300 s"
            time.sleep(0.5)
        load = Streams(f"http://127.0.0.1:{port}", STREAMS)
        assert load.first_chunk.wait(60)
        root = psutil.Process(make.pid)
        started = session_processes(make.pid) | {root, *root.children(recursive=True)}
        assert len(started) > 5  # make, amalia-serve, Ray's GCS, raylet, replicas, ...

        in_flight = load.in_flight()
        assert in_flight == STREAMS, "a stream ended before the interrupt"
        os.killpg(make.pid, signal.SIGINT)  # the terminal's Ctrl-C: the foreground process group
        interrupted = time.monotonic()
        while alive(started | session_processes(make.pid)) and time.monotonic() - interrupted < 60:
            time.sleep(0.1)
        took = time.monotonic() - interrupted
        left = sorted(describe(p) for p in alive(started | session_processes(make.pid)))
        print(f"stopped {len(started)} processes in {took:.1f} s after SIGINT with {in_flight} streams "
              f"in flight; left: {left}")  # fmt: skip
        assert not left, f"still running {took:.0f} s after Ctrl-C: {left}"
        assert took < STOP_BOUND_S
        assert "stopped" in (tmp_path / "run.log").read_text(errors="replace")
    finally:
        for proc in alive(started | session_processes(make.pid)):
            proc.kill()
        log.close()
