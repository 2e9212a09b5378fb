"""The serveConfigV2 the chart renders for production runs on a real (local) Ray Serve and answers.

Only what a laptop cannot have is changed: checkpoints become the tiny demo models, GPUs are
stripped, CPUs shrink, and the proxy listens on a free loopback port. The config is deployed the way
KubeRay does it (a ServeDeploySchema through the Serve controller), so the `deployments` override
that carries the live weights is exercised too. Then the chart's own `helm test` script runs
against it.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "amalia"
HELM = ROOT / ".tools" / "bin" / "helm3"
PRODUCTION = CHART / "ci" / "production-gpu-values.yaml"

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


def for_laptop(config: dict[str, Any], checkpoints: dict[str, str], port: int) -> dict[str, Any]:
    local = copy.deepcopy(config)
    local["http_options"] = {"host": "127.0.0.1", "port": port}
    for app in local["applications"]:
        for variant in app["args"]["variants"]:
            variant["model_path"] = checkpoints[variant["name"]]
            variant["deployment"]["ray_actor_options"] = {"num_cpus": 0.5}
        app["args"]["ingress"]["deployment"]["num_replicas"] = 1
    return local


def helm_test_script(objects: list[dict[str, Any]]) -> tuple[str, dict[str, str]]:
    (pod,) = [o for o in objects if o["kind"] == "Pod"]
    (container,) = pod["spec"]["containers"]
    assert container["command"][:2] == ["python", "-c"]
    return container["command"][2], {e["name"]: e["value"] for e in container["env"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Any]]]:
    from ray import serve

    from amalia_serve.demo_model import write_demo_models
    from amalia_serve.local_run import deploy_config, start_local_ray, wait_until_running

    sft, dpo = write_demo_models(tmp_path_factory.mktemp("models"))
    rayservice = next(o for o in render("--values", str(PRODUCTION)) if o["kind"] == "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    port = free_port()
    local = for_laptop(config, {"amalia-sft": str(sft), "amalia-dpo": str(dpo)}, port)
    start_local_ray(num_cpus=2, dashboard=False)
    try:
        deploy_config(local)
        wait_until_running([app["name"] for app in local["applications"]], timeout_s=300)
        yield f"http://127.0.0.1:{port}", config
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def test_rendered_serve_config_answers_chat_when_deployed_on_ray_serve(
    served: tuple[str, dict[str, Any]],
) -> None:
    url, _ = served
    listing = json.load(urllib.request.urlopen(f"{url}/v1/models", timeout=30))
    assert {m["id"] for m in listing["data"]} == {"amalia", "amalia-sft", "amalia-dpo"}
    body = {"model": "amalia", "max_tokens": 4, "messages": [{"role": "user", "content": "Olá!"}]}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        reply = json.load(response)
        assert response.headers["x-amalia-variant"] in {"amalia-sft", "amalia-dpo"}
    assert reply["usage"]["completion_tokens"] >= 1


def test_chart_helm_test_pod_passes_when_run_against_served_config(
    served: tuple[str, dict[str, Any]],
) -> None:
    url, _ = served
    script, env = helm_test_script(render())
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **env, "AMALIA_URL": url},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "variant: amalia-" in result.stdout


def test_live_weights_reach_ingress_when_set_in_serve_config(
    served: tuple[str, dict[str, Any]],
) -> None:
    from ray.serve.context import _get_global_client

    _, config = served
    details = _get_global_client().get_serve_details()
    deployed = details["applications"]["amalia"]["deployed_app_config"]
    assert deployed["deployments"] == config["applications"][0]["deployments"]
    assert deployed["deployments"][0]["user_config"] == {
        "weights": {"amalia-sft": 90, "amalia-dpo": 10}
    }
