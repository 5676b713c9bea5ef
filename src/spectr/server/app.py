"""An OpenAI-compatible server over one spectr engine: its settings and its routes.

The model loads in a thread after the server starts listening: /health answers at once, 503 ("loading")
until the engine is ready. Generations run in server/workers.py; errors are shaped in server/errors.py and
responses in server/responses.py.
"""

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from spectr import api
from spectr.decoding import require_room
from spectr.errors import ContextOverflowError, SpectrError
from spectr.server.errors import ApiError, install_error_handlers, internal_error_body
from spectr.server.metrics import ServerMetrics
from spectr.server.responses import (TokenStrings, chat_body, chat_logprobs, completion_body, completion_logprobs,
                                     usage)
from spectr.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from spectr.server.workers import Workers
from spectr.serving.scheduler import BatchedStreams
from spectr.settings import GenerationSettings

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    max_concurrency: int = 8  # generations running at once: with batching, the generations a target pass serves
    max_queue: int = 8
    batching: bool = True  # generations share target passes (serving/scheduler.py); False: each decodes alone
    api_key: str | None = None
    model_name: str | None = None  # the id clients must send; default: the target's file or folder name
    retry_after_seconds: int = 1
    # Bounds on what one request may ask for (400 beyond): a tree's drafts, depth and nodes, its choices
    max_k: int = 8
    max_L: int = 8
    max_budget: int = 64
    max_n: int = 8


