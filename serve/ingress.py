"""The OpenAI-compatible front door: HTTP request -> validation -> route decision -> variant handle -> response.

Status codes: 400 malformed JSON, a request past `ingress.limits` or one the engine refuses (context overflow,
...), 401 no valid API key (when `ingress.auth` configures keys; `/healthz` and `/readyz` stay open), 403 a caller
that `ingress.mesh.allowed_callers` does not list, 404 unknown model or route, 413 body too large, 422 a body that
breaks the request schema (wrong type, empty messages, max_tokens < 1), 429 a variant's queue is full, 503 no
variant replica can take the request, 504 past `ingress.request_timeout_s`. Every error has OpenAI's shape; every
429 and 503 carries `Retry-After`.

With a `shadow` block in the routing, a share of the requests routed to other variants is copied to the shadow
variant once answered (amalia_serve.shadow); the caller never waits for the copy nor sees its answer.

No `from __future__ import annotations` here: FastAPI reads the route signatures at runtime, and Serve's
class-based ingress cannot resolve postponed (string) annotations such as `request: Request`.
"""


import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from amalia_serve import openai_schema as oai
from amalia_serve.api_keys import UNAUTHORIZED, ApiKeyStore, AuthenticationFailed
from amalia_serve.caller_identity import (
    UNIDENTIFIED,
    CallerGate,
    CallerIdentity,
    current_caller_label,
    set_current_caller,
)
from amalia_serve.config import DEFAULT_SHADOW_IN_FLIGHT, AmaliaServingArgs, RoutingConfig
from amalia_serve.constants import SESSION_HEADER, VARIANT_HEADER
from amalia_serve.engine import EngineOutput
from amalia_serve.logging_setup import install_caller_log_field
from amalia_serve.metrics import IngressMetrics, ShadowMetrics
from amalia_serve.protocol import GenerationFailure, GenerationRequest, Operation
from amalia_serve.request_limits import LimitExceeded, check_request_limits
from amalia_serve.routing import RouteDecision, ShadowPolicy, TrafficSplit, UnknownVariantError
from amalia_serve.shadow import ShadowDispatcher
from amalia_serve.tracing import ServerSpan, configure_tracing, extract_carrier, server_span
from amalia_serve.variant_calls import ApiError, cancel_call, next_item

logger = logging.getLogger(f"ray.serve.{__name__}")  # lands in the replica logs under Serve


class VariantFailed(Exception):
    """The variant reported a failure after the stream had started (its engine died, say)."""

    def __init__(self, failure: GenerationFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure


api = FastAPI(
    title="amalia-serve",
    description="OpenAI-compatible API for AMALIA model variants",
    version="0.1.0",
    docs_url=None,
    redoc_url=None,
)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), error_type).response()


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _schema_error(exc.errors()).response()


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the caller; the log has it.
    logger.exception("unhandled error")
    return ApiError(500, "internal server error", "server_error").response()


def _schema_error(errors: Any) -> ApiError:
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return ApiError(422, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                    code=str(first.get("type", "invalid_value")))  # fmt: skip


# Statuses that tell the caller to come back later; each carries Retry-After (ingress.retry_after_s).
RETRY_LATER = frozenset({429, 503})


def _with_retry_after(status: int, headers: dict[str, str], retry_after_s: int) -> dict[str, str]:
    return {**headers, "Retry-After": str(retry_after_s)} if status in RETRY_LATER else headers


