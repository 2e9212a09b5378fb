"""A real Kubernetes control plane (kube-apiserver v1.36.2 + etcd from ../shared/k8s) per test
module, with kubectl 1.35 and helm from `make tools`.

There is no controller-manager, scheduler or kubelet: nothing the chart creates ever runs, and
KubeRay does not run either. A clone without ../shared beside it skips these tests and says why.
"""

from __future__ import annotations

import lzma
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from k8s_harness import K8S, KUBECTL, Cluster, require
from kube_control_plane import started_control_plane


@pytest.fixture(scope="session")
def apiserver_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kube-apiserver unpacked once per session (start-cp.sh would unpack it per start)."""
    archive = K8S / "kube-apiserver.xz"
    if not (K8S / "start-cp.sh").exists() or not archive.exists():
        pytest.skip(
            f"no real Kubernetes API server: {K8S} is missing (the kube-apiserver and its "
            "start script live in ../shared/k8s beside the clone; see its README)"
        )
    bin_dir = tmp_path_factory.mktemp("k8s-bin")
    with lzma.open(archive) as src, (bin_dir / "kube-apiserver").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    (bin_dir / "kube-apiserver").chmod(0o755)
    return bin_dir


@pytest.fixture(scope="module")
def cluster(apiserver_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh control plane for one test module: a new CA, empty etcd, no CRDs."""
    require(KUBECTL, "run `make tools` (scripts/install-test-tools.sh installs kubectl 1.35)")
    if shutil.which("etcd") is None and not Path("/usr/bin/etcd").exists():
        pytest.fail("etcd is missing: run `make tools` (installs Debian's etcd-server)")
    cp_dir = tmp_path_factory.mktemp("control-plane")
    with started_control_plane(cp_dir, apiserver_bin) as kubeconfig:
        yield cluster_for(kubeconfig, cp_dir)


def cluster_for(kubeconfig: Path, cp_dir: Path) -> Cluster:
    """kubectl and helm as the control plane's admin, each release's helm state under `cp_dir`."""
    config = yaml.safe_load(kubeconfig.read_text())
    (entry,) = config["clusters"]
    helm_home = cp_dir / "helm"
    tool_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "HELM_CACHE_HOME": str(helm_home / "cache"),
        "HELM_CONFIG_HOME": str(helm_home / "config"),
        "HELM_DATA_HOME": str(helm_home / "data"),
    }
    return Cluster(
        dir=cp_dir,
        kubeconfig=kubeconfig,
        server=entry["cluster"]["server"],
        ca_data=entry["cluster"]["certificate-authority-data"],
        env=tool_env,
    )
