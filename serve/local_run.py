"""Run a Serve config (the same YAML a RayService's serveConfigV2 holds) on a local Ray cluster.

This is what `make run` and the integration tests use. It follows `serve run CONFIG` (Ray 2.60's
`ray/serve/scripts.py`): `serve_start` + `deploy_apps` of a validated `ServeDeploySchema`, which keeps the
`deployments` overrides (the ingress weights) that a plain `serve.run(app)` would drop.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from amalia_serve.config import RoutingConfig
from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME

logger = logging.getLogger(__name__)

SERVE_NAMESPACE = "serve"


def load_serve_config(path: str | Path) -> dict[str, Any]:
    return dict(yaml.safe_load(Path(path).read_text(encoding="utf-8")))


def resolve_model_paths(config: dict[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """Make relative `model_path`s absolute: replicas do not run in the directory the config came from."""
    resolved = copy.deepcopy(config)
    for app in resolved.get("applications", []):
        args = app.get("args") or {}
        for variant in [args, *args.get("variants", [])]:
            path = variant.get("model_path")
            if path and not Path(path).is_absolute() and (Path(base_dir) / path).exists():
                variant["model_path"] = str((Path(base_dir) / path).resolve())
    return resolved


def local_serve_config(
    port: int, weights: dict[str, int], variant_apps: list[dict[str, Any]], front_args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A whole Serve config on 127.0.0.1:`port`: the front application and the given variant applications."""
    front = {
        "name": "amalia",
        "route_prefix": "/",
        "import_path": "amalia_serve.app:build_app",
        "args": front_args or {"model_alias": "amalia"},
        "deployments": [{"name": INGRESS_DEPLOYMENT_NAME, "user_config": {"weights": dict(weights)}}],
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [front, *variant_apps],
    }


def variant_app_config(
    name: str, model_path: str | Path, engine: dict[str, Any], deployment: dict[str, Any]
) -> dict[str, Any]:
    """One variant application of a Serve config, in the layout the chart and the operator write."""
    return {
        "name": name,
        "route_prefix": None,
        "import_path": "amalia_serve.app:build_variant_app",
        "args": {"name": name, "model_path": str(model_path), "engine": engine, "deployment": deployment},
    }


def ingress_weights(config: dict[str, Any]) -> dict[str, int]:
    """The live weights a Serve config gives the ingress of its first application."""
    for deployment in config["applications"][0].get("deployments") or []:
        if deployment.get("name") == INGRESS_DEPLOYMENT_NAME:
            return dict((deployment.get("user_config") or {}).get("weights") or {})
    return {}


def start_local_ray(
    num_cpus: int | None = None,
    dashboard: bool = True,
    metrics_export_port: int | None = None,
    log_to_driver: bool = True,
) -> None:
    """A new laptop-local Ray: auth off, the dashboard (which `serve deploy` talks to) on loopback only, and
    nothing that connects outside the machine (tests/integration/test_zero_outbound.py traces it)."""
    import ray

    # Ray 2.60 enables token auth for new local clusters; on loopback it only gets in a newcomer's way.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray's usage statistics also probe the cloud metadata address (169.254.169.254) and resolve
    # metadata.google.internal at start. Set before ray.init: every Ray process inherits it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    ray.init(
        address="local",  # never join some other cluster `ray start` left running on this machine
        # Named, so Ray does not find this node's address by connecting towards 8.8.8.8 and 2001:4860:4860::8888.
        _node_ip_address="127.0.0.1",
        namespace=SERVE_NAMESPACE,
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=log_to_driver,
        _metrics_export_port=metrics_export_port,
    )


# How long a stop waits for Serve to stop its replicas gracefully (an engine frees its memory) and then
# for Ray to stop its processes; what still runs after both is killed. Ctrl-C on `make run` must be
# done within 10 s; process exit takes about 1 s on top (measured in tests/integration/test_run_interrupt.py).
SERVE_STOP_S = 3.0
RAY_STOP_S = 4.0


def stop_local_ray(serve_stop_s: float = SERVE_STOP_S, ray_stop_s: float = RAY_STOP_S) -> list[int]:
    """Stop Serve and the local Ray cluster this process started, in bounded time.

    Serve's own shutdown waits up to each replica's graceful_shutdown_timeout_s (20 s by default) for
    requests in flight, and a replica's engine may start processes of its own; a developer's Ctrl-C
    should wait for neither. Returns the pids that were still running at the end and were killed.
    """
    import ray
    from ray import serve

    started = process_tree(os.getpid())  # before the stop: orphans leave the tree once Ray's die
    # ray.shutdown() only once Serve's thread is out of Ray: under a thread still inside it, Ray's
    # core worker ends this process at once ("The core worker has already been shutdown", exit 1;
    # seen with vLLM replicas draining streams), before the survivors below are killed. Otherwise
    # every process is killed in one pass, too fast for that exit to come in between.
    if _call_within(serve_stop_s, serve.shutdown):
        _call_within(ray_stop_s, ray.shutdown)
    return kill_survivors({**started, **process_tree(os.getpid())})