def _routing(config: RoutingConfig, names: list[str]) -> tuple[TrafficSplit, ShadowPolicy | None]:
    """The split and shadow policy a routing config asks for over `names`; ValueError when it cannot be."""
    split = TrafficSplit(names, config.weights)
    shadow = config.shadow
    return split, ShadowPolicy(split, shadow.variant, shadow.percent) if shadow is not None else None


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@serve.deployment
@serve.ingress(api)
class AmaliaIngress:
    """Routes each request to one variant deployment and speaks OpenAI's wire format."""

    def __init__(self, args: AmaliaServingArgs, variants: dict[str, DeploymentHandle]) -> None:
        configure_tracing("ingress")
        self.args = args
        self.bound = variants  # single-app layout; otherwise variants are applications found by name
        self.streams: dict[str, DeploymentHandle] = {}
        names = list(args.routing.weights) or list(variants)
        # In the production layout the weights, and so the variants, arrive with the first reconfigure.
        self.split: TrafficSplit | None = None
        self.shadow: ShadowPolicy | None = None
        if names:
            self.split, self.shadow = _routing(args.routing, names)
        self.routing_error: str | None = None
        self.rng = random.Random()
        self.metrics = IngressMetrics()
        self.shadows = ShadowDispatcher(
            self._open_call, ShadowMetrics(), args.ingress.request_timeout_s,
            args.routing.shadow.max_in_flight if args.routing.shadow else DEFAULT_SHADOW_IN_FLIGHT,
        )  # fmt: skip
        # None when no key source is configured: every route is open.
        self.api_keys = ApiKeyStore.from_config(args.ingress.auth, logger)
        self.callers = CallerGate(args.ingress.mesh)
        if self.callers.enabled:
            install_caller_log_field()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """New traffic weights and shadow setting, applied together without a restart.

        An invalid user_config is refused here, as a whole, and the old routing stays. This must not raise:
        Serve answers a raising reconfigure by restarting the replica, which fails again, and the deployment
        goes to DEPLOY_FAILED with no replica left to serve (seen with Ray 2.60), an outage over a typo.
        """
        try:
            routing = RoutingConfig.model_validate(user_config)
            split, shadow = _routing(routing, list(routing.weights) or list(self.bound))
            self._check_variants_exist(split, shadow)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            reason = (
                "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                if isinstance(exc, ValidationError) else str(exc)
            )  # fmt: skip
            self.routing_error = f"refused {user_config!r}: {reason}"
            logger.error("%s; keeping weights %s and shadow %s", self.routing_error, self.weights, self.shadow)
            return
        self.split, self.shadow, self.routing_error = split, shadow, None
        if routing.shadow is not None:
            self.shadows.max_in_flight = routing.shadow.max_in_flight
        logger.info("traffic weights now %s, shadow %s", split.weights, shadow)

    def _check_variants_exist(self, split: TrafficSplit, shadow: ShadowPolicy | None) -> None:
        """A variant that is to take unpinned traffic or shadow copies must be deployed, here or as its own
        application."""
        wanted = {name for name, weight in split.weights.items() if weight > 0}
        if shadow is not None and shadow.percent > 0:
            wanted.add(shadow.variant)
        wanted -= set(self.bound)
        if not wanted:
            return
        missing = sorted(wanted - set(serve.status().applications))
        if missing:
            raise ValueError(f"no deployed variant named {missing}")

    def _open_call(self, variant: str, generation: GenerationRequest) -> Any:
        return self._stream_handle(variant).generate.remote(generation)

    def _stream_handle(self, variant: str) -> DeploymentHandle:
        handle = self.streams.get(variant)
        if handle is None:
            base = self.bound.get(variant) or serve.get_deployment_handle(
                variant, app_name=variant, _check_exists=False
            )
            handle = self.streams[variant] = base.options(stream=True)
        return handle

    def _authenticate(self, request: Request) -> str | None:
        """The caller's API key name (api_keys.ANONYMOUS if keys are not required), None if keys are off.

        Counted and logged by name only; a refusal is OpenAI's 401 (its SDK raises AuthenticationError).
        """
        if self.api_keys is None:
            return None
        try:
            name: str = self.api_keys.authenticate(request.headers.get("authorization"))
        except AuthenticationFailed as exc:
            self.metrics.record_api_key_request(UNAUTHORIZED)
            client = request.client.host if request.client else "?"
            logger.info("401 %s %s from %s: %s", request.method, request.url.path, client, type(exc).__name__)
            raise ApiError(401, str(exc), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}) from None
        self.metrics.record_api_key_request(name)
        return name

    async def __del__(self) -> None:
        """Serve's replica shutdown: the shadow copies still running are cancelled, and so are their calls."""
        shadows = getattr(self, "shadows", None)
        if shadows is not None:
            await shadows.close()

    @property
    def weights(self) -> dict[str, int]:
        return self.split.weights if self.split is not None else {}

    @property
    def shadow_setting(self) -> dict[str, Any] | None:
        if self.shadow is None:
            return None
        return {"variant": self.shadow.variant, "percent": self.shadow.percent,
                "max_in_flight": self.shadows.max_in_flight}  # fmt: skip

    @property
    def variant_names(self) -> list[str]:
        return list(self.weights)

    # ---- routes ----------------------------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """200 when every variant answers. A variant autoscaled to zero replicas counts as ready without being
        asked: asking would wake it, and the first real request wakes it anyway."""

        async def probe(name: str) -> bool:
            try:
                handle = self._stream_handle(name).options(stream=False)
                return bool(await asyncio.wait_for(handle.ready.remote(), self.args.ingress.ready_timeout_s))
            except Exception:  # noqa: BLE001  (any failure of a variant to answer means: not ready)
                return False

        names = self.variant_names
        idle = await asyncio.to_thread(self._scaled_to_zero, names)
        results = await asyncio.gather(*(probe(n) for n in names if n not in idle))
        answers = dict(zip([n for n in names if n not in idle], results)) | {n: True for n in idle}
        ready = all(answers.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "variants": {n: answers[n] for n in names},
             "scaled_to_zero": sorted(idle)},
            status_code=200 if ready else 503,
            headers=_with_retry_after(200 if ready else 503, {}, self.args.ingress.retry_after_s),
        )  # fmt: skip

    def _scaled_to_zero(self, names: list[str]) -> set[str]:
        """Variants deployed as their own applications that run no replica and are healthy or waking up."""
        applications = serve.status().applications
        idle = set()
        for name in set(names) - set(self.bound):
            deployment = applications[name].deployments.get(name) if name in applications else None
            if (deployment is not None and deployment.status in ("HEALTHY", "UPSCALING")
                    and not deployment.replica_states.get("RUNNING")):  # fmt: skip
                idle.add(name)
        return idle

    @api.get("/routing")
    async def routing(self, request: Request) -> dict[str, Any]:
        """The live split and shadow setting and, when the last user_config was refused, why."""
        self._authenticate(request)
        return {"model": self.args.model_alias, "weights": self.weights, "shadow": self.shadow_setting,
                "error": self.routing_error}  # fmt: skip

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authenticate(request)
        self._admit(request)
        return oai.model_list([self.args.model_alias, *self.variant_names])

    @api.post("/v1/chat/completions", openapi_extra=oai.openapi_request_body(oai.ChatCompletionRequest, oai.CHAT_EXAMPLE))
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    @api.post("/v1/completions", openapi_extra=oai.openapi_request_body(oai.CompletionRequest, oai.COMPLETION_EXAMPLE))
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "text_completion")

    # ---- request path ----------------------------------------------------------------------------------------

    async def _complete(self, request: Request, operation: Operation) -> Response:
        started = time.monotonic()
        decision: RouteDecision | None = None
        with server_span(request.url.path, request.method, extract_carrier(request.headers)) as span:
            try:
                key_name = self._authenticate(request)
                caller = self._admit(request)
                body = await self._parse(request, operation)
                self._check_limits(body)
                sticky_key = body.user or request.headers.get(SESSION_HEADER) or self.callers.sticky_key(caller)
                decision = self._route(body, request, sticky_key)
                span.set_route(decision.variant, decision.reason.value)
                # Decided with the route, from the same live setting; the copy is sent after the answer.
                shadow = self.shadow
                shadow_to = shadow.variant if shadow and shadow.shadows(decision, sticky_key, self.rng) else None
                response = await self._generate(body, decision, operation, started, span, key_name, shadow_to)
            except ApiError as exc:
                headers = {VARIANT_HEADER: decision.variant} if decision else {}
                response = exc.response(_with_retry_after(exc.status, headers, self.args.ingress.retry_after_s))
            if isinstance(response, StreamingResponse):
                span.keep_open()  # the body generator ends it with the stream
            else:
                span.set_status_code(response.status_code)
                if decision is not None:
                    self.metrics.record_request(decision.variant, response.status_code,
                                                time.monotonic() - started, decision.reason.value)  # fmt: skip
                self._record_caller(decision, response.status_code)
        return response

    def _admit(self, request: Request) -> CallerIdentity | None:
        """The caller's mesh identity (None without a mesh); HTTP 403 when the allowlist refuses it."""
        caller = self.callers.identify(request.headers)
        if self.callers.enabled:
            set_current_caller(caller.label if caller else UNIDENTIFIED)
        if not self.callers.allows(caller):
            who = f"caller {caller.label}" if caller else "a caller without a mesh identity"
            logger.warning("refused %s: not in ingress.mesh.allowed_callers", who)
            raise ApiError(403, f"{who} is not allowed to use this API", "permission_error",
                           code="caller_not_allowed")  # fmt: skip
        return caller

    def _record_caller(self, decision: RouteDecision | None, status: int) -> None:
        caller = current_caller_label()
        if caller is not None:
            self.metrics.record_caller(caller, decision.variant if decision else "", status)

    async def _parse(
        self, request: Request, operation: Operation
    ) -> oai.ChatCompletionRequest | oai.CompletionRequest:
        limit = self.args.ingress.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}",
                           code="request_too_large")  # fmt: skip
        raw = await request.body()
        if len(raw) > limit:
            raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {limit}", code="request_too_large")
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        schema = oai.ChatCompletionRequest if operation == "chat" else oai.CompletionRequest
        try:
            return schema.model_validate(payload)
        except ValidationError as exc:
            raise _schema_error(exc.errors()) from None

    def _check_limits(self, body: oai.ChatCompletionRequest | oai.CompletionRequest) -> None:
        try:
            check_request_limits(body, self.args.ingress.limits)
        except LimitExceeded as exc:
            raise ApiError(400, f"{exc.param}: {exc}", param=exc.param, code=exc.code) from None

    def _route(
        self,
        body: oai.ChatCompletionRequest | oai.CompletionRequest,
        request: Request,
        sticky_key: str | None,
    ) -> RouteDecision:
        if self.split is None:
            raise ApiError(503, "no traffic weights configured yet", "service_unavailable",
                           code="no_variants")  # fmt: skip
        if body.model != self.args.model_alias and body.model not in self.split.weights:
            raise ApiError(404, f"The model `{body.model}` does not exist. Available: "
                           f"{', '.join([self.args.model_alias, *self.variant_names])}",
                           "not_found_error", "model", "model_not_found")  # fmt: skip
        try:
            return self.split.choose(
                model=body.model,
                header_variant=request.headers.get(VARIANT_HEADER),
                sticky_key=sticky_key,
                rng=self.rng,
            )
        except UnknownVariantError as exc:
            raise ApiError(400, str(exc), param=VARIANT_HEADER, code="unknown_variant") from None

    async def _generate(
        self,
        body: oai.ChatCompletionRequest | oai.CompletionRequest,
        decision: RouteDecision,
        operation: Operation,
        started: float,
        span: ServerSpan,
        key_name: str | None,
        shadow_to: str | None,
    ) -> Response:
        rid = ("chatcmpl-" if operation == "chat" else "cmpl-") + uuid.uuid4().hex
        generation = GenerationRequest(
            request_id=rid,
            operation=operation,
            requested_model=body.model,
            sampling=body.sampling(),
            messages=body.message_dicts() if isinstance(body, oai.ChatCompletionRequest) else None,
            prompt=body.prompt_text() if isinstance(body, oai.CompletionRequest) else None,
            trace_carrier=span.carrier,
        )
        timeout_s = self.args.ingress.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s - (time.monotonic() - started)
        stream = self._stream_handle(decision.variant).generate.remote(generation)
        first = await next_item(stream, decision.variant, deadline, timeout_s)
        if isinstance(first, GenerationFailure):
            raise ApiError.from_failure(first)
        self.metrics.record_first_token(decision.variant, time.monotonic() - started)
        headers = {VARIANT_HEADER: decision.variant}
        after_answer = self._shadow_sender(shadow_to, generation, decision.variant) if shadow_to else None
        if body.stream:
            events = self._stream_events(body, decision, operation, rid, first, stream, started, span, key_name,
                                         deadline, after_answer)  # fmt: skip
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        text, last = [first.text], first
        while last.finish_reason is None:  # the final output ends it; no wait for end-of-stream
            item = await next_item(stream, decision.variant, deadline, timeout_s)
            if isinstance(item, GenerationFailure):
                cancel_call(stream)
                raise ApiError.from_failure(item)
            last = item
            text.append(last.text)
        cancel_call(stream)
        if key_name is not None:
            self.metrics.record_api_key_tokens(key_name, last.prompt_tokens, last.output_tokens)
        used = oai.usage(last.prompt_tokens, last.output_tokens)
        answer = "".join(text)
        if operation == "chat":
            payload = oai.chat_completion(rid, decision.variant, answer, last.finish_reason, used)
        else:
            payload = oai.text_completion(rid, decision.variant, answer, last.finish_reason, used, int(time.time()))
        # Starlette runs a background task after the response's last byte was sent.
        background = BackgroundTask(after_answer, answer) if after_answer else None
        return JSONResponse(payload, headers=headers, background=background)

    def _shadow_sender(
        self, shadow_to: str, generation: GenerationRequest, answered_by: str
    ) -> Callable[[str], Awaitable[None]]:
        """What sends the shadow copy of `generation`, given the answer the caller got. Async, so that
        Starlette runs it on the event loop (a plain function would go to a thread pool)."""

        async def send(answer: str) -> None:
            self.shadows.submit(shadow_to, generation, answered_by, answer)

        return send

    async def _stream_events(
        self,
        body: oai.ChatCompletionRequest | oai.CompletionRequest,
        decision: RouteDecision,
        operation: Operation,
        rid: str,
        first: EngineOutput,
        stream: Any,
        started: float,
        span: ServerSpan,
        key_name: str | None,
        deadline: float,
        after_answer: Callable[[str], Awaitable[None]] | None,
    ) -> AsyncIterator[bytes]:
        model, created = decision.variant, int(time.time())
        status = 200
        last = first
        answer: list[str] = []  # kept only for a shadowed request, whose copy compares answers
        try:
            if operation == "chat":
                yield _sse(oai.chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
            while True:
                if last.text or last.finish_reason:
                    if after_answer is not None:
                        answer.append(last.text)
                    yield _sse(self._chunk(operation, rid, model, created, last))
                if last.finish_reason is not None:
                    break
                item = await next_item(stream, model, deadline, self.args.ingress.request_timeout_s)
                if isinstance(item, GenerationFailure):
                    raise VariantFailed(item)
                last = item
            if body.include_usage_in_stream:
                obj = "chat.completion.chunk" if operation == "chat" else "text_completion"
                used = oai.usage(last.prompt_tokens, last.output_tokens)
                yield _sse(oai.usage_chunk(rid, model, created, obj, used))
            yield _sse("[DONE]")
            if after_answer is not None:  # the caller has the whole stream: now the shadow copy
                await after_answer("".join(answer))
        except asyncio.CancelledError as exc:
            status = 499  # client closed the connection (nginx's convention)
            span.record_error(exc)
            raise
        except ApiError as exc:  # past the deadline, or the variant failed (its replica died)
            status = exc.status
            span.record_error(exc)
            logger.warning("stream from variant %s ended: %s", model, exc.message)
            yield _sse(oai.error_body(exc.message, exc.error_type, code=exc.code))
        except VariantFailed as exc:
            status = exc.failure.status
            span.record_error(exc)
            logger.error("stream from variant %s failed: %s", model, exc.failure.message)
            yield _sse(oai.error_body(exc.failure.message, exc.failure.error_type, code=exc.failure.code))
        except Exception as exc:
            status = 500
            span.record_error(exc)
            logger.exception("stream from variant %s failed", model)
            yield _sse(oai.error_body("the stream was interrupted", "server_error"))
        finally:
            cancel_call(stream)
            if key_name is not None:  # what was generated, also for a stream cut short
                self.metrics.record_api_key_tokens(key_name, last.prompt_tokens, last.output_tokens)
            span.set_status_code(200 if status == 499 else status)
            span.end()
            self.metrics.record_request(model, status, time.monotonic() - started, decision.reason.value)
            self._record_caller(decision, status)

    @staticmethod
    def _chunk(operation: Operation, rid: str, model: str, created: int, out: EngineOutput) -> dict[str, Any]:
        if operation == "chat":
            delta = {"content": out.text} if out.text else {}
            return oai.chat_chunk(rid, model, created, delta, out.finish_reason)
        return oai.text_completion(rid, model, out.text, out.finish_reason, None, created)
