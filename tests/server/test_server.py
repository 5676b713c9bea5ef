"""The OpenAI-compatible server against the official `openai` client, on a live 127.0.0.1 server."""

from concurrent.futures import ThreadPoolExecutor
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest

import spectr
from spectr import api
from spectr.models import kernels
from spectr.server import ServerSettings
from tests.server.conftest import API_KEY, EndlessStream, HeldStream, LiveServer

PROMPT = "w3 w5 w7 w3 w5 w7 w3"
EXTRA = {"k": 2, "L": 3}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_completion_equals_the_library(client, engine):
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=5,
                                         extra_body=EXTRA)
    expected = spectr.generate(engine, PROMPT, max_new_tokens=12, temperature=1.0, seed=5, k=2, L=3)
    assert response.choices[0].text == expected.text
    assert response.usage.completion_tokens == expected.stats.new_tokens
    assert response.usage.prompt_tokens == 7
    spectr_usage = response.usage.model_extra["spectr"]
    assert spectr_usage["target_passes"] == expected.stats.steps
    assert spectr_usage["block_efficiency"] == round(expected.stats.block_efficiency, 4)
    assert spectr_usage["accepted_per_position"] == expected.stats.accepted_per_position


def test_a_stop_string_trims_the_usage(client, engine):
    """completion_tokens count up to the token that completes the stop string, not the whole step."""
    full = spectr.generate(engine, PROMPT, max_new_tokens=16, temperature=1.0, seed=5, k=2, L=3)
    words = full.text.split()
    stop = words[4][-1] + " " + words[5][:2]  # across a token boundary
    response = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=5,
                                         stop=[stop], extra_body=EXTRA)
    expected = spectr.generate(engine, PROMPT, max_new_tokens=16, temperature=1.0, seed=5, k=2, L=3, stop=[stop])
    assert response.choices[0].text == expected.text == full.text[: full.text.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens == len(expected.tokens) < len(full.tokens)


def test_streamed_completion_equals_the_library(client, engine):
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, seed=9, stream=True,
                                       stream_options={"include_usage": True}, extra_body=EXTRA)
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
        if chunk.usage:
            usage = chunk.usage
    expected = spectr.generate(engine, PROMPT, max_new_tokens=12, seed=9, k=2, L=3)
    assert "".join(pieces) == expected.text
    assert usage.completion_tokens == expected.stats.new_tokens


def test_chat_streamed_and_not(client, engine):
    messages = [{"role": "user", "content": "w3 w4 w5"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=2, extra_body=EXTRA)
    expected = spectr.generate(engine, messages, max_new_tokens=10, seed=2, k=2, L=3)
    assert whole.choices[0].message.content == expected.text
    assert whole.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, seed=2,
                                              stream=True, extra_body=EXTRA)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == expected.text


def test_models_health_and_metrics(client, server):
    assert [model.id for model in client.models.list()] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("spectr_requests_total", "spectr_generated_tokens_total", "spectr_block_efficiency",
                 "spectr_time_to_first_token_seconds", "spectr_inter_token_latency_seconds"):
        assert name in metrics


def _post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    return httpx.post(f"{server.url}{path}", headers=headers, content=raw if raw is not None else json.dumps(body),
                      timeout=30)


@pytest.mark.parametrize(
    "body,status,words",
    [
        ({"model": "tiny", "prompt": PROMPT, "temperature": -1}, 400, ["temperature"]),
        ({"model": "tiny", "prompt": PROMPT, "top_p": 2}, 400, ["top_p"]),
        ({"model": "tiny", "prompt": PROMPT, "k": 0}, 400, ["k"]),
        ({"model": "tiny", "prompt": PROMPT, "L": 0}, 400, ["L"]),
        ({"model": "tiny", "prompt": PROMPT, "max_tokens": 0}, 400, ["max_tokens"]),
        ({"model": "tiny", "prompt": PROMPT, "n": 9}, 400, ["n = 9", "limit of 8"]),
        ({"model": "tiny", "prompt": PROMPT, "method": "beam"}, 400, ["method"]),
        ({"model": "tiny", "prompt": ""}, 400, ["empty"]),
        ({"model": "tiny"}, 400, ["prompt"]),
        ({"model": "tiny", "prompt": PROMPT, "max_tokens": 250}, 400, ["7 tokens", "250", "256"]),
        ({"model": "gpt-9", "prompt": PROMPT}, 404, ["gpt-9", "tiny"]),
    ],
)
def test_bad_input_gets_its_status_and_message(server, body, status, words):
    response = _post(server, "/v1/completions", body)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    for word in words:
        assert word in message


def test_malformed_json_and_missing_key(server):
    assert _post(server, "/v1/completions", None, raw=b"{not json").status_code == 422
    response = _post(server, "/v1/completions", {"model": "tiny", "prompt": PROMPT}, key="wrong")
    assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


