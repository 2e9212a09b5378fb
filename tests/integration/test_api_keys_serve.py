"""API keys on a real local Ray Serve: 401s in OpenAI's shape, open probes, rotation without restart, no key in logs.

The key file is published the way the kubelet updates a mounted Secret (a `..data` symlink swap), and the
ingress re-reads it on the request path; nothing is restarted between the versions.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from secret_volume import write_secret_volume
from serve_harness import RunningServe, demo_app_config, free_port, running_serve

pytestmark = [pytest.mark.integration, pytest.mark.demo_variants, pytest.mark.timeout(600)]

KEY_A = "sk-amalia-" + "a1" * 16
KEY_B = "sk-amalia-" + "b2" * 16
KEY_ROTATED = "sk-amalia-" + "c3" * 16
WRONG = "sk-amalia-" + "d4" * 16
RELOAD_INTERVAL_S = 0.5
CHAT = {"model": "amalia-sft", "messages": [{"role": "user", "content": "Olá!"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def secret_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("api-keys")
    write_secret_volume(root, "v1", {"keys.yaml": f"team-a: {KEY_A}\nteam-b: {KEY_B}\n"})
    return root


@pytest.fixture(scope="module")
def served(demo_checkpoints: tuple[Path, Path], secret_dir: Path) -> Iterator[RunningServe]:
    sft, dpo = demo_checkpoints
    config = demo_app_config(sft, dpo, free_port())
    auth = {"keys_file": str(secret_dir / "keys.yaml"), "reload_interval_s": RELOAD_INTERVAL_S}
    config["applications"][0]["args"]["ingress"] = {"auth": auth}
    with running_serve(config) as running:
        yield running


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "You didn't provide an API key"), (auth(WRONG), "Incorrect API key provided."),
     ({"Authorization": f"Basic {KEY_A}"}, "You didn't provide an API key")],
    ids=["none", "wrong", "not-bearer"],
)  # fmt: skip
def test_chat_refused_with_openai_401_when_key_missing_or_wrong(
    served: RunningServe, headers: dict[str, str], message: str
) -> None:
    response = httpx.post(f"{served.base_url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert error["message"].startswith(message)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")


def test_openai_client_raises_authentication_error_when_key_wrong(served: RunningServe) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=WRONG, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


@pytest.mark.parametrize("key", [KEY_A, KEY_B])
def test_chat_and_stream_answer_when_key_valid(served: RunningServe, key: str) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=key, max_retries=0, timeout=120)
    assert client.chat.completions.create(**CHAT).usage.completion_tokens == 4  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**CHAT, stream=True))  # type: ignore[call-overload]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [m.id for m in client.models.list()] == ["amalia", "amalia-sft", "amalia-dpo"]


@pytest.mark.parametrize("path", ["/v1/models", "/routing"])
def test_other_routes_refused_when_no_key(served: RunningServe, path: str) -> None:
    assert httpx.get(f"{served.base_url}{path}", timeout=30).status_code == 401
    assert httpx.get(f"{served.base_url}{path}", headers=auth(KEY_A), timeout=30).status_code == 200


def test_health_and_readiness_answer_without_key_when_keys_required(served: RunningServe) -> None:
    assert httpx.get(f"{served.base_url}/healthz", timeout=30).json() == {"status": "ok"}
    assert httpx.get(f"{served.base_url}/readyz", timeout=30).status_code == 200


def wait_for_status(served: RunningServe, key: str, status: int, timeout_s: float = 20.0) -> float:
    """Seconds until a request with `key` gets `status`, polling; fails the test after `timeout_s`."""
    started = time.monotonic()
    while True:
        got = httpx.get(f"{served.base_url}/v1/models", headers=auth(key), timeout=30).status_code
        if got == status:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"still {got}, not {status}, after {timeout_s}s"
        time.sleep(0.1)


def ingress_replicas() -> set[str]:
    """Names of the running ingress replica actors; a restarted replica has a new name."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "AmaliaIngress" in a["name"]}


def test_rotated_secret_takes_effect_without_restart_when_volume_updated(
    served: RunningServe, secret_dir: Path
) -> None:
    replicas = ingress_replicas()
    assert len(replicas) == 1  # one replica: a single request is enough for it to notice
    write_secret_volume(secret_dir, "v2", {"keys.yaml": f"team-a: {KEY_ROTATED}\nteam-b: {KEY_B}\n"})
    try:
        assert wait_for_status(served, KEY_ROTATED, 200) < RELOAD_INTERVAL_S + 5.0
        assert wait_for_status(served, KEY_A, 401) < 1.0
        assert wait_for_status(served, KEY_B, 200) < 1.0  # a key left alone never stops working
    finally:
        write_secret_volume(secret_dir, "v3", {"keys.yaml": f"team-a: {KEY_A}\nteam-b: {KEY_B}\n"})
        wait_for_status(served, KEY_A, 200)
    assert ingress_replicas() == replicas


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_amalia_api_key_"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k in ("api_key", "kind")))
                out[(sample.name, labels)] = out.get((sample.name, labels), 0.0) + sample.value
    return out


def test_requests_and_tokens_counted_by_key_name_when_scraped(served: RunningServe) -> None:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key=KEY_B, max_retries=0, timeout=120)
    client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    httpx.get(f"{served.base_url}/v1/models", headers=auth(WRONG), timeout=30)
    deadline = time.monotonic() + 60
    while True:
        series = scrape(served.metrics_url)
        requests = {dict(labels)["api_key"]: v for (name, labels), v in series.items() if name.endswith("requests_total")}
        output = series.get(("ray_amalia_api_key_tokens_total", (("api_key", "team-b"), ("kind", "output"))), 0)
        if (requests.get("team-b", 0) >= 1 and requests.get("unauthorized", 0) >= 1 and output >= 4) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(1)
    assert requests.get("team-b", 0) >= 1 and requests.get("unauthorized", 0) >= 1, requests
    assert output >= 4
    assert set(requests) <= {"team-a", "team-b", "unauthorized"}  # names only, never a key


def test_no_key_appears_in_any_ray_log_when_keys_used_and_refused(served: RunningServe) -> None:
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # type: ignore[attr-defined]
    text = "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    assert "401 POST /v1/chat/completions" in text  # the ingress's own log is among what was read
    assert "API keys reloaded from" in text and "team-a" in text
    for key in (KEY_A, KEY_B, KEY_ROTATED, WRONG):
        assert key not in text
        assert key[10:26] not in text  # nor a part of one
