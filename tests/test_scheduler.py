"""Continuous batching (serving/scheduler.py): generations share target passes and stream what they would alone."""

import threading
import time

import pytest

import spectr
from spectr import api
from spectr.errors import ContextOverflowError
from spectr.models import kernels
from spectr.models.loading import stop_token_ids
from spectr.planner import BATCH_ROWS, CostProfile
from spectr.serving.scheduler import BatchedStreams, Scheduler
from spectr.settings import GenerationSettings
from tests.models.test_loading import save_tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="spectr's kernels are not built here")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-batch"))


@pytest.fixture(scope="module", params=[pytest.param("int4", marks=needs_kernels), "fp32"])
def engine(tiny_folder, request):
    """A target with a draft model (itself, another precision): on the kernel (int4) passes are batched; in
    fp32 they run one after another -- the same tokens either way."""
    return spectr.load(tiny_folder, draft=tiny_folder, precision=request.param)


def _ids(engine, text: str) -> list[int]:
    return api.encode_prompt(engine, text, chat=False)


# Every kind of step in one batch: plain, one draft, K-SEQ, auto, a dynamic tree; other temperatures,
# top-k, penalties, logprobs, stop strings.
SETTINGS = [
    dict(method="ar", temperature=1.0, seed=1, max_new_tokens=12),
    dict(method="sd", L=3, temperature=1.0, seed=2, max_new_tokens=14),
    dict(method="spectr", k=2, L=2, temperature=0.7, top_k=20, seed=3, max_new_tokens=16, logprobs=2),
    dict(temperature=0.0, seed=4, max_new_tokens=10),  # tree 'auto'
    dict(method="spectr", budget=5, k=2, L=3, temperature=1.0, presence_penalty=0.5, seed=5, max_new_tokens=11),
    dict(method="spectr", k=3, L=1, temperature=1.2, seed=6, max_new_tokens=9, stop=["w9"]),
]
PROMPTS = ["w3 w5 w7 w3 w5", "w1 w2", "w4 w4 w4 w4 w4 w4 w4", "w9", "w2 w8 w2 w8 w2 w8 w2 w8 w2 w8", "w6 w7"]


def _alone(engine, ids, settings):
    chunks = list(api.stream(engine, ids, settings))
    return [t for c in chunks for t in c.tokens], "".join(c.text for c in chunks), chunks[-1].finish_reason


def _collect(stream):
    chunks = list(stream)
    return [t for c in chunks for t in c.tokens], "".join(c.text for c in chunks), chunks[-1].finish_reason


