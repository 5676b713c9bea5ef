"""An OpenAI-compatible server over one spectr engine.

Generations run in a bounded pool of worker threads (the engine API stays
synchronous: one replica, one engine; the weights are shared, each generation
has its own caches). At most `max_concurrency` run and `max_queue` wait; past
that a request gets 429 with Retry-After. A streaming client that disconnects
cancels its generation at the next decoding step, which frees its slot. A
generation that fails answers 500 (or, mid-stream, an error event) and frees its
slot too.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette.sse import EventSourceResponse

from spectr import api
from spectr.decoding import require_room
from spectr.errors import ContextOverflowError, SpectrError
from spectr.processing import SamplingParams
from spectr.server.metrics import ServerMetrics
from spectr.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_MAX_TOKENS = 16

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    max_concurrency: int = 2
    max_queue: int = 8
    api_key: str | None = None
    model_name: str | None = None  # the id clients must send; default: the target's file or folder name
    retry_after_seconds: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def internal_error_body(error: BaseException) -> dict:
    """A 500's body; it names the exception's type, as some exceptions have no message."""
    return error_body(f"internal error: {type(error).__name__}: {error}", "server_error")


class Slots:
    """Admission control: running + waiting generations never exceed the pool plus the queue."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.used >= self.capacity:
                return False
            self.used += 1
            return True

    def give_back(self) -> None:
        with self.lock:
            self.used -= 1


