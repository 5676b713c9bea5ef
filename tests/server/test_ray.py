"""`spectr serve --replicas 2` on Ray Serve: a local Ray instance, two replicas, concurrent streams from both."""

from concurrent.futures import ThreadPoolExecutor
import json
import socket
import time

import httpx
import pytest

import spectr
from spectr.server import ServerSettings
from spectr.server import ray as ray_serve

PROMPT = "w3 w5 w7 w3 w5"


@pytest.fixture(scope="module")
def replicas(tiny_folder):
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.run(lambda: spectr.load(tiny_folder, draft="ngram", precision="fp32"),
                      ServerSettings(model_name="tiny", max_concurrency=2, max_queue=2), "127.0.0.1", port, 2,
                      blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _stream(url: str, seed: int) -> tuple[str, str, int]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "seed": seed, "k": 2, "L": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        replica = response.headers[ray_serve.REPLICA_HEADER]
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    pieces = [json.loads(piece) for piece in data[:-1]]
    text = "".join(p["choices"][0]["text"] for p in pieces if p["choices"])
    return text, replica, pieces[-1]["usage"]["completion_tokens"]


def test_two_replicas_serve_concurrent_streams_correctly(replicas, engine):
    seeds = list(range(12))
    with ThreadPoolExecutor(6) as clients:
        results = list(clients.map(lambda seed: _stream(replicas, seed), seeds))
    expected = [spectr.generate(engine, PROMPT, max_new_tokens=10, seed=seed, k=2, L=2) for seed in seeds]
    assert [text for text, _, _ in results] == [e.text for e in expected]
    assert [tokens for _, _, tokens in results] == [e.stats.new_tokens for e in expected]
    assert len({replica for _, replica, _ in results}) == 2, "one replica served everything"
    # each replica keeps its own metrics, and says whose they are
    # Which replica answers is the router's choice (it weighs their queues, which a loaded host reports
    # late), so ask in pairs at once until both have answered.
    metrics = {}
    deadline = time.time() + 60
    with ThreadPoolExecutor(2) as askers:
        while len(metrics) < 2 and time.time() < deadline:
            for response in askers.map(lambda _: httpx.get(f"{replicas}/metrics", timeout=10), range(2)):
                metrics[response.headers[ray_serve.REPLICA_HEADER]] = response.text
            time.sleep(0.05)
    assert len(metrics) == 2 and all("spectr_generated_tokens_total" in text for text in metrics.values())
