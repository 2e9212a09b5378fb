"""Run a Serve config on a real local Ray cluster for one test module, on free loopback ports."""

from __future__ import annotations

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


@contextmanager
def running_serve(config: dict[str, Any], num_cpus: int = 4) -> Iterator[RunningServe]:
    """Start a fresh local Ray, deploy `config`, wait until it runs; tear everything down afterwards."""
    import ray
    from ray import serve

    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    metrics_port = free_port()
    start_local_ray(num_cpus=num_cpus, dashboard=False, metrics_export_port=metrics_port)
    try:
        deploy_config(config)
        names = [app["name"] for app in config["applications"]]
        wait_until_running(names, timeout_s=300)
        port = config["http_options"]["port"]
        yield RunningServe(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", names[0])
    finally:
        serve.shutdown()
        ray.shutdown()


def engine_stats(variant: str) -> dict[str, int]:
    """`unfinished` and `aborted` of the variant's engine (its one replica), asked over a DeploymentHandle."""
    from ray import serve

    stats = serve.get_deployment_handle(variant, app_name=variant).stats.remote().result(timeout_s=30)
    return {"unfinished": stats.unfinished, "aborted": stats.aborted}


def replica_processes(app: str, deployment: str) -> list[Any]:
    """The worker processes of a deployment's replicas, by the title Ray gives them:
    `ray::ServeReplica:<app>:<deployment>` (while a method runs Ray may append `.method`)."""
    import psutil

    title = f"ray::ServeReplica:{app}:{deployment}"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        words = " ".join(proc.info["cmdline"] or []).split()
        if words and (words[0] == title or words[0].startswith(f"{title}.")):
            found.append(proc)
    return found


def engine_core_of(variant: str) -> Any:
    """vLLM's engine-core process under the variant's replica (its title is set by vLLM, `VLLM::EngineCore`)."""
    for replica in replica_processes(variant, variant):
        cores = [c for c in replica.children(recursive=True) if "EngineCore" in " ".join(c.cmdline() or [c.name()])]
        if cores:
            return cores[0]
    raise AssertionError(f"no vLLM engine-core process under a replica of {variant}")


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
