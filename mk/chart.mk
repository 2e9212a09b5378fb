# Chart and plain manifests: `make manifests` regenerates every derived chart file (CRD copies,
# operator RBAC, capacity tables, dashboards, values.schema.json, README values table), manifests/
# and the `amalia-serve plan` outputs quoted in docs/capacity.md;
# `make chart-test` runs the chart tests with helm 3 and helm 4.
.PHONY: manifests chart-test

manifests: install tools
	$(BIN)/python -m amalia_operator.crd
	$(BIN)/python scripts/render_manifests.py
	$(BIN)/python scripts/capacity_docs.py

chart-test: install tools
	$(BIN)/python -m pytest -q tests/unit/chart tests/integration/test_chart_serve_config_runs.py
