"""Run a Serve config on a real local Ray cluster, shared by the test modules that use it, on loopback ports."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from amalia_serve.local_run import local_serve_config, variant_app_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class RunningServe:
    base_url: str
    metrics_url: str
    app_name: str


# vLLM's CPU build sized for a 2-core CI machine and the tiny demo checkpoint: a small KV cache, no torch.compile
# (a start in ~12 s instead of ~35 s), and a small batch so tests can fill it.
DEMO_ENGINE: dict[str, Any] = {"max_num_seqs": 8, "kv_cache_memory_bytes": 64 << 20, "enforce_eager": True}


def demo_app_config(
    sft: Path,
    dpo: Path,
    port: int,
    weights: dict[str, int] | None = None,
    deployment: dict[str, Any] | None = None,
    **engine: Any,
) -> dict[str, Any]:
    """The `make run` layout (front app + one app per variant), tiny checkpoints, sized for 2 cores; `deployment`
    and `engine` keys override the variants' defaults."""

    def variant_app(name: str, path: Path) -> dict[str, Any]:
        options = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}, **(deployment or {})}
        return variant_app_config(name, path, {**DEMO_ENGINE, **engine}, options)

    weights = weights or {"amalia-sft": 90, "amalia-dpo": 10}
    return local_serve_config(port, weights, [variant_app("amalia-sft", sft), variant_app("amalia-dpo", dpo)])


@dataclass
class _SharedStack:
    """The session's local Ray and Serve, kept from one test module to the next."""

    http_port: int
    metrics_port: int


_shared: _SharedStack | None = None
# Logical CPUs of the session's Ray: enough for the largest module's replicas (tracing runs 4 variants).
SHARED_NUM_CPUS = 8


@contextmanager
def running_serve(config: dict[str, Any], fresh: bool = False) -> Iterator[RunningServe]:
    """Deploy `config` on the session's local Ray Serve, starting it on first use, and wait until it runs.

    Serve deploys a config declaratively: applications the previous module had and this config lacks are
    deleted, and an application whose config is unchanged keeps its running replicas, so modules on the same
    demo variants do not start vLLM again. The config's HTTP port is replaced by the session's. Counters live
    on (tests compare before and after). `fresh` stops the shared stack first, for a test that must see only
    series of its own (a new Prometheus would take an earlier module's counters as born in its window).
    """
    global _shared
    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    if fresh:
        stop_shared_serve()
    if _shared is None:
        stack = _SharedStack(http_port=free_port(), metrics_port=free_port())
        start_local_ray(
            num_cpus=SHARED_NUM_CPUS, dashboard=False, metrics_export_port=stack.metrics_port, log_to_driver=False
        )
        _shared = stack
    config = {**config, "http_options": {**config["http_options"], "port": _shared.http_port}}
    deploy_config(config)
    names = [app["name"] for app in config["applications"]]
    wait_until_running(names, timeout_s=300)
    _wait_until_only_running_replicas(names)
    yield RunningServe(
        f"http://127.0.0.1:{_shared.http_port}", f"http://127.0.0.1:{_shared.metrics_port}/metrics", names[0]
    )
    if fresh:
        stop_shared_serve()


def _wait_until_only_running_replicas(apps: list[str], timeout_s: float = 120.0) -> None:
    """An application is RUNNING while the replicas its previous config started are still stopping; a module
    that counts replica processes must not find those."""
    import time

    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        statuses = serve.status().applications
        states = {state for app in apps for deployment in statuses[app].deployments.values()
                  for state, count in deployment.replica_states.items() if count}  # fmt: skip
        if states <= {"RUNNING"}:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas of {apps} still {sorted(states)} after {timeout_s:.0f} s")
        time.sleep(0.5)


def stop_shared_serve() -> None:
    """Shut the session's Serve and Ray down (before a module that starts a Ray of its own, and at the end)."""
    global _shared
    if _shared is None:
        return
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
        _shared = None


def engine_stats(variant: str) -> dict[str, int]:
    """`unfinished` and `aborted` of the variant's engine (its one replica), asked over a DeploymentHandle."""
    from ray import serve

    stats = serve.get_deployment_handle(variant, app_name=variant).stats.remote().result(timeout_s=30)
    return {"unfinished": stats.unfinished, "aborted": stats.aborted}


def replica_processes(app: str, deployment: str) -> list[Any]:
    """The worker processes of a deployment's replicas, by the title Ray gives them:
    `ray::ServeReplica:<app>:<deployment>` (while a method runs Ray may append `.method`)."""
    import psutil
    import ray

    title = f"ray::ServeReplica:{app}:{deployment}"
    # Only this session's Ray: another Ray on the machine (a second checkout's tests) may run the same titles.
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = " ".join(proc.info["cmdline"] or []).split()
        if words and (words[0] == title or words[0].startswith(f"{title}.")):
            with contextlib.suppress(psutil.Error):
                if any(parent.pid == raylet for parent in proc.parents()):
                    found.append(proc)
    return found


def engine_core_of(variant: str, timeout_s: float = 10.0) -> Any:
    """vLLM's engine-core process under the variant's replica (its title is set by vLLM, `VLLM::EngineCore`).

    Looked for again until `timeout_s`: one look has missed a replica that had just answered (once in a full
    run; Ray rewrites a replica's process title around its calls), and a second look costs nothing when the
    first finds it."""
    import time

    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        for replica in replica_processes(variant, variant):
            with contextlib.suppress(psutil.Error):
                for child in replica.children(recursive=True):
                    if "EngineCore" in " ".join(child.cmdline() or [child.name()]):
                        return child
        if time.monotonic() > deadline:
            raise AssertionError(f"no vLLM engine-core process under a replica of {variant} after {timeout_s:.0f} s")
        time.sleep(0.2)


@contextmanager
def engine_paused(variant: str) -> Iterator[None]:
    """SIGSTOP the variant's engine core for the block: requests it has taken stay in flight, however fast the
    model; the replica itself keeps answering Serve. SIGCONT afterwards."""
    import signal

    core = engine_core_of(variant)
    core.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        core.send_signal(signal.SIGCONT)
