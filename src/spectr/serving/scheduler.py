"""Continuous batching: many generations' steps share each target pass.

One thread runs the engine. Generations join between steps -- their prompts run a chunk at a time
(PREFILL_CHUNK tokens) between the others' steps, so a long prompt does not stall them -- and leave when
they finish or their consumer goes away. Every step each running generation drafts its own tree with its
own drafter, sampling parameters and random generator; one batched target pass
(LlamaForward.forward_batch) then verifies every tree, and each generation completes its step
(decoding.Generation). The pass gives each sequence the same bits as a pass of its own, so a generation's
law -- and, seeded, its very tokens -- are those it would have alone.

Under load speculation adapts: a generation of tree 'auto' chooses each step's path by the batch's rate,
not its own (planner.py), given what the rest of its pass brought over the last steps -- sequences, rows,
tokens emitted per step, seconds of their own outside the pass (measured here). Rows cost the same whoever brings
them, so once the batch keeps the machine busy drafting stops paying and the steps turn plain. Seeded
generations are left to choose as they would alone, so that they still give the very tokens they would
alone; fixed shapes (k, L asked for) are kept as asked.

A generation that fails (bad input, a context overflow) gets its error; the others go on.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
import logging
import queue
import threading
import time

from spectr import api
from spectr.decoding import Generation, TargetPass
from spectr.errors import InvalidInputError
from spectr.planner import BatchLoad
from spectr.settings import GenerationSettings

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 8  # generations a pass serves (the server's max_concurrency sets it there)
LOAD_HORIZON = 4.0  # steps a generation's measured load (tokens per step) remembers, as an exponential average


@dataclass
class _Request:
    ids: list[int]
    settings: GenerationSettings
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # Chunks, then an error or nothing
    cancelled: threading.Event = field(default_factory=threading.Event)
    decoder: object = None
    generation: Generation | None = None
    chunks: api.Chunks | None = None
    prefill: Iterator[int] | None = None
    done: bool = False
    # What it brought to its last passes (BatchLoad's terms): rows, tokens emitted a step, own seconds a step
    rows: int = 1
    tokens: float = 1.0
    seconds: float = 0.0

    @property
    def adapts(self) -> bool:
        """Whether its steps choose by the batch's load: tree 'auto', and no seed to reproduce."""
        return self.decoder.planner is not None and self.settings.seed is None


