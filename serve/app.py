"""Builds the Serve application: one deployment per variant, one OpenAI ingress over their handles.

Python::

    from amalia_serve import build_app
    serve.run(build_app({"variants": [{"name": "amalia-sft", "model_path": "/models/sft"}]}))

Serve config / RayService ``serveConfigV2``::

    applications:
      - name: amalia
        route_prefix: /
        import_path: amalia_serve.app:build_app
        args:
          variants:
            - {name: amalia-sft, model_path: /models/AMALIA-9B-0626-SFT}
            - {name: amalia-dpo, model_path: /models/AMALIA-9B-0626-DPO}
        deployments:
          - name: AmaliaIngress
            user_config: {weights: {amalia-sft: 90, amalia-dpo: 10}}
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from amalia_serve.config import AmaliaServingArgs
from amalia_serve.constants import INGRESS_DEPLOYMENT_NAME
from amalia_serve.ingress import AmaliaIngress
from amalia_serve.variant import VariantServer


def build_app(args: dict[str, Any] | AmaliaServingArgs) -> Application:
    """Validate `args` (see `AmaliaServingArgs`) and bind the deployment graph."""
    serving = args if isinstance(args, AmaliaServingArgs) else AmaliaServingArgs.model_validate(args)
    variants = {
        v.name: VariantServer.options(name=v.name, **v.deployment.serve_options()).bind(v)
        for v in serving.variants
    }
    ingress = AmaliaIngress.options(
        name=INGRESS_DEPLOYMENT_NAME,
        user_config=serving.routing.model_dump(),
        **serving.ingress.deployment.serve_options(),
    )
    return ingress.bind(serving, variants)
