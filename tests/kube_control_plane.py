"""A throw-away Kubernetes control plane (../shared/k8s: etcd + kube-apiserver) for one test module.

It is a real API server: OpenAPI and CEL validation of CRDs, server-side apply, admission. There is
no scheduler or kubelet, so nothing runs; server-side dry runs are what it is for here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from kubernetes import config as kube_config
from kubernetes.dynamic import DynamicClient

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT.parent / "shared" / "k8s"
FIELD_MANAGER = "amalia-tests"
CRD_ESTABLISHED_TIMEOUT_S = 60.0


def unavailable_reason() -> str | None:
    """Why no control plane can start here, or None when one can."""
    if not (K8S / "start-cp.sh").exists():
        return f"{K8S} is absent: CI copies shared/ beside the clone as ../shared"
    if shutil.which("etcd") is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    return None


class ControlPlane:
    """Server-side apply against the control plane whose kubeconfig is given."""

    def __init__(self, kubeconfig: Path) -> None:
        self._api = kube_config.new_client_from_config(config_file=str(kubeconfig))
        self._cache = kubeconfig.parent / "discovery.json"
        self.client = DynamicClient(self._api, cache_file=str(self._cache))

    def apply(self, obj: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        """Server-side apply, refusing unknown fields (kubectl's `--validate=strict`)."""
        resource = self.client.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        result = self.client.server_side_apply(
            resource,
            body=obj,
            namespace=obj["metadata"].get("namespace"),
            field_manager=FIELD_MANAGER,
            force_conflicts=True,
            dry_run="All" if dry_run else None,
            query_params=[("fieldValidation", "Strict")],
        )
        applied: dict[str, Any] = result.to_dict()
        return applied

    def install_crds(self, paths: Iterable[Path]) -> list[str]:
        """Apply every CRD in `paths`, wait until the API server serves them; return their names."""
        names = []
        for path in paths:
            for crd in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if crd and crd.get("kind") == "CustomResourceDefinition":
                    names.append(self.apply(crd)["metadata"]["name"])
        crds = self.client.resources.get(
            api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition"
        )
        deadline = time.monotonic() + CRD_ESTABLISHED_TIMEOUT_S
        for name in names:
            while not _established(crds.get(name=name).to_dict()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {name} not Established in time")
                time.sleep(0.2)
        self.client.resources.invalidate_cache()  # discovery must now list the new kinds
        return names


def _established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@contextmanager
def started_control_plane(workdir: Path, bin_dir: Path | None = None) -> Iterator[Path]:
    """Start etcd + kube-apiserver on loopback in `workdir`; yield its admin kubeconfig; stop exactly
    those on exit. `bin_dir` holds an unpacked kube-apiserver (start-cp.sh unpacks one per start)."""
    env = {**os.environ, "BIN": str(bin_dir)} if bin_dir else None
    started = subprocess.run(
        ["bash", str(K8S / "start-cp.sh"), str(workdir)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"start-cp.sh failed:\n{started.stdout}\n{started.stderr}")
        yield workdir / "kubeconfig"
    finally:
        subprocess.run(
            ["bash", str(K8S / "stop-cp.sh"), str(workdir)],
            capture_output=True,
            timeout=60,
            check=False,
        )


@contextmanager
def control_plane(workdir: Path) -> Iterator[ControlPlane]:
    """A started control plane, driven through the Python client."""
    with started_control_plane(workdir) as kubeconfig:
        yield ControlPlane(kubeconfig)
