"""`synthpert serve`: the local perturbation-reasoning endpoint (FastAPI + uvicorn).

Endpoints:

* ``POST /v1/predict`` ``{cell_line, perturbation, gene, n_samples?, return_reasoning?}`` ->
  ``{label, label_strict, probabilities, probability_method, reasoning, model, adapter, ...}``
* ``POST /v1/predict/batch`` ``{items: [...], n_samples?, return_reasoning?}`` -> ``{predictions: [...]}``
* ``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI-compatible, for tools that speak that API.
  The prompt is rendered with the chat template stored beside the adapter. ``stream=true`` answers with
  server-sent events in OpenAI's chunk format (token by token on the transformers backend; one content
  chunk on backends that cannot stream); ``logprobs``/``top_logprobs`` are returned where the backend has
  them (transformers) and are a 400 naming the field elsewhere, never ignored.
* ``GET /health``

Both backends run in-process: the model (transformers) or a ``vllm.LLM`` engine with the adapter as a
``LoRARequest`` sits behind an async micro-batcher, which gathers concurrent requests into one batched
call. (vLLM's own OpenAI server, ``python -m vllm.entrypoints.openai.api_server --model BASE
--enable-lora --lora-modules NAME=ADAPTER``, is the alternative for chat-only serving at scale; it knows
nothing of /v1/predict.)

Security defaults: binds 127.0.0.1; when the environment variable named by ``api_key_env`` (default
SYNTHPERT_API_KEY) is set, every endpoint but /health needs ``Authorization: Bearer <key>``; request
bodies, batch sizes, n_samples and max_tokens are capped; at most ``max_in_flight`` requests are handled at
once (the next is 503 with Retry-After, never queued) and each gets ``request_timeout_s`` (then 504); every
response carries ``X-Request-ID`` and headers fit for a JSON API (nosniff, no-store, a CSP that allows
nothing); CORS is off unless ``cors_origins`` names origins; errors are JSON ``{"error": {message, type,
param, code, request_id}}`` and never carry a traceback or the key.

Middleware, outermost first: ``Envelope`` (request id, headers, bound, timeout, last-resort 500), Starlette's
``CORSMiddleware`` (only when configured; outside the key check, since browsers send preflights without
it), ``Gate`` (declared length, API key), ``BodyLimit`` (streamed length), ``JsonBody`` (a POST body is read
as JSON whatever its Content-Type, so `curl -d '{...}'` works), then FastAPI's routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HTTPRequest

from ..cells import get_cell_line
from ..config.serve import ServeConfig, ServeSettings
from ..errors import SynthpertError, scrub
from ..inference import Triple, answer_record, load_student
from ..lookup import adapter_lookup, evidence_block
from ..schema import SYMBOL_PATTERN, Example
from .http import BodyLimit, BodyTooLarge, Envelope, Gate, JsonBody, error_response, too_large
from .stream import _sse, _token_stream, _whole_stream

log = logging.getLogger("synthpert.serve")

Symbol = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64, pattern=SYMBOL_PATTERN)]


# ---------------------------------------------------------------------------------------------------------
# Request / response bodies


class PredictItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cell_line: Symbol
    perturbation: Symbol
    gene: Symbol

    @field_validator("cell_line")
    @classmethod
    def _known_line(cls, v: str) -> str:
        try:
            return get_cell_line(v).key
        except SynthpertError as e:
            raise ValueError(str(e)) from None


class PredictRequest(PredictItem):
    n_samples: int = Field(1, ge=1)
    return_reasoning: bool = False


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[PredictItem] = Field(..., min_length=1)
    n_samples: int = Field(1, ge=1)
    return_reasoning: bool = False


def _encodable(v: str) -> str:
    # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer and no UTF-8 response can carry.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (a lone surrogate \\uD800-\\uDFFF is not)") from None
    return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str = Field(..., pattern="^(system|user|assistant)$")
    content: str = Field(..., max_length=100_000)

    _v_content = field_validator("content")(classmethod(lambda cls, v: _encodable(v)))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and ignored

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    _v_model = field_validator("model")(classmethod(lambda cls, v: _encodable(v)))


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# ---------------------------------------------------------------------------------------------------------
# Micro-batcher: concurrent requests with the same settings share one batched model call


class Batcher:
    def __init__(self, run_batch, max_items: int, window_s: float):
        self.run_batch = run_batch  # (key, items) -> results, called in a worker thread
        self.max_items = max_items
        self.window_s = window_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass

    async def submit(self, key, items: list) -> list:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((key, items, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            pending = [first]
            if self.window_s:
                await asyncio.sleep(self.window_s)
            while not self.queue.empty() and sum(len(p[1]) for p in pending) < self.max_items * 4:
                pending.append(self.queue.get_nowait())
            groups: dict[Any, list] = {}
            for key, items, fut in pending:
                if fut.done():  # its request timed out or its client left while it waited: spend nothing on it
                    continue
                groups.setdefault(key, []).append((items, fut))
            for key, entries in groups.items():
                # Split into model calls of at most max_items; keep each request's items together.
                chunk: list = []
                for entry in entries:
                    if chunk and sum(len(e[0]) for e in chunk) + len(entry[0]) > self.max_items:
                        await self._run(loop, key, chunk)
                        chunk = []
                    chunk.append(entry)
                if chunk:
                    await self._run(loop, key, chunk)

    async def _run(self, loop, key, entries: list) -> None:
        flat = [it for items, _ in entries for it in items]
        try:
            results = await loop.run_in_executor(None, self.run_batch, key, flat)
        except Exception as e:  # handed to each waiting request; the handler turns it into a safe 500
            for _, fut in entries:
                if not fut.done():
                    fut.set_exception(e)
            return
        i = 0
        for items, fut in entries:
            if not fut.done():
                fut.set_result(results[i:i + len(items)])
            i += len(items)


# ---------------------------------------------------------------------------------------------------------
# App


def served_model_name(predictor, settings: ServeSettings) -> str:
    if settings.served_name:
        return settings.served_name
    cfg = predictor.cfg
    return Path(cfg.adapter).name if cfg.adapter else Path(cfg.model or "model").name


def create_app(predictor, settings: ServeSettings | None = None, evidence_stats=None, decision=None):
    """The FastAPI app around a loaded ``Predictor`` (its backend is transformers or vllm). ``decision``: the
    rule turning class probabilities into /v1/predict's label (default: the model's own answer)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    settings = settings or ServeSettings()
    name = served_model_name(predictor, settings)
    lookup = evidence_stats is not None and adapter_lookup(predictor.cfg.adapter)
    api_key = os.environ.get(settings.api_key_env) or None
    backend = predictor.backend
    created = int(time.time())

    def run_batch(key, items):
        kind = key[0]
        if kind == "predict":
            _, n, explain = key
            return predictor.predict(items, n_samples=n, explain=explain)
        _, n, max_tokens, temperature, top_p, seed, logprobs = key
        queries = [backend.prepare(m) for m in items]
        extra = {} if logprobs is None else {"logprobs": logprobs}  # stand-in backends know no logprobs
        gens = backend.generate(queries, n=n, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, **extra)
        return [(q, g) for q, g in zip(queries, gens)]

    batcher = Batcher(run_batch, max_items=max(settings.max_batch, 1), window_s=settings.batch_window_ms / 1000)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="synthpert", version=_version(), lifespan=lifespan, debug=False,
                  docs_url=None, redoc_url=None, openapi_url=None)

    # add_middleware puts each one outside those added before it. BodyLimit must sit directly around the
    # routes: a BaseHTTPMiddleware between them would turn its exception into a 400.
    app.add_middleware(JsonBody)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Gate, max_bytes=settings.max_body_bytes, api_key=api_key)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type",
                                                                         "x-request-id"],
                           expose_headers=["x-request-id", "retry-after"], max_age=600)
    app.add_middleware(Envelope, max_in_flight=settings.max_in_flight, timeout_s=settings.request_timeout_s,
                       secret=api_key)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        """404, 405 and the like in the same error shape as every other error (OpenAI clients read it)."""
        if isinstance(exc, BodyTooLarge):
            return too_large(request.scope, settings.max_body_bytes)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return error_response(request.scope, exc.status_code, message, kind, code=str(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return error_response(request.scope, 422, "the request body is not valid JSON: send a JSON object "
                                  "(e.g. -H 'Content-Type: application/json' -d '{\"cell_line\": ...}')",
                                  code="json_invalid")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        text = f"field '{param}': {msg}" if param else msg
        if len(errs) > 1:
            text += f" (and {len(errs) - 1} more problem(s))"
        return error_response(request.scope, 422, text, param=param)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError):
        return error_response(request.scope, exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(SynthpertError)
    async def on_user_error(request: Request, exc: SynthpertError):
        return error_response(request.scope, 422, scrub(str(exc), api_key))

    # Any other exception reaches Envelope, which answers it (a handler for Exception would sit outside
    # Envelope, in Starlette's ServerErrorMiddleware, and its 500 would miss the headers and the request id).

    def check_n(n: int, param: str) -> None:
        if n > settings.max_n_samples:
            raise ApiError(422, f"field '{param}': at most {settings.max_n_samples} samples per request", param)

    def triple(item: PredictItem):
        ev = evidence_block(evidence_stats, item.cell_line, item.perturbation, item.gene, lookup)
        return Triple(Example.make_id(item.cell_line, item.perturbation, item.gene), item.cell_line,
                      item.perturbation, item.gene, None, ev)

    def answer(p, return_reasoning: bool) -> dict:
        return {**answer_record(p, decision, evidence_stats, return_reasoning), "model": name,
                "adapter": predictor.cfg.adapter}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "backend": backend.name}

    @app.post("/v1/predict")
    async def predict(req: PredictRequest):
        check_n(req.n_samples, "n_samples")
        [p] = await batcher.submit(("predict", req.n_samples, req.return_reasoning), [triple(req)])
        return answer(p, req.return_reasoning)

    @app.post("/v1/predict/batch")
    async def predict_batch(req: BatchRequest):
        check_n(req.n_samples, "n_samples")
        if len(req.items) > settings.max_batch:
            raise ApiError(422, f"field 'items': at most {settings.max_batch} items per batch request "
                                f"(got {len(req.items)})", "items")
        preds = await batcher.submit(("predict", req.n_samples, req.return_reasoning),
                                     [triple(i) for i in req.items])
        return {"predictions": [answer(p, req.return_reasoning) for p in preds], "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                             "owned_by": "synthpert"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: HTTPRequest):
        if req.model != name:
            raise ApiError(404, f"model '{req.model}' not found; this server serves '{name}'", "model",
                           kind="not_found_error")
        check_n(req.n, "n")
        if len(req.messages) > settings.max_messages:
            raise ApiError(422, f"field 'messages': at most {settings.max_messages} messages", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or predictor.cfg.max_new_tokens
        if max_tokens > settings.max_tokens:
            raise ApiError(422, f"field 'max_tokens': at most {settings.max_tokens}", "max_tokens")
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "field 'stream_options': only allowed with stream=true", "stream_options")
        if req.stream and req.n > 1:
            raise ApiError(400, "field 'n': stream=true serves one choice per request; send n=1 or stream=false",
                           "n")
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "field 'top_logprobs': needs logprobs=true", "top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        if logprobs is not None and not getattr(backend, "chat_logprobs", False):
            raise ApiError(400, f"field 'logprobs': the {backend.name} backend of this server does not return "
                                "per-token log-probabilities; send logprobs=false", "logprobs")
        temperature = predictor.cfg.temperature if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        seed = predictor.cfg.seed if req.seed is None else req.seed
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        cid, made = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            from starlette.responses import StreamingResponse

            usage = bool(req.stream_options and req.stream_options.include_usage)
            sampling = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            logprobs=logprobs)
            events = (_token_stream(backend, messages, sampling) if getattr(backend, "streams", False)
                      else _whole_stream(batcher, ("chat", 1, max_tokens, temperature, top_p, seed, logprobs),
                                         messages))
            return StreamingResponse(_sse(events, cid, made, name, usage, request.scope),
                                     media_type="text/event-stream")
        [(q, gens)] = await batcher.submit(("chat", req.n, max_tokens, temperature, top_p, seed, logprobs),
                                           [messages])
        completion = sum(g.completion_tokens for g in gens)
        prompt = len(q.prompt_ids or [])
        return {"id": cid, "object": "chat.completion", "created": made, "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": g.text},
                             "finish_reason": g.finish_reason or "stop",
                             "logprobs": None if logprobs is None else {"content": g.logprobs or [], "refusal": None}}
                            for i, g in enumerate(gens)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion}}

    return app


def _version() -> str:
    from .. import __version__

    return __version__


def serve(cfg: ServeConfig) -> None:
    """Load the model and run uvicorn until interrupted."""
    import uvicorn

    settings = cfg
    student = load_student(cfg)
    predictor = student.predictor
    app = create_app(predictor, settings, student.stats, student.decision)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding %s: the endpoint is reachable from other machines%s", settings.host,
                    "" if os.environ.get(settings.api_key_env) else f" and has NO API key (set {settings.api_key_env})")
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")
    finally:
        predictor.backend.close()