BODY = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "seed": 4, **EXTRA}
SETTINGS = ServerSettings(max_concurrency=2, max_queue=2, api_key=API_KEY, model_name="tiny")


def _data(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def _streamed_text(data: list[str]) -> str:
    return "".join(json.loads(piece)["choices"][0]["text"] for piece in data[:-1])


def test_bounded_load(engine):
    """2 running + 2 waiting fill the server: the next request gets 429, and every admitted one completes."""
    held = HeldStream()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    bodies = [{**BODY, "seed": seed, "stream": True} for seed in range(4)]
    with LiveServer(lambda: engine, SETTINGS, stream=held) as live, httpx.Client(headers=headers) as http, \
            contextlib.ExitStack() as streams:
        live.wait_ready()
        try:
            # each stream is admitted (its slot taken) before its response headers come back
            admitted = [streams.enter_context(http.stream("POST", f"{live.url}/v1/completions", json=body))
                        for body in bodies]
            assert [response.status_code for response in admitted] == [200] * 4
            held.wait_started(2)
            assert live.app.state.slots.used == 4
            for stream in (True, False):
                refused = http.post(f"{live.url}/v1/completions", json={**BODY, "stream": stream})
                assert refused.status_code == 429, refused.text
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["type"] == "rate_limit_error"
            assert held.started == 2, "more generations ran than max_concurrency"
        finally:
            held.gate.set()
        for body, response in zip(bodies, admitted):
            data = _data(response)
            assert data[-1] == "[DONE]"
            expected = spectr.generate(engine, PROMPT, max_new_tokens=12, seed=body["seed"], k=2, L=3)
            assert _streamed_text(data) == expected.text
        assert held.started == 4
        live.wait_for_free_slots()


def test_a_client_that_disconnects_frees_its_slot(engine):
    endless = EndlessStream()
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with LiveServer(lambda: engine, SETTINGS, stream=endless) as live:
        live.wait_ready()
        try:
            body = {**BODY, "stream": True}
            with httpx.stream("POST", f"{live.url}/v1/completions", json=body, headers=headers) as response:
                lines = response.iter_lines()
                for _ in range(3):
                    while not next(lines).startswith("data: "):
                        pass
                assert live.app.state.slots.used == 1
            # the generation never ends by itself: only cancelling it closes it and frees its slot
            assert endless.closed.wait(5), "the generation went on after its client left"
            live.wait_for_free_slots()
        finally:
            endless.stop.set()


FAIL_SEED = 13


def flaky_stream(engine, ids, settings):
    """api.stream, except that a generation seeded FAIL_SEED breaks after its first chunk."""
    chunks = api.stream(engine, ids, settings)
    yield next(chunks)
    if settings.seed == FAIL_SEED:
        raise RuntimeError("the accelerator fell over")
    yield from chunks


def test_a_failing_generation_answers_an_error_and_frees_its_slot(engine):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    failing = {**BODY, "seed": FAIL_SEED}
    with LiveServer(lambda: engine, SETTINGS, stream=flaky_stream) as live, httpx.Client(headers=headers) as http:
        live.wait_ready()
        with http.stream("POST", f"{live.url}/v1/completions", json={**failing, "stream": True}) as response:
            assert response.status_code == 200  # the headers went out before the failure
            data = _data(response)
        assert "text" in json.loads(data[0])["choices"][0]  # the chunk before the failure
        error = json.loads(data[-1])["error"]  # then the error ends the stream: no [DONE]
        assert error["type"] == "server_error" and "fell over" in error["message"]
        live.wait_for_free_slots()

        response = http.post(f"{live.url}/v1/completions", json=failing)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["type"] == "server_error" and "fell over" in error["message"]
        live.wait_for_free_slots()

        served = http.post(f"{live.url}/v1/completions", json=BODY)
        assert served.status_code == 200
        expected = spectr.generate(engine, PROMPT, max_new_tokens=12, seed=4, k=2, L=3)
        assert served.json()["choices"][0]["text"] == expected.text
        live.wait_for_free_slots()


def test_a_failed_load_is_reported():
    def broken_load():
        raise RuntimeError("no weights in /nowhere")

    with LiveServer(broken_load) as live:
        health = live.health_after_load()
        assert health.status_code == 500
        assert health.json() == {"status": "error", "message": "no weights in /nowhere"}
        for response in (httpx.post(f"{live.url}/v1/completions", json={"model": "x", "prompt": "w3"}),
                         httpx.get(f"{live.url}/v1/models")):
            assert response.status_code == 500 and "retry-after" not in response.headers
            error = response.json()["error"]
            assert error["type"] == "server_error"
            assert "failed to load" in error["message"] and "no weights in /nowhere" in error["message"]


def paired_stream(barrier: threading.Barrier):
    """api.stream that starts generations two at a time: each waits for a partner (or fails on timeout)."""

    def stream(engine, ids, settings):
        barrier.wait()
        yield from api.stream(engine, ids, settings)

    return stream


def test_concurrent_seeded_requests_equal_sequential_ones(server, engine):
    bodies = [{**BODY, "max_tokens": 16, "temperature": 1.0, "seed": seed} for seed in (1, 2, 3, 4)]
    sequential = [_post(server, "/v1/completions", body).json()["choices"][0]["text"] for body in bodies]
    library = [spectr.generate(engine, PROMPT, max_new_tokens=16, temperature=1.0, seed=body["seed"], k=2, L=3).text
               for body in bodies]
    assert sequential == library
    assert len(set(library)) > 1, "the seeds do not change the text, so this test could not see them mixed up"

    stream = paired_stream(threading.Barrier(2, timeout=10))
    with LiveServer(lambda: engine, SETTINGS, stream=stream) as live, ThreadPoolExecutor(4) as clients:
        live.wait_ready()
        responses = list(clients.map(lambda body: _post(live, "/v1/completions", body), bodies))
        assert [response.status_code for response in responses] == [200] * 4, [r.text for r in responses]
        assert [response.json()["choices"][0]["text"] for response in responses] == sequential
        live.wait_for_free_slots()


def test_health_is_503_while_loading():
    release = threading.Event()

    def slow_engine():
        release.wait(10)
        raise RuntimeError("never loads")

    with LiveServer(slow_engine, ServerSettings()) as live:
        response = httpx.get(f"{live.url}/health")
        assert response.status_code == 503 and response.json()["status"] == "loading"
        completion = httpx.post(f"{live.url}/v1/completions", json={"model": "x", "prompt": "w3"})
        assert completion.status_code == 503 and completion.headers.get("retry-after")
        release.set()


def test_the_live_server_says_when_it_did_not_start(engine):
    async def failing_startup(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no start"})

    live = LiveServer(lambda: engine)
    live.server.config.app, live.server.config.lifespan = failing_startup, "on"
    with pytest.raises(RuntimeError, match="did not start"):
        live.__enter__()


def test_spectr_serve_command(tiny_folder):
    """The CLI starts a server that loads the model and answers."""
    import subprocess
    import sys

    for _attempt in range(3):  # the CLI takes a port number: one free when picked may be taken before it binds
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", "spectr.cli", "serve", "--target", str(tiny_folder),
             "--port", url.rsplit(":", 1)[1], "--precision", "fp32", "--model-name", "tiny"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.time() + 60
            status = None
            while time.time() < deadline and status != 200 and process.poll() is None:
                try:
                    status = httpx.get(f"{url}/health").status_code
                except httpx.TransportError:
                    time.sleep(0.1)
            if process.poll() is not None:
                continue
            assert status == 200
            reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4},
                               timeout=30)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
            return
        finally:
            process.terminate()
            process.wait(timeout=10)
    pytest.fail("`spectr serve` exited before answering, three times")


