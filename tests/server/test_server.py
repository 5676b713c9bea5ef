"""The OpenAI-compatible server against the official `openai` client, on a live 127.0.0.1 server."""

import json
import threading
import time

import httpx
import openai
import pytest

import spectr
from spectr.server import ServerSettings
from tests.server.conftest import API_KEY, LiveServer

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
    assert response.usage.model_extra["spectr"]["block_efficiency"] >= 1


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
        ({"model": "tiny", "prompt": PROMPT, "n": 2}, 400, ["n = 1"]),
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


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_bounded_load(server):
    """40 concurrent streams against 2 workers + 2 queue slots: each completes in full or gets 429."""
    baseline = _rss_mb()
    outcomes: list[str] = []

    def one(index: int) -> None:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 24, "seed": index, "stream": True, **EXTRA}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
                if r.status_code == 429:
                    outcomes.append("429" if r.headers.get("retry-after") else "429-without-retry-after")
                    return
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                outcomes.append("done" if lines and lines[-1] == "data: [DONE]" else "truncated")
        except Exception as error:  # a hang or a broken connection counts against the server
            outcomes.append(f"error {error!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 40, "a request hung"
    assert set(outcomes) <= {"done", "429"}, outcomes
    assert outcomes.count("done") >= 2 and outcomes.count("429") >= 1
    assert httpx.get(f"{server.url}/health").status_code == 200
    deadline = time.time() + 5
    while server.app.state.slots.used and time.time() < deadline:
        time.sleep(0.05)
    assert server.app.state.slots.used == 0
    assert _rss_mb() < baseline + 100


def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 200, "stream": True, "k": 1, "L": 1, "method": "ar"}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
        assert server.app.state.slots.used == 1
    dropped = time.time()
    while server.app.state.slots.used and time.time() - dropped < 1.0:
        time.sleep(0.01)
    assert server.app.state.slots.used == 0, "the slot was not freed within a second"


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


def test_spectr_serve_command(tiny_folder):
    """The CLI starts a server that loads the model and answers."""
    import subprocess
    import sys

    from tests.server.conftest import free_port

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "spectr.cli", "serve", "--target", str(tiny_folder), "--port", str(port),
         "--precision", "fp32", "--model-name", "tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        status = None
        while time.time() < deadline and status != 200:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/health").status_code
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert status == 200
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4}, timeout=30)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.terminate()
        process.wait(timeout=10)
