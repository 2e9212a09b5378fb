# ModelRollout operator: kopf on slim Python, without Ray or torch (it only talks to the
# Kubernetes API and Prometheus). Build from the repository root:
#   docker build -f docker/operator.Dockerfile -t registry.local/amalia/amalia-operator:0.1.0 .
FROM python:3.11-slim-bookworm

RUN useradd --uid 1000 --gid 100 --no-create-home --shell /usr/sbin/nologin amalia
WORKDIR /opt/amalia-operator
COPY operators/ amalia_operator/
# The pt-PT/pt-BR lexicon the operator shares with the ingress: its own pure package, standard library only.
COPY variety/ amalia_variety/
# The operator's own dependencies only.
RUN pip install --no-cache-dir "kopf>=1.44,<2" "kubernetes>=31" "pydantic>=2.10,<3" "pyyaml>=6" \
      "aiohttp>=3.10" \
 && python -c "import amalia_operator.handlers, amalia_operator.evaluation.checks"

ENV PYTHONPATH=/opt/amalia-operator PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 1000:100
# `docker run IMAGE run -n NS` runs the operator; `docker run IMAGE rollout status NAME -n NS` steers one.
ENTRYPOINT ["python", "-m", "amalia_operator"]
CMD ["run"]
