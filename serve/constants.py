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

# Escape hatch (as Ray Serve LLM's RAYLLM_VLLM_ENGINE_CLS): "module:Class" of another engine with the same
# interface, e.g. the benchmark's one-request-at-a-time baseline.
DEFAULT_ENGINE_CLS = "amalia_serve.vllm_engine:VLLMEngine"
ENGINE_CLS = os.getenv("AMALIA_ENGINE_CLS", DEFAULT_ENGINE_CLS)

# Demo checkpoints written by `amalia-serve demo-models`.
DEMO_SFT_DIRNAME = "amalia-sft-demo"
DEMO_DPO_DIRNAME = "amalia-dpo-demo"