@pytest.mark.skipif(not kernels.available(), reason="spectr's kernels are not built here")
def test_concurrent_requests_share_target_passes_and_answer_what_they_would_alone(tiny_folder):
    """Continuous batching in the server: concurrent seeded requests (and a request's n choices) share the
    target's passes -- the metrics show passes of several generations -- and each answers what the library
    gives it alone."""
    engine = spectr.load(tiny_folder, draft=tiny_folder, precision="int4")  # batched on the kernel
    bodies = [{**BODY, "max_tokens": 14, "temperature": 1.0, "seed": seed, "k": 2, "L": 2} for seed in (1, 2, 3)]
    bodies.append({**BODY, "max_tokens": 10, "temperature": 0.8, "seed": 7, "n": 3})
    settings = ServerSettings(max_concurrency=4, max_queue=4, api_key=API_KEY, model_name="tiny")
    with LiveServer(lambda: engine, settings) as live, ThreadPoolExecutor(4) as clients:
        live.wait_ready()
        responses = list(clients.map(lambda body: _post(live, "/v1/completions", body), bodies))
        assert [response.status_code for response in responses] == [200] * 4, [r.text for r in responses]
        metrics = httpx.get(f"{live.url}/metrics").text
    for body, response in zip(bodies[:3], responses):
        expected = spectr.generate(engine, PROMPT, max_new_tokens=14, temperature=1.0, seed=body["seed"], k=2, L=2)
        assert response.json()["choices"][0]["text"] == expected.text
    choices = [c["text"] for c in sorted(responses[3].json()["choices"], key=lambda c: c["index"])]
    assert choices == [spectr.generate(engine, PROMPT, max_new_tokens=10, temperature=0.8, seed=7 + i, k=2, L=3).text
                       for i in range(3)]
    sums = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("spectr_batch_sequences_")}
    assert sums["spectr_batch_sequences_sum"] > sums["spectr_batch_sequences_count"]  # > 1 generation a pass
