"""serve.apiKeys: the Secret reaches every pod an ingress replica may run in, and the ingress's args."""

from __future__ import annotations

from typing import Any

import pytest
from chart_helpers import (
    VALUES_FILES,
    one,
    ray_pod_specs,
    render,
    run_helm,
    serve_config,
    template_args,
)

from amalia_serve.config import AmaliaServingArgs

KEYS_DIR = "/etc/amalia/api-keys"
ON = ("serve.apiKeys.existingSecret=amalia-api-keys",)


def front_args(objects: list[dict[str, Any]]) -> AmaliaServingArgs:
    return AmaliaServingArgs.model_validate(serve_config(objects)["applications"][0]["args"])


def test_api_keys_are_off_and_nothing_mounted_when_no_secret_named() -> None:
    objects = render("helm3")
    assert not front_args(objects).ingress.auth.enabled
    for spec in ray_pod_specs(one(objects, "RayService")):
        assert "api-keys" not in {v["name"] for v in spec["volumes"]}


def test_every_ray_pod_mounts_the_secret_read_only_when_production_values() -> None:
    objects = render("helm3", VALUES_FILES["production-gpu"])
    specs = ray_pod_specs(one(objects, "RayService"))
    assert len(specs) == 3  # the head and both worker groups: an ingress replica may land on any
    for spec in specs:
        (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
        assert volume["secret"] == {"secretName": "amalia-api-keys", "defaultMode": 0o440}
        for container in spec["containers"]:
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
            # A whole-Secret mount: a subPath mount would never see a rotated key.
            assert mount == {"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True}


def test_ingress_reads_the_mounted_file_when_secret_named() -> None:
    objects = render("helm3", sets=(*ON, "serve.apiKeys.secretKey=api-keys.yaml",
                                    "serve.apiKeys.required=false", "serve.apiKeys.reloadIntervalS=2"))  # fmt: skip
    auth = front_args(objects).ingress.auth
    assert auth.keys_file == f"{KEYS_DIR}/api-keys.yaml"
    assert (auth.required, auth.reload_interval_s, auth.keys_env) == (False, 2.0, None)


def test_helm_test_pod_sends_a_key_from_the_secret_when_keys_on() -> None:
    (pod,) = [o for o in render("helm3", sets=ON) if o["kind"] == "Pod"]
    (container,) = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AMALIA_API_KEYS_FILE"] == f"{KEYS_DIR}/keys.yaml"
    assert {"name": "api-keys", "mountPath": KEYS_DIR, "readOnly": True} in container[
        "volumeMounts"
    ]
    assert pod["spec"]["volumes"] == [
        {"name": "api-keys", "secret": {"secretName": "amalia-api-keys", "defaultMode": 0o440}}
    ]


def test_helm_test_pod_mounts_nothing_when_keys_off() -> None:
    (pod,) = [o for o in render("helm3") if o["kind"] == "Pod"]
    assert "volumes" not in pod["spec"]
    assert "AMALIA_API_KEYS_FILE" not in {e["name"] for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("serve.apiKeys.existingSecret=Not_A_Name", "existingSecret"),
        ("serve.apiKeys.secretKey=a/b", "secretKey"),
        ("serve.apiKeys.reloadIntervalS=0", "reloadIntervalS"),
        ("serve.apiKeys.keysFile=/x", "keysFile"),
    ],
)
def test_schema_refuses_bad_api_key_values_when_installing(setting: str, error: str) -> None:
    result = run_helm("helm3", *template_args(None, sets=(setting,)))
    assert result.returncode != 0 and error in result.stderr
