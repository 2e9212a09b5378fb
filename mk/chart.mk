# Chart and plain manifests: `make manifests` regenerates every derived chart file (CRD copies,
# operator RBAC, dashboards, values.schema.json, README values table) and manifests/;
# `make chart-test` runs the chart tests with helm 3 and helm 4.
.PHONY: manifests chart-test

manifests: install tools
	$(BIN)/python -m amalia_operator.crd
	$(BIN)/python scripts/render_manifests.py

chart-test: install tools
	$(BIN)/python -m pytest -q tests/unit/chart tests/integration/test_chart_serve_config_runs.py
