"""The HTTP side: a FastAPI app with OpenAI's routes over `Engine`s (generation) and `Embedder`s, and `serve`
to run it with uvicorn.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions, POST
/v1/chat/completions (both with `stream: true` as server-sent events ending in `data: [DONE]`), POST
/v1/embeddings (mean pooling over the attention mask, unit length). Every error is OpenAI's JSON shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve import protocol as api
from lmforge.serve.engine import Engine, Event, QueueFull, SamplingParams, ShuttingDown
from lmforge.serve.engine import Request as EngineRequest
from lmforge.serve.metrics import Metrics
from lmforge.tokenizer import Tokenizer

__all__ = ["Embedder", "create_app", "mean_pool", "serve"]

ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, C) over the positions where mask (B, T) is 1: (B, C)."""
    m = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class Embedder:
    """Sentence embeddings of an encoder model: mean pooling over the attention mask, then unit length."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, int]:
        """(len(texts), C) unit vectors and the number of tokens read. Raises APIError for an empty or too
        long input."""
        limit = self.model.config.max_seq_len
        for i, text in enumerate(texts):
            if not text:
                raise api.APIError(400, f"input {i} is empty", param="input")
        batch = self.tokenizer.encode_batch(texts, padding_side="right")
        ids, mask = batch.input_ids, batch.attention_mask
        if ids.shape[1] > limit:
            raise api.APIError(400, f"an input has {ids.shape[1]} tokens, more than the model's {limit}",
                               param="input", code="context_length_exceeded")
        with self._lock, torch.inference_mode():
            hidden = self.model(ids, attention_mask=mask).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden.float(), mask), dim=-1)
        return pooled, int(mask.sum())


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


class _Run:
    """The engine requests of one HTTP request (one per prompt, n sequences each) and their event queue."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: list[SamplingParams], n: int):
        self.engine, self.n = engine, n
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def sink(p: int):
            return lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, (p * n + e.index, e))

        self.requests = [EngineRequest(ids, par, sink(p), n) for p, (ids, par) in enumerate(zip(prompts, params,
                                                                                                 strict=True))]
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.open = len(prompts) * n  # sequences not finished

    def submit(self) -> None:
        try:
            for r in self.requests:
                self.engine.submit(r)
        except QueueFull as err:
            self.cancel()
            raise api.APIError(429, f"the server is busy: {err}; retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": "1"}) from err
        except ShuttingDown as err:
            self.cancel()
            raise api.APIError(503, str(err), type="server_error", code="shutting_down") from err

    def cancel(self) -> None:
        for r in self.requests:
            self.engine.cancel(r)

    async def events(self, client: Request) -> AsyncIterator[tuple[int, Event]]:
        """Events until every sequence ended; cancels the run when the client has gone."""
        while self.open:
            try:
                index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await client.is_disconnected():
                    self.cancel()
                    return
                continue
            if event.error:
                self.cancel()
                raise api.APIError(503 if event.error_code == "shutting_down" else 500, event.error,
                                   type="server_error", code=event.error_code)
            if event.finish_reason:
                self.open -= 1
            yield index, event


