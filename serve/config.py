"""Typed configuration of the Serve application, parsed once at the edge.

Everything a Serve config file (``applications[].args``) or a RayService ``serveConfigV2`` can say about
amalia-serve is declared here. Unknown keys are errors, so a typo in YAML fails the deploy loudly
instead of silently falling back to a default. This module imports neither Ray nor torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from amalia_serve.autoscaling import ENGINE_LOAD_POLICY, PolicyKnobs
from amalia_serve.capacity import DEFAULT_GPU_MEMORY_UTILIZATION, EngineSettings, check_variant
from amalia_serve.constants import DEFAULT_SYSTEM_PROMPT

VARIANT_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class AmaliaModel(BaseModel):
    """Base for every config object: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @classmethod
    def from_yaml(cls, text: str) -> AmaliaModel:
        return cls.model_validate(yaml.safe_load(text))

    @classmethod
    def from_file(cls, path: str | Path) -> AmaliaModel:
        return cls.from_yaml(Path(path).read_text(encoding="utf-8"))


# Quantization methods of vLLM that make sense for a Llama-architecture AMALIA checkpoint: a quantized checkpoint
# directory names its method in config.json (awq, gptq, compressed-tensors, ...), `fp8` also quantizes bf16
# weights on the fly on Hopper/Ada GPUs. tests/unit/serve/test_vllm_engine_args.py checks each against vLLM.
Quantization = Literal[
    "fp8", "fp8_per_tensor", "fp8_per_channel", "fp8_per_block", "awq", "awq_marlin", "gptq", "gptq_marlin",
    "compressed-tensors", "modelopt",
    "torchao", "fbgemm_fp8",
]  # fmt: skip

# Engine arguments amalia-serve sets itself: the loading path of a sovereign cluster (local safetensors, no remote
# code) and the names the metrics and the API use. `engine_args` may not override them.
OWNED_ENGINE_ARGS = frozenset({
    "model", "tokenizer", "served_model_name", "trust_remote_code", "load_format", "download_dir",
    "disable_log_stats", "revision", "tokenizer_revision", "hf_token", "hf_overrides",
})  # fmt: skip