def test_batched_generations_stream_what_they_would_alone(engine):
    """Seeded generations of every kind, concurrent in one scheduler, give token for token (and text, and
    finish reason) what each gives alone: batching changes no generation's law. And they did share passes."""
    cases = [(_ids(engine, prompt), GenerationSettings.build(**options)) for prompt, options in zip(PROMPTS, SETTINGS)]
    expected = [_alone(engine, ids, settings) for ids, settings in cases]
    scheduler = Scheduler(engine, max_batch=4)  # fewer places than generations: some wait, then join
    results = [None] * len(cases)
    go = threading.Barrier(len(cases))

    def run(index):
        go.wait()
        results[index] = _collect(scheduler.stream(*cases[index]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    scheduler.close()
    assert results == expected
    assert scheduler.sequences > scheduler.passes  # passes carried several generations


def test_a_failing_generation_fails_alone_and_a_cancelled_one_leaves(engine):
    scheduler = Scheduler(engine, max_batch=3)
    good = (_ids(engine, PROMPTS[0]), GenerationSettings.build(**SETTINGS[2]))
    too_long = (_ids(engine, "w1 " * 250), GenerationSettings.build(max_new_tokens=20, seed=0))
    results, errors = {}, {}

    def run(name, case, cut=None):
        try:
            stream = scheduler.stream(*case)
            if cut is None:
                results[name] = _collect(stream)
            else:
                results[name] = [next(stream) for _ in range(cut)]
                stream.close()  # the client goes away
        except Exception as error:  # noqa: BLE001
            errors[name] = error

    long_run = (_ids(engine, PROMPTS[1]), GenerationSettings.build(method="ar", max_new_tokens=200, seed=9))
    threads = [threading.Thread(target=run, args=args) for args in
               [("good", good), ("too_long", too_long), ("gone", long_run, 2)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert isinstance(errors.pop("too_long"), ContextOverflowError) and not errors
    assert results["good"] == _alone(engine, *good)
    assert len(results["gone"]) == 2
    # The scheduler still serves after all that, and the cancelled generation no longer runs.
    assert _collect(scheduler.stream(*good)) == _alone(engine, *good)
    scheduler.close()


def test_a_long_prompt_is_run_in_chunks_between_the_others_steps(engine, monkeypatch):
    """A joining prompt runs PREFILL_CHUNK tokens at a time with the running generations' steps between."""
    from spectr import decoding
    from spectr.models import llama

    monkeypatch.setattr(llama, "PREFILL_CHUNK", 8)
    events = []
    prefill, complete = decoding.Generation.prefill, decoding.Generation.complete

    def logged_prefill(self):
        for done in prefill(self):
            events.append(("chunk", len(self.text)))
            yield done

    def logged_complete(self, *args):
        events.append(("step", len(self.text)))
        return complete(self, *args)

    monkeypatch.setattr(decoding.Generation, "prefill", logged_prefill)
    monkeypatch.setattr(decoding.Generation, "complete", logged_complete)
    scheduler = Scheduler(engine, max_batch=2)
    running = scheduler.stream(_ids(engine, "w1 w2"), GenerationSettings.build(method="ar", max_new_tokens=60, seed=1))
    first = next(running)  # decoding now
    long_ids = _ids(engine, "w3 w4 " * 30)
    assert len(long_ids) > 40
    long_tokens, _, _ = _collect(scheduler.stream(long_ids, GenerationSettings.build(method="ar", max_new_tokens=3,
                                                                                      seed=2)))
    rest = list(running)
    scheduler.close()
    chunks = [i for i, (kind, length) in enumerate(events) if kind == "chunk" and length == len(long_ids)]
    assert len(chunks) == -(-(len(long_ids) - 1) // 8)
    between = [kind for kind, length in events[chunks[0] : chunks[-1]] if kind == "step" and length != len(long_ids)]
    assert len(between) >= len(chunks) - 1  # a step of the other generation between consecutive chunks
    assert len(long_tokens) == 3 and first.tokens and rest[-1].finished


def test_batched_streams_make_one_scheduler_per_engine(engine):
    streams = BatchedStreams(max_batch=2)
    ids, settings = _ids(engine, PROMPTS[0]), GenerationSettings.build(**SETTINGS[0])
    assert _collect(streams(engine, ids, settings)) == _alone(engine, ids, settings)
    first = streams.scheduler
    _collect(streams(engine, ids, settings))
    assert streams.scheduler is first
    streams.close()


def test_under_load_unseeded_generations_turn_plain_and_seeded_ones_choose_as_alone(engine, monkeypatch):
    """Tree 'auto' on a machine where a pass's rows cost what steps cost (measured so on this host): alone a
    generation drafts long paths; beside others, unseeded ones draft little (plain steps give the batch
    more), while a seeded one chooses as alone and so gives the very tokens it gives alone."""
    rows_as_dear_as_steps = CostProfile(target_seconds=tuple(0.010 + 0.0005 * n for n in range(7)),
                                        draft_seconds=tuple(0.001 * (n + 1) for n in range(6)),
                                        batch_rows=BATCH_ROWS, batch_seconds=tuple(0.002 + 0.0015 * r for r in BATCH_ROWS))
    monkeypatch.setattr(engine, "cost_profile", lambda *args, **kwargs: rows_as_dear_as_steps)
    ids = _ids(engine, PROMPTS[0])
    # The unseeded ones never draw the end of text: one that ended early would leave another alone, to draft
    # as alone (seen in CI: two stopped within 18 tokens and the third then drafted half its steps).
    no_end = {token: -100.0 for token in stop_token_ids(engine.tokenizer)}
    unseeded = GenerationSettings.build(temperature=1.0, max_new_tokens=40, logit_bias=no_end)
    seeded = GenerationSettings.build(temperature=1.0, max_new_tokens=40, seed=7)

    def plain_share(chunks):
        return sum(c.step.shape == "plain" for c in chunks) / len(chunks)

    scheduler = Scheduler(engine, max_batch=4)
    assert plain_share(list(scheduler.stream(ids, unseeded))) < 0.3  # alone: it drafts
    results = [None] * 4

    def run(index):
        results[index] = list(scheduler.stream(ids, seeded if index == 0 else unseeded))

    # All four join at once (the loop held until they are queued), so none runs alone for long.
    scheduler.close()
    scheduler = Scheduler(engine, max_batch=4)
    start, scheduler._start = scheduler._start, lambda: None
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    while scheduler._incoming.qsize() < 4:
        time.sleep(0.01)
    start()
    for thread in threads:
        thread.join(timeout=120)
    scheduler.close()
    assert all(c[-1].finish_reason == "length" for c in results[1:])
    assert all(plain_share(chunks) > 0.6 for chunks in results[1:]), [plain_share(c) for c in results[1:]]
    assert _collect(iter(results[0])) == _alone(engine, ids, seeded)
    assert plain_share(results[0]) < 0.3
