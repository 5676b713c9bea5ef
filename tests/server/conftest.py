"""A live server on 127.0.0.1 over a tiny model, started once per module."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

import spectr
from spectr.server import ServerSettings, create_app
from tests.models.test_loading import save_tiny_model

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    def __init__(self, load_engine, settings: ServerSettings):
        self.app = create_app(load_engine, settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if httpx.get(f"{self.url}/health").status_code == 200:
                return
            time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-chat"), chat=True)


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return spectr.load(tiny_folder, precision="fp32")


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(max_concurrency=2, max_queue=2, api_key=API_KEY, model_name="tiny")
    with LiveServer(lambda: engine, settings) as live:
        live.wait_ready()
        yield live
