"""The serveConfigV2 the chart renders for production runs on a real (local) Ray Serve and answers.

Only what a laptop cannot have is changed: checkpoints become the tiny demo models, GPUs are
stripped, CPUs shrink, the proxy listens on a free loopback port, and the API key file the chart
mounts from a Secret is a local file. The config is deployed the way
KubeRay does it (a ServeDeploySchema through the Serve controller), so the production layout (a
front application plus one application per variant) and the `deployments` override that carries
the live weights are exercised too. Then the chart's own `helm test` script runs
against it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from serve_harness import DEMO_ENGINE

from amalia_serve.demo_model import DEMO_CONTEXT

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "amalia"
HELM = ROOT / ".tools" / "bin" / "helm3"
PRODUCTION = CHART / "ci" / "production-gpu-values.yaml"
API_KEY = "sk-amalia-" + "e5" * 16

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def render(*args: str) -> list[dict[str, Any]]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make tools`")
    out = subprocess.run(
        [str(HELM), "template", "amalia", str(CHART), "--namespace", "amalia", *args],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def for_laptop(
    config: dict[str, Any], checkpoints: dict[str, str], port: int, keys_file: Path
) -> dict[str, Any]:
    """The production layout with laptop resources: each variant application gets a demo
    checkpoint, half a CPU instead of a GPU and the CPU engine's sizes (its context, a KV cache in
    bytes rather than a share of the host's memory); the front application one ingress replica and
    a local API key file in place of the mounted Secret."""
    local = copy.deepcopy(config)
    local["http_options"] = {"host": "127.0.0.1", "port": port}
    front, *variants = local["applications"]
    assert front["import_path"] == "amalia_serve.app:build_app"
    front["args"]["ingress"]["deployment"]["num_replicas"] = 1
    front["args"]["ingress"]["auth"]["keys_file"] = str(keys_file)
    for app in variants:
        assert app["import_path"] == "amalia_serve.app:build_variant_app"
        app["args"]["model_path"] = checkpoints[app["args"]["name"]]
        app["args"]["deployment"]["ray_actor_options"] = {"num_cpus": 0.5}
        app["args"]["engine"].update(DEMO_ENGINE, max_model_len=DEMO_CONTEXT)
    return local


def helm_test_script(objects: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    return container["command"][2], {e["name"]: e["value"] for e in container["env"]}


class Served(NamedTuple):
    url: str
    config: dict[str, Any]  # as rendered
    local: dict[str, Any]  # as deployed (for_laptop)
    checkpoints: dict[str, str]
    keys_file: Path


HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from amalia_serve.demo_model import write_demo_models
    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    sft, dpo = write_demo_models(tmp_path_factory.mktemp("models"))
    keys_file = tmp_path_factory.mktemp("api-keys") / "keys.yaml"
    keys_file.write_text(f"helm-test: {API_KEY}\n", encoding="utf-8")
    rayservice = next(o for o in render("--values", str(PRODUCTION)) if o["kind"] == "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    port = free_port()
    checkpoints = {"amalia-sft": str(sft), "amalia-dpo": str(dpo)}
    local = for_laptop(config, checkpoints, port, keys_file)
    start_local_ray(num_cpus=2, dashboard=False)
    try:
        deploy_config(local)
        wait_until_running([app["name"] for app in local["applications"]], timeout_s=300)
        yield Served(f"http://127.0.0.1:{port}", config, local, checkpoints, keys_file)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def test_rendered_serve_config_answers_chat_when_deployed_on_ray_serve(
    served: Served,
) -> None:
    url = served.url
    models = urllib.request.Request(f"{url}/v1/models", headers=HEADERS)
    listing = json.load(urllib.request.urlopen(models, timeout=30))
    assert {m["id"] for m in listing["data"]} == {"amalia", "amalia-sft", "amalia-dpo"}
    body = {"model": "amalia", "max_tokens": 4, "messages": [{"role": "user", "content": "Olá!"}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), HEADERS)
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.load(response)
        assert response.headers["x-amalia-variant"] in {"amalia-sft", "amalia-dpo"}
    assert reply["usage"]["completion_tokens"] >= 1


def test_chart_helm_test_pod_passes_when_run_against_served_config(
    served: Served,
) -> None:
    url = served.url
    script, env = helm_test_script(render("--values", str(PRODUCTION)))
    assert env["AMALIA_API_KEYS_FILE"]  # the production values turn API keys on
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env, "AMALIA_URL": url, "AMALIA_API_KEYS_FILE": str(served.keys_file)},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "without a key: 401; using key helm-test" in result.stdout
    assert "variant: amalia-" in result.stdout


def test_live_weights_reach_ingress_when_set_in_serve_config(
    served: Served,
) -> None:
    from ray.serve.context import _get_global_client

    config = served.config
    details = _get_global_client().get_serve_details()
    deployed = details["applications"]["amalia"]["deployed_app_config"]
    assert deployed["deployments"] == config["applications"][0]["deployments"]
    assert deployed["deployments"][0]["user_config"] == {
        "weights": {"amalia-sft": 90, "amalia-dpo": 10}
    }
    # Each variant runs as its own application, reachable only through the ingress.
    for name in ("amalia-sft", "amalia-dpo"):
        app = details["applications"][name]
        assert app["route_prefix"] is None and list(app["deployments"]) == [name]


def replica_ids() -> dict[str, set[str]]:
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details()["applications"]
    return {
        f"{app}/{dep}": {r["replica_id"] for r in details["replicas"]}
        for app, body in apps.items()
        for dep, details in body["deployments"].items()
    }


def post_chat(url: str, model: str) -> str:
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Olá!"}]}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), HEADERS)
    with urllib.request.urlopen(request, timeout=120) as response:
        variant: str = response.headers["x-amalia-variant"]
        return variant


def test_operator_canary_edits_restart_no_running_replica_when_applied_to_rendered_config(
    served: Served,
) -> None:
    """The point of one application per variant: the operator's add-canary edit, applied to the
    chart's config on a real Serve, starts the canary and restarts nothing else; its removal
    (weight, then application) gives back the exact config."""
    from amalia_operator import serveconfig
    from amalia_operator.models import CanaryVariant
    from amalia_operator.rollout import ServeEdit
    from amalia_serve.local_run import deploy_config, wait_until_running

    text = yaml.safe_dump(served.local, sort_keys=False)
    canary = CanaryVariant(name="amalia-dpo-v2", model_path=served.checkpoints["amalia-dpo"])
    weights = dict(served.local["applications"][0]["deployments"][0]["user_config"]["weights"])

    def apply(source: str, **edit: Any) -> str:
        change = ServeEdit("amalia-sft", canary.name, 0, **edit)
        out = serveconfig.apply_edit(source, "amalia", change, canary)
        deploy_config(yaml.safe_load(out))
        wait_until_running([a["name"] for a in yaml.safe_load(out)["applications"]], 300)
        return out

    before = replica_ids()
    with_canary = apply(text, add_canary=True)
    assert serveconfig.observe(with_canary, "amalia").weights == {**weights, canary.name: 0}
    after = replica_ids()
    assert {k: after[k] for k in before} == before  # same replicas: nothing restarted
    assert after["amalia-dpo-v2/amalia-dpo-v2"]
    assert post_chat(served.url, canary.name) == canary.name  # weight 0, reachable by name

    unweighted = apply(with_canary, remove=(canary.name,))
    assert serveconfig.observe(unweighted, "amalia").weights == weights
    assert "amalia-dpo-v2/amalia-dpo-v2" in replica_ids()  # weight gone first, application next
    restored = apply(unweighted, remove=(canary.name,))
    assert restored == text
    wait_until_gone(canary.name)
    assert replica_ids() == before


def wait_until_gone(app_name: str, timeout_s: float = 120) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        assert time.monotonic() < deadline, f"application {app_name} still there"
        time.sleep(0.5)