class EngineConfig(AmaliaModel):
    """One variant's vLLM engine: vLLM's own engine arguments (same names), plus what amalia-serve adds."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations dtype; `auto` takes the checkpoint's (bfloat16 for AMALIA)."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="Context window in tokens; defaults to the checkpoint's max_position_embeddings."
    )
    gpu_memory_utilization: float = Field(
        DEFAULT_GPU_MEMORY_UTILIZATION, gt=0, le=1, description="Fraction of GPU memory vLLM may use for weights, activations and KV cache. "
        "On vLLM's CPU build it is a fraction of the host's memory: set kv_cache_memory_bytes there instead."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1 << 20, description="KV-cache size in bytes; when set, gpu_memory_utilization does not size it."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    max_num_seqs: int | None = Field(
        None, ge=1, description="Requests decoded together in one step; null takes vLLM's default for the device."
    )
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="Tokens scheduled per engine step (prefill chunks + decodes); null: vLLM's default."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (system prompt, earlier turns)."
    )
    enable_chunked_prefill: bool | None = Field(
        None, description="Split long prefills so they do not stall decoding; null: vLLM's default (on)."
    )
    kv_cache_dtype: Literal["auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV-cache dtype; fp8 halves KV memory per token (Hopper/Ada GPUs)."
    )
    quantization: Quantization | None = Field(
        None, description="Weight quantization. null: as the checkpoint's config.json says, so a checkpoint quantized "
        "offline (compressed-tensors int8/int4 from llm-compressor, GPTQ, AWQ, fp8; docs/quantization.md) needs "
        "nothing here. A value its quantization_config contradicts is refused when the config is loaded where "
        "config.json is readable (a local run; else vLLM refuses it as the replica starts). "
        "`fp8_per_tensor` (or the older spelling `fp8`, deprecated in vLLM 0.32) quantizes a bf16 checkpoint's "
        "weights while loading, on Hopper/Ada GPUs."
    )
    enforce_eager: bool = Field(
        False, description="Skip CUDA graphs / torch.compile: faster start, slower decode. For tests."
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other vLLM engine argument (AsyncEngineArgs field), passed through as given. Checked "
        "against the installed vLLM when the variant application is built.",
    )
    max_pending_requests: int | None = Field(
        None, ge=1, description="Requests a replica's engine holds (running + waiting) before new ones get HTTP "
        "429; null is twice the batch size (max_num_seqs)."
    )
    default_max_tokens: int = Field(
        512, ge=1, description="max_tokens when a request gives none (capped by the free context)."
    )
    system_prompt: str | None = Field(
        DEFAULT_SYSTEM_PROMPT,
        description="System message prepended to chats that have none; null turns it off. AMALIA invents "
        "personas without one.",
    )
    stream_interval_ms: float = Field(
        50.0, ge=0, description="After the first token, a stream sends what accumulated at most this often: "
        "fewer, larger messages across the DeploymentHandle (0 sends every engine output)."
    )
    start_timeout_s: float = Field(
        1800.0, gt=0, description="Seconds the engine may take to load the checkpoint and start (a replica "
        "that takes longer fails and Serve retries it)."
    )

    @field_validator("engine_args")
    @classmethod
    def _pass_through_only(cls, engine_args: dict[str, Any]) -> dict[str, Any]:
        typed = sorted(set(engine_args) & set(cls.model_fields))
        if typed:
            raise ValueError(f"engine_args {typed}: set these as engine fields of their own, not in engine_args")
        owned = sorted(set(engine_args) & OWNED_ENGINE_ARGS)
        if owned:
            raise ValueError(f"engine_args {owned}: amalia-serve sets these itself (model path, offline loading)")
        return engine_args


class AutoscalingOptions(AmaliaModel, PolicyKnobs):
    """How a deployment autoscales: Serve's replica bounds and delays, and the policy with its targets.

    Rendered into Serve's ``autoscaling_config`` by `serve_config`; docs/autoscaling.md explains the
    engine-load policy and how to choose the numbers.
    """

    policy: Literal["engine_load", "ongoing_requests"] = Field(
        "engine_load",
        description="`engine_load`: scale on the engines' waiting requests, KV-cache usage and busy batch "
        "slots (amalia_serve.autoscaling). `ongoing_requests`: Serve's stock policy "
        "(`target_ongoing_requests` per replica); `target_waiting_per_replica` and `target_kv_cache_usage` "
        "are then ignored.",
    )
    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas; 0 lets an idle variant scale to zero (the next request waits "
        "for a replica to load)."
    )
    max_replicas: int = Field(..., ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started on deploy; defaults to `min_replicas`."
    )
    target_ongoing_requests: float = Field(
        16.0,
        gt=0,
        description="Running plus queued requests per replica: the rule of `policy: ongoing_requests`, and the "
        "engine-load policy's fallback while no replica reports engine stats.",
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="Seconds the policy must keep asking for more replicas before Serve adds them."
    )
    downscale_delay_s: float = Field(
        600.0,
        ge=0,
        description="Seconds the policy must keep asking for fewer replicas before Serve removes one; long, "
        "because bringing a replica back means loading the weights again.",
    )
    downscale_to_zero_delay_s: float | None = Field(
        None, ge=0, description="Seconds before the last replica goes (1 -> 0); defaults to `downscale_delay_s`."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which Serve averages each replica's reported load."
    )
    metrics_interval_s: float | None = Field(
        None,
        gt=0,
        description="Seconds between the load reports of replicas and handles to Serve's controller (Serve's "
        "default 10 when null). Serve 2.60 marks it deprecated in favour of environment variables it does "
        "not read yet, so it is still the knob; keep it below `look_back_period_s`.",
    )
    upscaling_factor: float | None = Field(
        None, gt=0, description="Multiplies each upscale step (Serve's gain; 1 when unset)."
    )
    downscaling_factor: float | None = Field(
        None, gt=0, description="Multiplies each downscale step (Serve's gain; 1 when unset)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingOptions:
        interval = self.metrics_interval_s
        if interval is not None and interval >= self.look_back_period_s:
            raise ValueError(
                f"metrics_interval_s {interval} must be below look_back_period_s {self.look_back_period_s}"
            )
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} is below min_replicas {self.min_replicas}")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas {initial} is outside [{self.min_replicas}, {self.max_replicas}]"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config``; the engine-load policy goes in as its import path and knobs."""
        knobs = set(PolicyKnobs.model_fields)
        config = self.model_dump(exclude_none=True, exclude={"policy", *knobs})
        if self.policy == "engine_load":
            config["policy"] = {
                "policy_function": ENGINE_LOAD_POLICY,
                "policy_kwargs": self.model_dump(include=knobs),
            }
        return config


