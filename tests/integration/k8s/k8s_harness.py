"""Helpers for tests against a real kube-apiserver (../shared/k8s): the control plane, kubectl
and helm as its admin or as a ServiceAccount, the operator as a process, and KubeRay's part
played by writing RayService status (KubeRay itself does not run there)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SHARED = ROOT.parent / "shared"
K8S = SHARED / "k8s"
KUBERAY_CRDS = SHARED / "kuberay-crds"
CHART = ROOT / "charts" / "amalia"
TOOLS = ROOT / ".tools" / "bin"
KUBECTL = TOOLS / "kubectl"
HELMS = {"helm3": TOOLS / "helm3", "helm4": TOOLS / "helm4"}


def require(path: Path, how: str) -> Path:
    if not path.exists():
        pytest.fail(f"{path} is missing: {how}")
    return path


@dataclass
class Cluster:
    """One throw-away control plane; `kubectl` and `helm` run as its admin unless told."""

    dir: Path
    kubeconfig: Path
    server: str
    ca_data: str
    env: dict[str, str] = field(default_factory=dict)

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(a) for a in args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed:\n{result.stderr}")
        return result

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run(str(KUBECTL), "--kubeconfig", str(self.kubeconfig), *args, input=input,
                        check=check)  # fmt: skip

    def helm(self, helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        binary = require(HELMS[helm], "run `make tools` (scripts/install-test-tools.sh)")
        return self.run(str(binary), "--kubeconfig", str(self.kubeconfig), *args, check=check)

    def get(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.kubectl("get", "-o", "json", *args).stdout)
        return out

    def apply_crds(self, *paths: Path) -> None:
        """Server-side apply (KubeRay's CRDs are too large for a client-side apply annotation),
        then wait until they are served: objects of a new CRD are refused until then."""
        for path in paths:
            self.kubectl("apply", "--server-side", "-f", str(path))

        def established() -> bool:
            crds = self.get("customresourcedefinitions")["items"]
            return all(
                any(c["type"] == "Established" and c["status"] == "True" for c in conditions)
                for conditions in (
                    (crd.get("status") or {}).get("conditions") or [] for crd in crds
                )
            )

        # `kubectl wait` fails at once while a new CRD has no conditions yet.
        wait_until(established, "the CRDs to be established", 60)

    def create_namespace(self, name: str) -> None:
        self.kubectl("create", "namespace", name)
        # No controller-manager: the namespace's default ServiceAccount never appears by itself.
        self.kubectl("create", "serviceaccount", "default", "-n", name)

    def token_kubeconfig(self, namespace: str, account: str, path: Path) -> Path:
        """A kubeconfig that acts as ServiceAccount `namespace/account`, as its pod would."""
        token = self.kubectl("create", "token", account, "-n", namespace, "--duration=2h").stdout
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": self.server,
                                "certificate-authority-data": self.ca_data,
                            },
                        }
                    ],
                    "users": [{"name": account, "user": {"token": token.strip()}}],
                    "contexts": [
                        {
                            "name": account,
                            "context": {
                                "cluster": "local",
                                "user": account,
                                "namespace": namespace,
                            },
                        }
                    ],
                    "current-context": account,
                }
            )
        )
        path.chmod(0o600)
        return path


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    """Polls until `predicate` returns something truthy (returned), failing after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


class OperatorProcess:
    """`python -m amalia_operator` in its own process group, as the operator's pod runs it."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, pod_id: str, tick_s: float):
        self.kubeconfig, self.namespace, self.log, self.pod_id = kubeconfig, namespace, log, pod_id
        self.tick_s = tick_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "AMALIA_OPERATOR_TICK_S": str(self.tick_s),
            "POD_ID": self.pod_id,  # what the chart sets from the pod's name
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log.open("ab") as out:
            out.write(f"--- start {self.pod_id}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "amalia_operator", "run", "-n", self.namespace, "--verbose"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        return self

    def signal(self, sig: signal.Signals, timeout_s: float = 30) -> int:
        """Sends `sig` to this process only and waits for it to exit."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class KubeRayPlayer:
    """Plays KubeRay's part for one RayService: every application of its serveConfigV2 is
    reported DEPLOYING for `deploy_s` after it first appears, then RUNNING with its deployment
    HEALTHY; an application that leaves the config leaves the status. Every serveConfigV2 it sees
    is kept in `seen`, so a test can check each version the operator wrote."""

    def __init__(self, api: Any, namespace: str, name: str, deploy_s: float = 1.0):
        self.api, self.namespace, self.name, self.deploy_s = api, namespace, name, deploy_s
        self.seen: list[str] = []
        self.first_seen: dict[str, float] = {}
        self.reported: dict[str, Any] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kuberay-player", daemon=True)
        self.errors: list[BaseException] = []

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        assert not self.errors, self.errors

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            try:
                self._once()
            except Exception as exc:  # noqa: BLE001  (surfaced by __exit__, not lost in a thread)
                self.errors.append(exc)
                return

    def _once(self) -> None:
        obj = self.api.get_namespaced_custom_object(
            "ray.io", "v1", self.namespace, "rayservices", self.name
        )
        text = obj["spec"]["serveConfigV2"]
        if not self.seen or self.seen[-1] != text:
            self.seen.append(text)
        now = time.monotonic()
        statuses: dict[str, Any] = {}
        for app in yaml.safe_load(text)["applications"]:
            name = app["name"]
            started = self.first_seen.setdefault(name, now)
            running = now - started >= self.deploy_s
            deployment = "AmaliaIngress" if app.get("route_prefix") == "/" else name
            statuses[name] = {
                "status": "RUNNING" if running else "DEPLOYING",
                "serveDeploymentStatuses": {
                    deployment: {"status": "HEALTHY" if running else "UPDATING"}
                },
            }
        for gone in set(self.first_seen) - set(statuses):
            del self.first_seen[gone]
        if statuses != self.reported:
            patch = {name: None for name in self.reported if name not in statuses}
            patch.update(statuses)
            body = {"status": {"activeServiceStatus": {"applicationStatuses": patch}}}
            self.api.patch_namespaced_custom_object_status(
                "ray.io", "v1", self.namespace, "rayservices", self.name, body
            )
            self.reported = statuses
