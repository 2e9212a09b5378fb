"""Names and environment knobs shared across the package; every env knob uses the AMALIA_ prefix."""

from __future__ import annotations

import os

# Serve deployment name of the OpenAI ingress. The operator and the chart address its user_config by it.
INGRESS_DEPLOYMENT_NAME = "AmaliaIngress"

# Response header naming the variant that served; request header that pins one.
VARIANT_HEADER = "x-amalia-variant"
SESSION_HEADER = "x-session-id"

DEFAULT_SYSTEM_PROMPT = (
    "És a AMALIA, um modelo de linguagem português, aberto e desenvolvido em Portugal. "
    "Responde de forma útil, honesta e concisa, na língua do utilizador."
)

# Bounds how long a replica may take to load its checkpoint before Serve marks it unhealthy.
ENGINE_START_TIMEOUT_S = float(os.getenv("AMALIA_ENGINE_START_TIMEOUT_S", "900"))

# Demo checkpoints written by `amalia-serve demo-models`.
DEMO_SFT_DIRNAME = "amalia-sft-demo"
DEMO_DPO_DIRNAME = "amalia-dpo-demo"