def create_app(engines: dict[str, Engine], embedders: dict[str, Embedder] | None = None,
               api_key: str | None = None, shutdown_timeout: float = 10.0) -> FastAPI:
    """The app serving `engines` (decoder models by name) and `embedders` (encoder models by name).

    api_key: when given, /v1 routes need `Authorization: Bearer <api_key>` (else 401). On shutdown the engines
    stop taking requests and end the running ones within `shutdown_timeout` seconds.
    """
    embedders = embedders or {}
    metrics = next(iter(engines.values())).metrics if engines else Metrics()
    metrics.describe("lmforge_requests_total", "counter", "HTTP requests by route and status")
    metrics.describe("lmforge_request_seconds", "histogram", "HTTP request latency, arrival to last byte")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for engine in engines.values():
            engine.start()
        yield
        await asyncio.gather(*(asyncio.to_thread(e.shutdown, shutdown_timeout) for e in engines.values()))

    app = FastAPI(title="lmforge", lifespan=lifespan)

    def error(err: api.APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(api.APIError)
    async def _api_error(request: Request, err: api.APIError):
        return error(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        if first.get("type") == "json_invalid":
            return error(api.APIError(400, f"the request body is not valid JSON ({first.get('msg')})"))
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return error(api.APIError(400, f"{param or 'body'}: {first.get('msg')}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error(api.APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        return error(api.APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error"))

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        start = time.perf_counter()
        if api_key is not None and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {api_key}":
            response = error(api.APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                          code="invalid_api_key"))
        else:
            response = await call_next(request)
        route = request.url.path if request.url.path in ROUTES else "other"  # bounded label values
        metrics.inc("lmforge_requests_total", route=route, status=str(response.status_code))
        metrics.observe("lmforge_request_seconds", time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def _metrics():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        names = list(engines) + list(embedders)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "lmforge"}
                                           for m in names]}

    def engine_for(name: str) -> Engine:
        if name in engines:
            return engines[name]
        if name in embedders:
            raise api.APIError(400, f"model {name!r} is an encoder: it serves /v1/embeddings only", param="model")
        raise api.APIError(404, f"the model {name!r} does not exist; this server has {sorted(engines)}",
                           type="not_found_error", param="model", code="model_not_found")

    def prompt_ids(engine: Engine, prompt: Any) -> list[list[int]]:
        vocab = engine.model.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise api.APIError(400, "prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = engine.tokenizer.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise api.APIError(400, "a prompt encodes to no tokens", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise api.APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def sampling(engine: Engine, body: api._Sampling, prompts: list[list[int]], max_tokens: int | None,
                 logprobs: int | None, prompt_param: str) -> list[SamplingParams]:
        body.unsupported()
        if body.n > engine.max_batch:
            raise api.APIError(400, f"n ({body.n}) exceeds this server's batch of {engine.max_batch}", param="n")
        if max_tokens is not None and max_tokens <= 0:
            raise api.APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        params = []
        for ids in prompts:
            room = engine.context - len(ids)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                raise api.APIError(400, f"this model's context is {engine.context} tokens; the prompt has "
                                        f"{len(ids)} and max_tokens asks for {max_tokens or 1} more",
                                   param=prompt_param, code="context_length_exceeded")
            params.append(body.params(max_tokens or room, logprobs))
        return params

    async def run(request: Request, engine: Engine, body: api._Sampling, prompts: list[list[int]],
                  params: list[SamplingParams], chat: bool, logprobs: bool):
        job = _Run(engine, prompts, params, body.n)
        job.submit()
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        if not body.stream:
            per_choice: dict[int, list[Event]] = {i: [] for i in range(len(prompts) * body.n)}
            try:
                async for index, event in job.events(request):
                    per_choice[index].append(event)
            finally:
                if job.open:  # the client went away, or an error ended the wait
                    job.cancel()
            choices = [api.completion_choice(i, ev, chat, logprobs) for i, ev in per_choice.items()]
            generated = sum(len(e.token_ids) for ev in per_choice.values() for e in ev)
            return api.response(rid, body.model, choices, chat, job.prompt_tokens, generated)

        async def sse() -> AsyncIterator[bytes]:
            generated, started, stamp = 0, set(), int(time.time())
            try:
                async for index, event in job.events(request):
                    generated += len(event.token_ids)
                    if event.text or event.finish_reason or event.logprobs or (chat and index not in started):
                        choice = api.chunk_choice(index, event, chat, logprobs, index not in started)
                        started.add(index)
                        yield _sse(api.chunk(rid, body.model, stamp, chat, [choice]))
                yield _sse(api.chunk(rid, body.model, stamp, chat, [], api.usage(job.prompt_tokens, generated)))
                yield b"data: [DONE]\n\n"
            except api.APIError as err:
                yield _sse(err.body())
            finally:
                if job.open:
                    job.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request, body: api.CompletionRequest):
        engine = engine_for(body.model)
        prompts = prompt_ids(engine, body.prompt)
        params = sampling(engine, body, prompts, body.max_tokens, body.logprobs, "prompt")
        return await run(request, engine, body, prompts, params, chat=False, logprobs=body.logprobs is not None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: api.ChatRequest):
        engine = engine_for(body.model)
        messages = [m.model_dump() for m in body.messages]
        try:
            ids = engine.tokenizer.encode_chat(messages)
        except ValueError as err:
            raise api.APIError(400, str(err), param="messages") from err
        k = (body.top_logprobs or 0) if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise api.APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling(engine, body, [ids], max_tokens, k, "messages")
        return await run(request, engine, body, [ids], params, chat=True, logprobs=body.logprobs)

    @app.post("/v1/embeddings")
    async def embeddings(body: api.EmbeddingRequest):
        if body.model not in embedders:
            if body.model in engines:
                raise api.APIError(400, f"model {body.model!r} is a decoder; embeddings need an encoder model",
                                   param="model")
            raise api.APIError(404, f"the model {body.model!r} does not exist; this server embeds with "
                                    f"{sorted(embedders)}", type="not_found_error", param="model",
                               code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise api.APIError(400, "input is empty", param="input")
        vectors, tokens = await asyncio.to_thread(embedders[body.model].embed, texts)
        if body.encoding_format == "base64":
            data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
        else:
            data = vectors.tolist()
        return {"object": "list", "model": body.model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(data)]}

    return app


def serve(models: list[str], host: str = "127.0.0.1", port: int = 8000, dtype: str | None = None,
          api_key: str | None = None, max_batch: int = 16, max_queue: int = 64, context: int | None = None,
          shutdown_timeout: float = 10.0, quantize: str | None = None, log_level: str = "info") -> None:
    """Load `models` (names, folders or .gguf files: decoders generate, encoders embed) and serve them until
    SIGINT/SIGTERM; then finish or cancel the requests in flight within `shutdown_timeout` seconds."""
    import uvicorn

    from lmforge.io import load_config, load_model

    for name in models:  # before loading any
        if load_config(name).arch == "encoder-decoder":
            raise ValueError(f"--model {name} is an encoder-decoder (T5): the server decodes with decoder-only "
                             "models and embeds with encoders; use lmforge generate for T5")
    metrics = Metrics()
    engines, embedders = {}, {}
    for name in models:
        model = load_model(name, dtype=dtype, quantize=quantize) if dtype else load_model(name, quantize=quantize)
        tokenizer = Tokenizer.for_model(name)
        if model.config.arch == "decoder":
            engines[name] = Engine(model, tokenizer, max_batch, max_queue, context, metrics)
        else:
            embedders[name] = Embedder(model, tokenizer)
    app = create_app(engines, embedders, api_key, shutdown_timeout=1.0)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    uvicorn.Server(config).run()