def kill_survivors(processes: dict[int, int]) -> list[int]:
    """SIGKILL each process of `processes` (pid -> start time, from process_tree) still running.

    A pid whose start time changed belongs to a later process and is left alone.
    """
    killed = []
    for pid, start in processes.items():
        if is_running(pid, start):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return sorted(killed)


def _call_within(seconds: float, stop: Callable[[], None]) -> bool:
    """Run `stop` in a daemon thread and wait at most `seconds`; False when it did not finish."""
    done = threading.Event()

    def run() -> None:
        try:
            stop()
        except Exception:  # a failed stop is logged; the next step still runs
            logger.exception("%s failed", getattr(stop, "__qualname__", stop))
        finally:
            done.set()

    threading.Thread(target=run, name=f"stop-{getattr(stop, '__name__', 'ray')}", daemon=True).start()
    finished = done.wait(seconds)
    if not finished:
        logger.warning("%s did not finish within %.0f s", getattr(stop, "__qualname__", stop), seconds)
    return finished


def process_tree(root: int) -> dict[int, int]:
    """pid -> start time of every descendant of `root`, from /proc (Linux; empty elsewhere).

    The start time tells a process from a later one that reuses its pid.
    """
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(entry.name))
        if stat is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    tree: dict[int, int] = {}
    frontier = [root]
    while frontier:
        for pid, start in children.get(frontier.pop(), []):
            tree[pid] = start
            frontier.append(pid)
    return tree


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, None if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last ")" do not.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def is_running(pid: int, start: int) -> bool:
    """Whether the process that had `start` time (process_tree) still runs under `pid`."""
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def deploy_config(config: dict[str, Any]) -> None:
    """Deploy every application of a Serve config (validated by Ray's own ServeDeploySchema)."""
    from ray.serve._private import api as serve_private_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    client = serve_private_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)


def wait_until_running(app_names: list[str], timeout_s: float = 300.0) -> None:
    """Block until every named application is RUNNING; raise with Serve's own message if one fails."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        statuses = {name: apps[name].status if name in apps else "NOT_STARTED" for name in app_names}
        failed = {n: apps[n].message for n, s in statuses.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")}
        if failed:
            raise RuntimeError(f"Serve applications failed: {failed}")
        if all(s == "RUNNING" for s in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve applications not running after {timeout_s:.0f}s: {statuses}")
        time.sleep(0.5)


def set_weights(app_name: str, weights: dict[str, int]) -> dict[str, Any]:
    """Change the live traffic weights of a running app: a lightweight user_config update, no restart."""
    return set_routing(app_name, weights=weights)


def set_routing(app_name: str, **changes: Any) -> dict[str, Any]:
    """Change keys of the live routing of a running app (`weights`, `shadow`), keeping the others: a
    lightweight user_config update, no restart."""
    from ray.serve.context import _get_global_client

    RoutingConfig.model_validate(changes)  # refuse a bad split or shadow block here, before Serve sees it

    client = _get_global_client()
    details = client.get_serve_details()
    # deploy_apps replaces the whole set of applications, so every running one goes back in unchanged.
    apps = {name: app["deployed_app_config"] for name, app in details["applications"].items()}
    if app_name not in apps:
        raise KeyError(f"no Serve application {app_name!r}; running: {sorted(apps)}")
    apps[app_name] = with_ingress_routing(apps[app_name], **changes)
    deploy_config({"applications": list(apps.values()), **_cluster_options(details)})
    return apps[app_name]


def with_ingress_routing(app_config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of `app_config` whose ingress user_config has `changes` (weights, shadow) and keeps its other keys:
    new weights do not turn shadow traffic off."""
    app = copy.deepcopy(app_config)
    deployments = app.setdefault("deployments", [])
    ingress = next((d for d in deployments if d.get("name") == INGRESS_DEPLOYMENT_NAME), None)
    if ingress is None:
        ingress = {"name": INGRESS_DEPLOYMENT_NAME}
        deployments.append(ingress)
    ingress["user_config"] = {**(ingress.get("user_config") or {}), **copy.deepcopy(changes)}
    return app


def _cluster_options(details: dict[str, Any]) -> dict[str, Any]:
    http = details.get("http_options") or {}
    return {
        "proxy_location": details.get("proxy_location", "HeadOnly"),
        "http_options": {"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)},
    }
