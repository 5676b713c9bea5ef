"""Where generations run: a bounded pool of worker threads behind admission control.

The engine API stays synchronous (one replica, one engine; the weights are shared, each generation has its
own caches). At most `max_concurrency` generations run and `max_queue` wait; past that `Workers.admit`
refuses, and the route answers 429. With batched streams (serving/scheduler.py, the default) generations
share the target's passes, and a request's choices (n > 1) run together; else they run one after another in
its worker. A
streaming client that disconnects sets `cancelled`, which stops the generation at its next decoding step and
frees its slot; so does a generation that fails.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import replace
import threading
import time
from collections.abc import Callable, Iterator

from spectr import api
from spectr.server.metrics import ServerMetrics
from spectr.settings import GenerationSettings


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


def choice_settings(settings: GenerationSettings, index: int) -> GenerationSettings:
    """Choice `index` of a request with n > 1: its own draws (seed + index when seeded, so it repeats)."""
    return settings if index == 0 or settings.seed is None else replace(settings, seed=settings.seed + index)


class Workers:
    def __init__(self, max_concurrency: int, max_queue: int, metrics: ServerMetrics,
                 stream: Callable[..., Iterator[api.Chunk]], parallel_choices: bool = False):
        """parallel_choices: run a request's choices at once (where `stream` batches generations)."""
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="spectr-generate")
        self.slots = Slots(max_concurrency + max_queue)
        self.metrics = metrics
        self.stream = stream  # api.stream's signature; tests replace it to hold or break generations
        self.parallel_choices = parallel_choices

    def admit(self) -> bool:
        if not self.slots.take():
            return False
        self.metrics.in_flight.inc()
        return True

    def _release(self, _future=None) -> None:
        self.slots.give_back()
        self.metrics.in_flight.dec()

    def submit(self, engine, ids: list[int], settings: GenerationSettings, choices: int,
               emit: Callable[[int, api.Chunk], None], cancelled: threading.Event) -> Future:
        """Run an admitted generation: each choice's chunks go to emit(index, chunk) as they come. The slot
        is given back when it ends, however it ends."""
        future = self.pool.submit(self._run, engine, ids, settings, choices, emit, cancelled)
        future.add_done_callback(self._release)
        return future

    def _run(self, engine, ids, settings, choices, emit, cancelled) -> None:
        if choices == 1 or not self.parallel_choices:
            for index in range(choices):
                self._relay(engine, ids, settings, index, emit, cancelled)
            return
        # Batched streams: a request's choices decode together, sharing the passes (n > 1 through batching).
        errors: list[BaseException] = []

        def relay(index: int) -> None:
            try:
                self._relay(engine, ids, settings, index, emit, cancelled)
            except BaseException as error:  # noqa: BLE001 -- raised by the request's own worker below
                errors.append(error)
                cancelled.set()  # the request fails: its other choices stop too

        others = [threading.Thread(target=relay, args=(index,), name="spectr-choice", daemon=True)
                  for index in range(1, choices)]
        for thread in others:
            thread.start()
        relay(0)
        for thread in others:
            thread.join()
        if errors:
            raise errors[0]

    def _relay(self, engine, ids, settings, index, emit, cancelled) -> None:
        """One choice's chunks, from its stream to emit(index, chunk), until it ends or the request is cancelled."""
        started = time.perf_counter()
        last = None
        with closing(self.stream(engine, ids, choice_settings(settings, index))) as chunks:
            for chunk in chunks:  # closing: a cancelled generation frees its caches now
                now = time.perf_counter()
                if last is None:
                    self.metrics.first_token.observe(now - started)
                elif chunk.tokens:
                    self.metrics.inter_token.observe((now - last) / len(chunk.tokens))
                last = now
                emit(index, chunk)
                if cancelled.is_set():
                    return

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
