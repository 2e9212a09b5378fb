# Autoscaling (docs/autoscaling.md): `make bench-autoscale` measures how fast a variant follows a
# load step on the demo checkpoint (the last line is JSON; benchmarks/RESULTS.md keeps the numbers);
# `make autoscale-test` runs the policy's unit and chart tests and one scaling cycle on real Ray Serve.
.PHONY: bench-autoscale autoscale-test

bench-autoscale: install models
	$(BIN)/python benchmarks/bench_autoscale.py --models $(MODELS)

autoscale-test: install tools
	$(BIN)/python -m pytest -q tests/unit/serve/test_autoscaling.py \
		tests/unit/serve/test_autoscaling_policy.py tests/unit/chart/test_chart_autoscaler.py \
		tests/integration/test_autoscaling_serve.py
