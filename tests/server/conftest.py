"""A live server on 127.0.0.1 over a tiny model, started once per module, and generations tests can steer."""

import socket
import threading
import time

import httpx
import pytest
import uvicorn

import spectr
from spectr import api
from spectr.decoding import StepStats
from spectr.server import ServerSettings, create_app
from tests.models.test_loading import save_tiny_model

API_KEY = "test-key"


class LiveServer:
    """A uvicorn server in a thread, on a socket bound here (so no other process can take the port first)."""

    def __init__(self, load_engine, settings: ServerSettings = ServerSettings(), **app_options):
        self.app = create_app(load_engine, settings, **app_options)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        except SystemExit:  # uvicorn's answer to a failed startup; __enter__ reports it
            pass

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and self.thread.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.__exit__()
            raise RuntimeError("the test server did not start (see uvicorn's log above)")
        return self

    def health_after_load(self, timeout: float = 60) -> httpx.Response:
        """/health once the model has loaded or failed to."""
        deadline = time.time() + timeout
        while (response := httpx.get(f"{self.url}/health")).status_code == 503:
            if time.time() > deadline:
                raise TimeoutError("the model neither loaded nor failed")
            time.sleep(0.02)
        return response

    def wait_ready(self) -> None:
        response = self.health_after_load()
        assert response.status_code == 200, response.text

    def wait_for_free_slots(self, timeout: float = 5) -> None:
        """Slots go back in a worker's done-callback, a moment after the client may have its answer."""
        deadline = time.time() + timeout
        while self.app.state.slots.used and time.time() < deadline:
            time.sleep(0.01)
        assert self.app.state.slots.used == 0, "a slot was not given back"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


class HeldStream:
    """api.stream whose generations wait at a gate before their first chunk, so a test can fill the server."""

    def __init__(self):
        self.gate = threading.Event()
        self.started = 0  # generations that reached the gate: those a worker runs
        self.lock = threading.Lock()

    def __call__(self, engine, ids, settings):
        with self.lock:
            self.started += 1
        self.gate.wait()
        yield from api.stream(engine, ids, settings)

    def wait_started(self, count: int, timeout: float = 5) -> None:
        deadline = time.time() + timeout
        while self.started < count and time.time() < deadline:
            time.sleep(0.01)
        assert self.started == count, f"{self.started} generations started, expected {count}"


class EndlessStream:
    """A generation that never ends by itself: a chunk every few milliseconds until the server closes it."""

    def __init__(self):
        self.closed = threading.Event()
        self.stop = threading.Event()  # set by the test at the end, should the server fail to stop it

    def __call__(self, engine, ids, settings):
        stats = api.GenerationStats(prompt_tokens=len(ids))
        try:
            while not self.stop.wait(0.005):
                step = StepStats(emitted=[3], accepted=0)
                stats.add(step)
                yield api.Chunk("w3 ", step.emitted, step, stats)
        finally:
            self.closed.set()


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
