"""Builds the Serve applications: the OpenAI ingress, and one application per model variant.

Production layout (what the chart and the operator write into a RayService's ``serveConfigV2``)::

    applications:
      - name: amalia                                # the OpenAI front door
        route_prefix: /
        import_path: amalia_serve.app:build_app
        args: {model_alias: amalia}
        deployments:
          - name: AmaliaIngress
            user_config: {weights: {amalia-sft: 90, amalia-dpo: 10}}
      - name: amalia-sft                            # one application per variant, named after it
        route_prefix: null
        import_path: amalia_serve.app:build_variant_app
        args: {name: amalia-sft, model_path: /models/AMALIA-9B-0626-SFT}
      - name: amalia-dpo
        route_prefix: null
        import_path: amalia_serve.app:build_variant_app
        args: {name: amalia-dpo, model_path: /models/AMALIA-9B-0626-DPO}

Serve redeploys every deployment of an application whose ``args`` change, so variants live in their own
applications: adding a canary adds an application and a weight, and restarts nothing that runs.

Single application, for ``serve run`` and Python::

    serve.run(build_app({"variants": [{"name": "amalia-sft", "model_path": "/models/sft"}]}))
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from amalia_serve.config import AmaliaServingArgs, VariantConfig
from amalia_serve.constants import DEFAULT_ENGINE_CLS, ENGINE_CLS, INGRESS_DEPLOYMENT_NAME
from amalia_serve.ingress import AmaliaIngress
from amalia_serve.variant import VariantServer


def build_app(args: dict[str, Any] | AmaliaServingArgs) -> Application:
    """Validate `args` (see `AmaliaServingArgs`) and bind the deployment graph."""
    serving = args if isinstance(args, AmaliaServingArgs) else AmaliaServingArgs.model_validate(args)
    variants = {v.name: build_variant_app(v) for v in serving.variants}
    ingress = AmaliaIngress.options(
        name=INGRESS_DEPLOYMENT_NAME,
        user_config=serving.routing.model_dump(),
        backpressure_config=proxy_backpressure(serving),
        **serving.ingress.deployment.serve_options(),
    )
    return ingress.bind(serving, variants)


def proxy_backpressure(serving: AmaliaServingArgs) -> dict[str, Any]:
    """What Serve's HTTP proxy answers when the ingress's own queue is full: 429 and Retry-After, as the
    ingress answers a full variant. The proxy writes the body itself, as plain text (Ray 2.60 has no setting for
    it), so this one refusal is not in OpenAI's JSON shape; OpenAI's clients still raise RateLimitError."""
    return {"status_code": 429, "retry_after_s": serving.ingress.retry_after_s}


def build_variant_app(args: dict[str, Any] | VariantConfig) -> Application:
    """One variant as its own application; name the application after the variant."""
    variant = args if isinstance(args, VariantConfig) else VariantConfig.model_validate(args)
    if ENGINE_CLS == DEFAULT_ENGINE_CLS:
        from amalia_serve.vllm_engine import check_engine_args

        check_engine_args(variant.engine)
    return VariantServer.options(name=variant.name, **variant.deployment.serve_options()).bind(variant)
