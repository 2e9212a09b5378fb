# Serving image: Ray 2.60.0 (CUDA, Python 3.11) plus amalia-serve with vLLM's CUDA build (the `gpu` extra:
# vllm 0.33, which brings torch 2.14 for CUDA). One image for the head (the ingress; no GPU) and the GPU
# workers (the variants), so `serve deploy` can check engine arguments against the installed vLLM. Runs as the
# `ray` user (uid 1000), which the chart's runAsUser matches. Build from the repository root:
#   docker build -f docker/serve.Dockerfile -t registry.local/amalia/amalia-serve:0.1.0 .
# Pin the base by digest in your registry mirror (rayproject/ray:2.60.0-py311-gpu@sha256:...).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/amalia-serve
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users serve/ serve/
COPY --chown=ray:users operators/ operators/
COPY --chown=ray:users variety/ variety/
# Ray is already in the base image; the pin keeps pip from replacing it. Install from your mirror of PyPI
# (PIP_INDEX_URL): vllm's CUDA wheels and torch come from there.
RUN pip install --no-cache-dir "ray[serve]==2.60.0" ".[gpu]" \
 && python -c "import amalia_serve, ray, vllm; assert ray.__version__ == '2.60.0'; print('vllm', vllm.__version__)"

# Weights come from a mounted volume only, and nothing phones home: no Ray or vLLM usage statistics,
# and the one "disabled" report a `ray start` cluster still posts goes to a closed loopback port. The
# chart sets these too, and VLLM_HOST_IP to the pod's address; without it amalia-serve gives vLLM Ray's
# node address.
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    RAY_USAGE_STATS_REPORT_URL=http://127.0.0.1:9/ PYTHONDONTWRITEBYTECODE=1
# Ray 2.60's dashboard looks up its cloud (169.254.169.254 and DNS for metadata.google.internal) at
# start, whatever RAY_USAGE_STATS_ENABLED says, unless ~/ray_bootstrap_config.yaml names the provider.
RUN printf 'provider:\n  type: kuberay\n' > /home/ray/ray_bootstrap_config.yaml
USER 1000