class Scheduler:
    """Runs every generation of one engine in batched steps (see the module's doc); `stream` is api.stream's
    counterpart for token ids, and may be called from any thread."""

    def __init__(self, engine: "api.Engine", max_batch: int = DEFAULT_MAX_BATCH, on_pass=None):
        """on_pass(sequences): told after every target pass how many generations it served (metrics)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise InvalidInputError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.engine = engine
        self.max_batch = max_batch
        self.target = engine.target_forward()
        self._batched = getattr(self.target, "forward_batch", None)  # else each sequence's pass on its own
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.passes = 0  # batched target passes run, and the sequences they carried (for stats and tests)
        self.sequences = 0
        self.on_pass = on_pass

    def stream(self, ids: list[int], settings: GenerationSettings) -> Iterator["api.Chunk"]:
        """The chunks of one generation of prompt `ids`, as api.stream yields them. Closing the iterator
        early (a client gone) ends the generation at its next step and frees its place."""
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        request = _Request(list(ids), settings)
        self._start()
        self._incoming.put(request)
        try:
            while True:
                item = request.outbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            request.cancelled.set()

    def close(self) -> None:
        """Stop the loop (generations still running get no more chunks)."""
        self._closed = True
        self._incoming.put(None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="spectr-scheduler", daemon=True)
                self._thread.start()

    # -- the loop (its thread alone touches the generations) --------------------------------------------

    def _loop(self) -> None:
        active: list[_Request] = []
        while True:
            while len(active) < self.max_batch:  # join, between steps (block only when idle)
                try:
                    request = self._incoming.get(block=not active)
                except queue.Empty:
                    break
                if request is None:
                    return
                if self._begin(request):
                    active.append(request)
            active = [r for r in active if not (r.done or r.cancelled.is_set())]
            joining = next((r for r in active if not r.generation.prefilled), None)
            if joining is not None:  # one prompt chunk between steps
                self._guard(joining, lambda: next(joining.prefill, None))
            running = [r for r in active if not r.done and r.generation.prefilled]
            if running:
                self._step(running)
            active = [r for r in active if not (r.done or r.cancelled.is_set())]

    def _begin(self, request: _Request) -> bool:
        def begin():
            decoder, generator = api.make_decoder(self.engine, request.settings)
            request.decoder = decoder
            request.chunks = api.Chunks(self.engine, request.settings, len(request.ids))
            request.generation = decoder.start(request.ids, request.settings.max_new_tokens, generator,
                                               request.chunks.stop_ids)
            request.prefill = request.generation.prefill()

        return self._guard(request, begin)

    def _guard(self, request: _Request, work) -> bool:
        """Run one request's work; an error ends that request alone (its consumer raises it)."""
        try:
            work()
            return True
        except Exception as error:  # noqa: BLE001 -- handed to the request's consumer
            request.done = True
            request.outbox.put(error)
            return False

    def _step(self, running: list[_Request]) -> None:
        groups: dict[tuple, list] = {}  # by the layers their drafts read (one pass captures one set)
        for request in running:
            groups.setdefault(tuple(request.decoder._capture), []).append(request)
        for capture, requests in groups.items():
            self._step_group(capture, requests)

    def _step_group(self, capture: tuple, requests: list[_Request]) -> None:
        rows, tokens, seconds = (sum(getattr(r, name) for r in requests) for name in ("rows", "tokens", "seconds"))
        group: list[tuple[_Request, TargetPass]] = []
        for request in requests:
            holder = []
            load = (BatchLoad(rows - request.rows, tokens - request.tokens, seconds - request.seconds,
                              len(requests) - 1) if request.adapts and len(requests) > 1 else None)
            started = time.perf_counter()
            if self._guard(request, lambda: holder.append(request.generation.prepare(load))):
                request.seconds = time.perf_counter() - started
                request.rows = holder[0].tokens.shape[0]
                group.append((request, holder[0]))
        if not group:
            return
        started = time.perf_counter()
        outs = self._verify(capture, group)
        verify_seconds = time.perf_counter() - started
        self.passes += 1
        self.sequences += len(group)
        if self.on_pass is not None:
            self.on_pass(len(group))
        for (request, _), out in zip(group, outs):
            if out is None:
                continue  # its error is with its consumer

            def complete(request=request, out=out):
                started = time.perf_counter()
                step = request.generation.complete(out, verify_seconds)
                chunk = request.chunks.add(step, request.decoder.prefill_seconds)
                request.outbox.put(chunk)
                request.done = chunk.finished
                request.seconds += time.perf_counter() - started
                request.tokens += (len(step.emitted) - request.tokens) / LOAD_HORIZON

            self._guard(request, complete)

    def _verify(self, capture: tuple, group: list) -> list:
        """The target's outputs over every pass of the group: in one batched pass where the forward has one;
        where that fails (one sequence's bad input), each alone, so only the bad one fails."""
        from spectr.models.llama import BatchItem

        if self._batched is not None:
            items = [BatchItem(p.tokens, p.positions, r.generation.cache, p.attention_mask, p.logit_indices)
                     for r, p in group]
            try:
                return self._batched(items, capture)
            except Exception:  # noqa: BLE001 -- nothing was written: find the one at fault below
                log.debug("a batched pass failed; running its sequences one by one", exc_info=True)
        outs = []
        kwargs = {"capture": capture} if capture else {}
        for request, target_pass in group:
            holder = []
            self._guard(request, lambda: holder.append(self.target.forward(
                target_pass.tokens[None], target_pass.positions, request.generation.cache,
                **target_pass.options(kwargs))))
            outs.append(holder[0] if holder else None)
        return outs


class BatchedStreams:
    """api.stream's signature over token ids for a server: every engine's generations go through one
    Scheduler of that engine (made on first use)."""

    def __init__(self, max_batch: int = DEFAULT_MAX_BATCH, on_pass=None):
        self.max_batch, self.on_pass = max_batch, on_pass
        self.scheduler: Scheduler | None = None
        self._lock = threading.Lock()

    def __call__(self, engine: "api.Engine", ids: list[int], settings: GenerationSettings) -> Iterator["api.Chunk"]:
        with self._lock:
            if self.scheduler is None or self.scheduler.engine is not engine:
                if self.scheduler is not None:
                    self.scheduler.close()
                self.scheduler = Scheduler(engine, self.max_batch, self.on_pass)
            scheduler = self.scheduler
        return scheduler.stream(ids, settings)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()