class DeploymentOptions(AmaliaModel):
    """The Ray Serve deployment options we expose; Serve itself validates their contents again."""

    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; omit when autoscaling.")
    autoscaling_config: AutoscalingOptions | None = Field(
        None, description="Autoscale between min and max replicas instead (see AutoscalingOptions)."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica accepts at once.")
    max_queued_requests: int | None = Field(
        None, ge=-1, description="Requests each caller (an ingress replica for a variant, Serve's HTTP proxy for "
        "the ingress) holds for this deployment while every replica already has max_ongoing_requests; the next "
        "one is refused with HTTP 429 and Retry-After. null: equal to max_ongoing_requests, one more replica's "
        "worth of waiting work, so a request waits at most about one turn of generations before it is served "
        "or refused. -1 removes the bound (not recommended: the queue then grows without limit under overload)."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1},
        description="Ray actor options: num_cpus, num_gpus, memory, resources, runtime_env, ...",
    )
    health_check_period_s: float | None = Field(None, gt=0, description="Seconds between Serve health checks.")
    graceful_shutdown_timeout_s: float | None = Field(
        None, ge=0, description="Seconds a stopping replica gets to finish its requests."
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentOptions:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set num_replicas or autoscaling_config, not both")
        gpus = self.ray_actor_options.get("num_gpus")
        if gpus is not None and (not isinstance(gpus, (int, float)) or gpus < 0):
            raise ValueError(f"ray_actor_options.num_gpus must be a number >= 0, got {gpus!r}")
        return self

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments for ``Deployment.options``."""
        options = self.model_dump(exclude_none=True, exclude={"autoscaling_config"})
        options["max_queued_requests"] = self.queue_bound
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.serve_config()
        return options

    @property
    def queue_bound(self) -> int:
        """Serve's `max_queued_requests`: bounded unless set to -1."""
        return self.max_ongoing_requests if self.max_queued_requests is None else self.max_queued_requests


class VariantConfig(AmaliaModel):
    """One model version, served by its own Serve deployment of the same name."""

    name: str = Field(
        ...,
        pattern=VARIANT_NAME_PATTERN,
        description="Served model id and Serve deployment name, e.g. `amalia-sft`.",
    )
    model_path: str = Field(
        ..., min_length=1, description="Local checkpoint directory (PVC mount) or a local HF cache snapshot."
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Engine settings (see EngineConfig).")
    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="Serve deployment options (see DeploymentOptions)."
    )

    @model_validator(mode="after")
    def _fits_its_gpu(self) -> VariantConfig:
        """Refuse an engine block vLLM could not start, where this process can tell: the checkpoint's
        config.json is readable (a local run; a cluster's head does not mount the models) and, for the
        memory fit, `ray_actor_options.accelerator_type` names the card (see `amalia-serve plan`)."""
        engine = self.engine
        settings = EngineSettings(
            max_model_len=engine.max_model_len,
            quantization=engine.quantization,
            kv_cache_dtype=engine.kv_cache_dtype,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            tensor_parallel_size=engine.tensor_parallel_size,
            max_num_seqs=engine.max_num_seqs,
            max_num_batched_tokens=engine.max_num_batched_tokens,
        )
        # A KV cache sized in bytes is not a share of the card: only the checkpoint checks apply.
        accelerator = None if engine.kv_cache_memory_bytes else self.deployment.ray_actor_options.get(
            "accelerator_type"
        )
        problems = check_variant(self.model_path, accelerator, settings)
        if problems:
            raise ValueError(f"variant {self.name}: {'; '.join(problems)}")
        return self


# Shadow copies running at once per ingress replica unless `shadow.max_in_flight` says otherwise.
DEFAULT_SHADOW_IN_FLIGHT = 4


class ShadowConfig(AmaliaModel):
    """Shadow traffic: a share of the requests routed to other variants is copied to this one after the
    answer was sent; nobody sees the copy's answer (docs/routing.md, "Shadow traffic")."""

    variant: str = Field(
        ...,
        pattern=VARIANT_NAME_PATTERN,
        description="Variant that answers the copies, usually the canary: one that `weights` names (weight 0 "
        "is fine), or with empty weights one of `variants`.",
    )
    # Strict: `true` or "5" in YAML is a mistake, not a percentage.
    percent: StrictFloat = Field(
        ...,
        ge=0,
        le=100,
        description="Share of the requests routed by sticky key or weighted draw (not pinned by model name or "
        "header) that are copied, 0..100; 0 turns shadowing off. A sticky key is either always or never "
        "copied at a given percent.",
    )
    max_in_flight: StrictInt = Field(
        DEFAULT_SHADOW_IN_FLIGHT,
        ge=1,
        description="Copies running at once per ingress replica; a copy past it is dropped and counted "
        "(`amalia_shadow_dropped_total{reason=\"in_flight_limit\"}`), never queued.",
    )


class RoutingConfig(AmaliaModel):
    """Traffic split of the model alias over the variants: the ingress deployment's user_config."""

    weights: dict[str, int] = Field(
        default_factory=dict,
        description="Variant name -> relative weight (>= 0). Empty means all traffic to the first variant.",
    )
    shadow: ShadowConfig | None = Field(
        default=None, description="Copy a share of live requests to a variant after they are answered (see ShadowConfig); "
        "null is off."
    )

    @field_validator("weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, int]) -> dict[str, int]:
        negative = {name: w for name, w in weights.items() if w < 0}
        if negative:
            raise ValueError(f"weights must be >= 0, got {negative}")
        if weights and sum(weights.values()) == 0:
            raise ValueError("at least one weight must be > 0")
        return weights


class AuthConfig(AmaliaModel):
    """Bearer API keys on the OpenAI routes (`/v1/...`, `/routing`); off unless a key source is set.

    `/healthz`, `/readyz` and `/openapi.json` stay open. See amalia_serve.api_keys for the format.
    """

    keys_file: str | None = Field(
        None,
        min_length=1,
        description="File of API keys, a YAML map `name: key` (one per line; JSON works too), e.g. a "
        "mounted Kubernetes Secret. Re-read when it changes, no restart; a bad version is refused and "
        "the keys before it stay.",
    )
    keys_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of an env var holding keys in the same format; read once at start.",
    )
    required: bool = Field(
        True,
        description="Refuse requests without a valid key (401). false lets them through, counted as "
        "`anonymous`, while callers move to keys.",
    )
    reload_interval_s: float = Field(
        5.0, gt=0, description="Seconds between checks of `keys_file` for changes (one stat per check)."
    )

    @model_validator(mode="after")
    def _required_needs_a_source(self) -> AuthConfig:
        if "required" in self.model_fields_set and self.required and not self.enabled:
            raise ValueError("auth.required needs keys_file or keys_env; without them no key is checked")
        return self

    @property
    def enabled(self) -> bool:
        return self.keys_file is not None or self.keys_env is not None
MeshProvider = Literal["none", "istio", "istio-ambient", "linkerd"]
K8S_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A ServiceAccount name is a DNS subdomain: labels joined by dots.
K8S_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class CallerRule(AmaliaModel):
    """One workload (or every workload of a namespace) allowed to call the API, by mesh identity."""

    namespace: str = Field(..., pattern=K8S_LABEL_PATTERN, description="Namespace of the caller.")
    service_account: str | None = Field(
        None,
        pattern=K8S_SUBDOMAIN_PATTERN,
        description="ServiceAccount of the caller; null allows every workload of the namespace.",
    )


class MeshConfig(AmaliaModel):
    """The service mesh in front of the ingress, and what the ingress does with its caller identity.

    With a mesh the local proxy (Istio's sidecar or waypoint, Linkerd's proxy) terminates mTLS and
    tells the app who called in a header it sets itself; without one that header is whatever the
    caller sent, so it is ignored.
    """

    provider: MeshProvider = Field(
        "none",
        description="`none`, `istio` (sidecars: `x-forwarded-client-cert`), `istio-ambient` "
        "(`x-forwarded-client-cert` from a waypoint that synthesises it, Istio >= 1.30) or `linkerd` "
        "(`l5d-client-id`). `none` ignores both headers: any caller could forge them.",
    )
    trust_identity_header: bool = Field(
        True,
        description="Read the caller from the provider's header. Turn off where no proxy on the "
        "request path sets it and strips forgeries (Istio ambient without such a waypoint).",
    )
    trust_domain: str = Field(
        "cluster.local",
        min_length=1,
        description="Trust domain of the mesh identities (Istio `meshConfig.trustDomain`, Linkerd "
        "`identityTrustDomain`); an identity from another domain counts as no identity.",
    )
    allowed_callers: list[CallerRule] = Field(
        default_factory=list,
        description="Workloads allowed on the OpenAI routes (`/v1/*`); others get HTTP 403. Empty "
        "allows every caller the mesh lets through.",
    )
    sticky_by_caller: bool = Field(
        True,
        description="Use the caller identity as the sticky-routing key of requests that carry none "
        "(`user`, `x-session-id`), so one workload keeps talking to one variant.",
    )

    @model_validator(mode="after")
    def _identity_needed(self) -> MeshConfig:
        if self.allowed_callers and not self.identifies_callers:
            raise ValueError(
                "allowed_callers needs provider istio, istio-ambient or linkerd with "
                "trust_identity_header: without them the caller identity is unknown or forgeable"
            )
        return self

    @property
    def identifies_callers(self) -> bool:
        """Whether the ingress reads a caller identity at all."""
        return self.provider != "none" and self.trust_identity_header


class RequestLimits(AmaliaModel):
    """What one request may ask for, checked in the ingress before a variant tokenizes anything.

    Each limit is answered with HTTP 400 in OpenAI's shape, `param` naming the field.
    """

    max_messages: int = Field(2048, ge=1, description="Messages in one chat (OpenAI's own limit).")
    max_prompt_chars: int = Field(
        262144, ge=1, description="Characters of the prompt: all message contents of a chat together, or the "
        "completion prompt. The default is what a 32k-token context holds at 8 characters per token, so no "
        "prompt that could fit is refused, and no multi-megabyte text is tokenized only to be refused."
    )
    max_stop_sequences: int = Field(4, ge=0, description="Stop strings in `stop` (OpenAI's limit).")
    max_stop_chars: int = Field(
        256, ge=1, description="Characters of one stop string: the engine looks for each stop string in the "
        "newest text after every step, so long ones cost every stream time."
    )


class IngressConfig(AmaliaModel):
    """The OpenAI-compatible front deployment."""

    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256),
        description="Serve deployment options of the ingress (see DeploymentOptions).",
    )
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Larger bodies get HTTP 413.")
    ready_timeout_s: float = Field(2.0, gt=0, description="How long /readyz waits for each variant.")
    request_timeout_s: float = Field(
        1800.0, gt=0, description="Deadline of one completion, from its arrival at the ingress: past it the "
        "request is aborted in the engine (its slot freed) and answered with HTTP 504 (`code: request_timeout`), "
        "or, once a stream has started, with an SSE error event. The default lets a 32k-token answer finish at "
        "20 tokens/s per stream."
    )
    retry_after_s: int = Field(
        2, ge=0, description="Seconds in the `Retry-After` header of every 429 and 503 (full queues, a variant "
        "without a replica), also of the 429 Serve's proxy answers when the ingress's own queue is full."
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits, description="Per-request limits (see RequestLimits)."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys (see AuthConfig).")
    mesh: MeshConfig = Field(
        default_factory=MeshConfig,
        description="Service mesh and caller identity (see MeshConfig); off by default.",
    )


class AmaliaServingArgs(AmaliaModel):
    """The front application: ``amalia_serve.app:build_app`` takes exactly this as its args.

    Two layouts. Production (the chart, the operator, `make run`): `variants` is empty and every variant is
    its own Serve application built by ``amalia_serve.app:build_variant_app``, named after the variant; the
    ingress finds them by the names in its weights. A new variant is then a new application, and no
    running replica restarts (Serve redeploys every deployment of an application whose `args` change).
    Single application (`serve run`, Python): the variants listed here are deployed next to the ingress.
    """

    model_alias: str = Field(
        "amalia", pattern=VARIANT_NAME_PATTERN, description="Model name that is routed over the variants."
    )
    variants: list[VariantConfig] = Field(
        default_factory=list, description="Variants deployed inside this application (single-app layout)."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig,
        description="Initial weights; a Serve config's `deployments: [{name: AmaliaIngress, user_config}]` "
        "overrides them live.",
    )
    ingress: IngressConfig = Field(default_factory=IngressConfig, description="See IngressConfig.")

    @model_validator(mode="after")
    def _consistent(self) -> AmaliaServingArgs:
        names = [v.name for v in self.variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate variant names: {duplicates}")
        if self.model_alias in names or self.model_alias in self.routing.weights:
            raise ValueError(f"model_alias {self.model_alias!r} must differ from every variant name")
        unknown = sorted(set(self.routing.weights) - set(names))
        if names and unknown:
            raise ValueError(f"routing.weights name unknown variants {unknown}; variants are {names}")
        shadow = self.routing.shadow
        known = list(self.routing.weights) or names
        if shadow is not None and shadow.variant not in known:
            raise ValueError(f"routing.shadow.variant {shadow.variant!r} is not a variant; variants are {known}")
        return self

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]