def create_app(load_engine: Callable[[], "api.Engine"], settings: ServerSettings = ServerSettings(),
               stream: Callable[..., Iterator["api.Chunk"]] = api.stream) -> FastAPI:
    """The app; `stream` generates (api.stream's signature), replaceable so tests can hold or break generations."""
    state: dict = {"engine": None, "error": None}
    metrics = ServerMetrics()
    pool = ThreadPoolExecutor(max_workers=settings.max_concurrency, thread_name_prefix="spectr-generate")
    slots = Slots(settings.max_concurrency + settings.max_queue)

    def load() -> None:
        try:
            engine = load_engine()
            if hasattr(engine, "cost_profile"):  # the default tree 'auto' reads it: measured (or read) before ready
                engine.cost_profile()
            state["engine"] = engine
        except Exception as error:  # reported by /health; the server stays up to say so
            state["error"] = error

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, name="spectr-load", daemon=True).start()
        yield
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="spectr", lifespan=lifespan)
    app.state.slots = slots
    app.state.metrics = metrics

    def model_id() -> str:
        engine = state["engine"]
        if settings.model_name:
            return settings.model_name
        source = engine.target.source
        name = source.gguf_file or source.folder.name
        return name.removesuffix(".gguf")

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError):
        metrics.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse(error_body(error.message, error.kind, error.param), error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, error: Exception):
        # an OpenAI-style body instead of Starlette's plain text; Starlette re-raises, so the traceback is still logged
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(internal_error_body(error), 500)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            metrics.requests.labels(request.url.path, "422").inc()
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error"), 422)
        first = problems[0]
        field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "body"
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(f"invalid '{field}': {first.get('msg')}", "invalid_request_error", field), 400)

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

    def prepare(body: SamplingFields, prompt) -> tuple[list[int], dict]:
        """Validate everything before a slot is taken: token ids and the options for spectr.stream."""
        engine = ready_engine()
        if body.model != model_id():
            raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{model_id()}'",
                           param="model", kind="not_found_error")
        if body.n != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        max_tokens = body.max_tokens or DEFAULT_MAX_TOKENS
        try:
            settings_ = api.decode_settings(body.method, body.rule, body.k, body.L, body.tree, body.budget,
                                            body.temperature)
            SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
            ids = api.encode_prompt(engine, prompt, chat=not isinstance(prompt, str))
            if not ids:
                raise ApiError(400, "the prompt is empty", param="prompt")
            context = engine.target.lm.config.context_length
            try:
                require_room(context, len(ids), max_tokens, settings_)
            except ContextOverflowError:
                raise ApiError(
                    400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: "
                    f"{len(ids) + max_tokens} exceed the model's context of {context} tokens "
                    f"(less a draft tree of {settings_.tree_size})", param="max_tokens",
                ) from None
        except SpectrError as error:
            raise ApiError(400, str(error)) from None
        options = dict(method=body.method, rule=body.rule, k=body.k, L=body.L, tree=body.tree, budget=body.budget,
                       temperature=body.temperature,
                       top_k=body.top_k, top_p=body.top_p, seed=body.seed, max_new_tokens=max_tokens,
                       stop=body.stops())
        return ids, options

    def usage(stats: api.GenerationStats) -> dict:
        return {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
            "spectr": {
                "block_efficiency": round(stats.block_efficiency, 4),
                "steps_by_shape": dict(stats.shapes),
                "target_passes": stats.steps,
                "accepted_per_position": stats.accepted_per_position,
            },
        }

    def record(stats: api.GenerationStats) -> None:
        metrics.tokens.inc(stats.new_tokens)
        for position, count in enumerate(stats.accepted_per_position):
            metrics.accepted.labels(str(position + 1)).inc(count)
        if stats.steps:
            metrics.block_efficiency.observe(stats.block_efficiency)

    def run(ids: list[int], options: dict, emit: Callable[[api.Chunk], None], cancelled: threading.Event) -> None:
        """In a worker thread: generate, hand each chunk to `emit`, stop early when cancelled."""
        started = time.perf_counter()
        last = None
        with closing(stream(state["engine"], ids, **options)) as chunks:  # a cancelled one frees its caches now
            for chunk in chunks:
                now = time.perf_counter()
                if last is None:
                    metrics.first_token.observe(now - started)
                elif chunk.tokens:
                    metrics.inter_token.observe((now - last) / len(chunk.tokens))
                last = now
                emit(chunk)
                if cancelled.is_set():
                    return

    async def generate(request: Request, body: SamplingFields, prompt, endpoint: str, shape: Callable):
        check_key(request)
        ids, options = prepare(body, prompt)
        if not slots.take():
            raise ApiError(429, "the server is at capacity; retry later", kind="rate_limit_error",
                           headers={"Retry-After": str(settings.retry_after_seconds)})
        metrics.in_flight.inc()
        loop = asyncio.get_running_loop()
        request_id = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        cancelled = threading.Event()

        def release(_future=None) -> None:
            slots.give_back()
            metrics.in_flight.dec()

        if not body.stream:
            chunks: list[api.Chunk] = []
            future = pool.submit(run, ids, options, chunks.append, cancelled)
            future.add_done_callback(release)
            try:
                await asyncio.wrap_future(future)
            except SpectrError as error:
                raise ApiError(400, str(error)) from None
            stats = chunks[-1].stats
            record(stats)
            metrics.requests.labels(request.url.path, "200").inc()
            text = "".join(chunk.text for chunk in chunks)
            return shape(request_id, created, text, chunks[-1].finish_reason, usage(stats), stream=False)

        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def emit(chunk: api.Chunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        def finish(future) -> None:
            release()
            loop.call_soon_threadsafe(queue.put_nowait, future.exception() or done)

        pool.submit(run, ids, options, emit, cancelled).add_done_callback(finish)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            stats = None
            try:
                if endpoint == "chat":
                    yield {"data": json.dumps(shape(request_id, created, None, None, None, stream=True))}
                while True:
                    item = await queue.get()
                    if item is done:
                        break
                    if isinstance(item, BaseException):
                        log.error("a streamed generation failed", exc_info=item)
                        metrics.requests.labels(request.url.path, "500").inc()
                        yield {"data": json.dumps(internal_error_body(item))}
                        return  # no usage and no [DONE]: the generation did not complete
                    stats = item.stats
                    if item.text or item.finished:
                        piece = shape(request_id, created, item.text, item.finish_reason, None, stream=True)
                        yield {"data": json.dumps(piece)}
                if stats is not None:
                    record(stats)
                    if include_usage:
                        tail = shape(request_id, created, None, None, usage(stats), stream=True)
                        tail["choices"] = []
                        yield {"data": json.dumps(tail)}
                metrics.requests.labels(request.url.path, "200").inc()
                yield {"data": "[DONE]"}
            finally:
                cancelled.set()  # a client gone mid-stream stops its generation at the next step

        return EventSourceResponse(events(), sep="\n")

    def completion_shape(request_id, created, text, finish_reason, usage_, stream):
        body = {
            "id": request_id, "object": "text_completion", "created": created, "model": model_id(),
            "choices": [{"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}],
        }
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def chat_shape(request_id, created, text, finish_reason, usage_, stream):
        if stream:
            delta = {"role": "assistant", "content": ""} if text is None and finish_reason is None else {"content": text}
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model_id(),
                    "choices": [choice]}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
            body = {"id": request_id, "object": "chat.completion", "created": created, "model": model_id(),
                    "choices": [choice]}
        if usage_ is not None:
            body["usage"] = usage_
        return body

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        return await generate(request, body, prompt, "completion", completion_shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        messages = [message.model_dump() for message in body.messages]
        return await generate(request, body, messages, "chat", chat_shape)

    return app