def create_app(load_engine: Callable[[], "api.Engine"], settings: ServerSettings = ServerSettings(),
               stream: Callable[..., Iterator["api.Chunk"]] | None = None, preload: bool = False) -> FastAPI:
    """The app; `stream` generates (api.stream's signature; default: batched, serving/scheduler.py, or api.stream
    where settings.batching is off), replaceable so tests can hold or break generations.
    preload: load the engine here, before the app exists (a Ray Serve replica: the router must not send it
    requests until it can serve them); otherwise it loads after the server starts listening."""
    state: dict = {"engine": None, "error": None, "strings": None}
    metrics = ServerMetrics()
    batched = (BatchedStreams(settings.max_concurrency, on_pass=metrics.batch_size.observe)
               if stream is None and settings.batching else None)
    workers = Workers(settings.max_concurrency, settings.max_queue, metrics,
                      stream or batched or api.stream, parallel_choices=batched is not None)

    def load() -> None:
        try:
            engine = load_engine()
            if hasattr(engine, "cost_profile"):  # the default tree 'auto' reads it: measured (or read) before ready
                engine.cost_profile()
            state["strings"] = TokenStrings(engine.tokenizer)
            state["engine"] = engine
        except Exception as error:  # reported by /health; the server stays up to say so
            state["error"] = error

    if preload:
        load()
        if state["error"] is not None:
            raise state["error"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not preload:
            threading.Thread(target=load, name="spectr-load", daemon=True).start()
        yield
        workers.shutdown()
        if batched is not None:
            batched.close()

    app = FastAPI(title="spectr", lifespan=lifespan)
    app.state.slots = workers.slots
    app.state.metrics = metrics
    install_error_handlers(app, metrics)

    def model_id() -> str:
        engine = state["engine"]
        if settings.model_name:
            return settings.model_name
        source = engine.target.source
        name = source.gguf_file or source.folder.name
        return name.removesuffix(".gguf")

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer ...)", kind="authentication_error")

    def ready_engine() -> "api.Engine":
        if state["error"] is not None:  # no Retry-After: retrying will not load it
            raise ApiError(500, f"the model failed to load: {state['error']}", kind="server_error")
        if state["engine"] is None:
            raise ApiError(503, "the model is still loading", kind="server_error",
                           headers={"Retry-After": str(settings.retry_after_seconds)})
        return state["engine"]

    @app.get("/health")
    async def health():
        if state["error"] is not None:
            return JSONResponse({"status": "error", "message": str(state["error"])}, 500)
        if state["engine"] is None:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        ready_engine()
        return {"object": "list", "data": [{"id": model_id(), "object": "model", "created": 0, "owned_by": "spectr"}]}

    def check_limits(body: SamplingFields) -> None:
        for name, value, limit in (("k", body.k, settings.max_k), ("L", body.L, settings.max_L),
                                   ("budget", body.budget, settings.max_budget), ("n", body.n, settings.max_n)):
            if value is not None and value > limit:
                raise ApiError(400, f"{name} = {value} is over this server's limit of {limit}", param=name)

    def prepare(body: SamplingFields, prompt, max_tokens: int | None) -> tuple[list[int], GenerationSettings]:
        """Validate everything before a slot is taken: the token ids and the one GenerationSettings."""
        engine = ready_engine()
        if body.model != model_id():
            raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{model_id()}'",
                           param="model", kind="not_found_error")
        check_limits(body)
        vocab = engine.target.lm.config.vocab_size
        if body.logit_bias and (max(body.logit_bias) >= vocab or min(body.logit_bias) < 0):
            bad = next(t for t in body.logit_bias if not 0 <= t < vocab)
            raise ApiError(400, f"logit_bias names token {bad}; the vocabulary has {vocab} tokens", param="logit_bias")
        try:
            generation = GenerationSettings.build(
                method=body.method, rule=body.rule, k=body.k, L=body.L, tree=body.tree, budget=body.budget,
                temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty, logit_bias=body.logit_bias, seed=body.seed,
                max_new_tokens=max_tokens or DEFAULT_MAX_TOKENS, stop=body.stops(), logprobs=body.logprobs_count())
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                if not all(0 <= t < vocab for t in prompt):
                    raise ApiError(400, f"the prompt has token ids outside the vocabulary of {vocab}", param="prompt")
            ids = api.encode_prompt(engine, prompt, chat=not isinstance(prompt, str))
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            context = engine.target.lm.config.context_length
            try:
                require_room(context, len(ids), generation.max_new_tokens, generation.decode)
            except ContextOverflowError:
                raise ApiError(
                    400, f"the prompt has {len(ids)} tokens and max_tokens is {generation.max_new_tokens}: "
                    f"{len(ids) + generation.max_new_tokens} exceed the model's context of {context} tokens "
                    f"(less a draft tree of {generation.decode.tree_size})", param="max_tokens",
                ) from None
        except SpectrError as error:
            raise ApiError(400, str(error)) from None
        return ids, generation

    def record(stats) -> None:
        metrics.tokens.inc(stats.new_tokens)
        for position, count in enumerate(stats.accepted_per_position):
            metrics.accepted.labels(str(position + 1)).inc(count)
        if stats.steps:
            metrics.block_efficiency.observe(stats.block_efficiency)

    async def generate(request: Request, body: SamplingFields, prompt, max_tokens: int | None, endpoint: str):
        check_key(request)
        ids, generation = prepare(body, prompt, max_tokens)
        if body.user:
            log.info("request from user %s", body.user)
        if not workers.admit():
            raise ApiError(429, "the server is at capacity; retry later", kind="rate_limit_error",
                           headers={"Retry-After": str(settings.retry_after_seconds)})
        loop = asyncio.get_running_loop()
        chat = endpoint == "chat"
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        cancelled = threading.Event()
        strings = state["strings"]
        shape = chat_body if chat else completion_body
        offsets = [0] * body.n  # characters of token text each choice has streamed (completions' text_offset)
        befores = [[] for _ in range(body.n)]  # each choice's tokens so far (its text is decoded alone, as here)

        def logprobs(index: int, entries):
            if entries is None:
                return None
            if chat:
                return chat_logprobs(entries, strings, befores[index])
            shaped = completion_logprobs(entries, strings, befores[index], offsets[index])
            offsets[index] += sum(len(token) for token in shaped["tokens"])
            return shaped

        def finished_stats(chunks: list[tuple[int, api.Chunk]]) -> list:
            last = {}
            for index, chunk in chunks:
                last[index] = chunk.stats
            return [last[index] for index in sorted(last)]

        if not body.stream:
            chunks: list[tuple[int, api.Chunk]] = []
            future = workers.submit(state["engine"], ids, generation, body.n,
                                    lambda index, chunk: chunks.append((index, chunk)), cancelled)
            try:
                await asyncio.wrap_future(future)
            except SpectrError as error:
                raise ApiError(400, str(error)) from None
            except Exception as error:  # answered here, not re-raised: the connection stays usable
                log.error("a generation failed", exc_info=error)
                raise ApiError(500, internal_error_body(error)["error"]["message"], kind="server_error") from None
            choices = []
            for index in range(body.n):
                mine = [chunk for i, chunk in chunks if i == index]
                text = "".join(chunk.text for chunk in mine)
                entries = [e for chunk in mine for e in (chunk.step.logprobs or [])]
                choices.append({"index": index, "text": text, "finish_reason": mine[-1].finish_reason,
                                "logprobs": logprobs(index, entries if generation.logprobs is not None else None)})
            stats = finished_stats(chunks)
            for s in stats:
                record(s)
            metrics.requests.labels(request.url.path, "200").inc()
            return shape(request_id, created, model_id(), choices, usage(stats), stream=False)

        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(index: int, chunk: api.Chunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (index, chunk))

        def finish(future) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, future.exception() or done)

        workers.submit(state["engine"], ids, generation, body.n, emit, cancelled).add_done_callback(finish)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            seen: list[tuple[int, api.Chunk]] = []
            try:
                if chat:
                    opening = [{"index": i, "text": None, "finish_reason": None, "logprobs": None}
                               for i in range(body.n)]
                    yield {"data": json.dumps(shape(request_id, created, model_id(), opening, None, stream=True))}
                while True:
                    item = await queue.get()
                    if item is done:
                        break
                    if isinstance(item, BaseException):
                        log.error("a streamed generation failed", exc_info=item)
                        metrics.requests.labels(request.url.path, "500").inc()
                        yield {"data": json.dumps(internal_error_body(item))}
                        return  # no usage and no [DONE]: the generation did not complete
                    index, chunk = item
                    seen.append(item)
                    if chunk.text or chunk.finished or chunk.step.logprobs:
                        piece = {"index": index, "text": chunk.text, "finish_reason": chunk.finish_reason,
                                 "logprobs": logprobs(index, chunk.step.logprobs)}
                        yield {"data": json.dumps(shape(request_id, created, model_id(), [piece], None, stream=True))}
                stats = finished_stats(seen)
                for s in stats:
                    record(s)
                if include_usage and stats:
                    tail = shape(request_id, created, model_id(), [], usage(stats), stream=True)
                    yield {"data": json.dumps(tail)}
                metrics.requests.labels(request.url.path, "200").inc()
                yield {"data": "[DONE]"}
            finally:
                cancelled.set()  # a client gone mid-stream stops its generation at the next step

        return EventSourceResponse(events(), sep="\n")

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):  # a list of prompts
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported (use n for several choices)",
                               param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return await generate(request, body, prompt, body.max_tokens, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await generate(request, body, body.chat_messages(), body.max_tokens or body.max_completion_tokens,
                              "chat")

    return app
