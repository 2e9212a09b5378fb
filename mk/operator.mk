# Rollout operator: regenerate the CRD / RBAC YAML from operators/crd.py and operators/rbac.py.
.PHONY: operator-manifests operator-test

operator-manifests: install
	$(BIN)/python -m amalia_operator.crd
	$(BIN)/python -m amalia_operator.rbac

operator-test: install tools
	$(BIN)/python -m pytest -q tests/unit/operator tests/integration/test_operator_kmock.py \
		tests/integration/test_operator_prometheus.py
