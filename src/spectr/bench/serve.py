"""`spectr bench serve`: a load test of `spectr serve`, run as its own process the way users start it.

It times the start-up (until /health answers, and until it says ready), then, for each level of
concurrent clients, has every client send a few chat requests one after another: streamed, of mixed
lengths; some clients disconnect mid-stream, some send a bad request. Per level: aggregate tokens/s of the
completed streams, p50/p95 time to first token, the server's memory, and the count of every outcome —
5xx must be zero, every completed stream the length it claims, a bad request a 400.
"""

import asyncio
from dataclasses import asdict, dataclass, field
import json
import os
from pathlib import Path
import socket
import statistics
import subprocess
import sys
import time

import httpx

from spectr.bench.report import without_machine_paths
from spectr.bench.suites import CHAT_PROMPTS

LEVELS = (1, 2, 4, 8, 16)
REQUESTS_PER_CLIENT = 6  # long enough that a level's batch is full most of its time
LENGTHS = (16, 48, 96)  # max_tokens, cycled over requests
DISCONNECT_EVERY = 5  # the 5th, 10th, ... request of a level reads two chunks and hangs up
BAD_EVERY = 7  # the 7th, 14th, ... sends temperature −1 (a 400 is the right answer)


@dataclass
class Level:
    clients: int
    seconds: float = 0.0
    completed: int = 0
    tokens: int = 0
    disconnected: int = 0
    bad_refused: int = 0  # bad requests answered 400
    retried_429: int = 0
    server_errors: int = 0  # any 5xx, or a stream that ended in an error event
    wrong_length: int = 0  # a completed stream whose usage disagrees with its finish reason or max_tokens
    first_token: list[float] = field(default_factory=list)
    rss_mib: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> dict:
        ttft = sorted(self.first_token)
        data = asdict(self)
        data.pop("first_token")
        data.update(tokens_per_second=round(self.tokens_per_second, 2),
                    ttft_p50=round(statistics.median(ttft), 4) if ttft else None,
                    ttft_p95=round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4) if ttft else None)
        return data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class ServerProcess:
    """`spectr serve` in a child process; start-up timed to its first /health answer and to ready."""

    def __init__(self, serve_args: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "spectr.cli", "serve", "--port", str(self.port), *serve_args]

    def __enter__(self):
        start = time.perf_counter()
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.listening = self.ready = None
        deadline = start + 300
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"spectr serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                status = httpx.get(f"{self.url}/health", timeout=1).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            now = time.perf_counter() - start
            self.listening = self.listening or now
            if status == 200:
                self.ready = now
                return self
            if status == 500:
                raise RuntimeError(f"the server failed to load: {httpx.get(f'{self.url}/health').text}")
            time.sleep(0.05)
        raise TimeoutError("spectr serve was not ready within 300 s")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _request(http: httpx.AsyncClient, url: str, model: str, number: int, prompt: str, level: Level,
                   extra: dict, seed: int | None = None) -> None:
    max_tokens = LENGTHS[number % len(LENGTHS)]
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}, **extra}  # unseeded, as most traffic is
    if seed is not None:  # request n seeded with seed + n: a level's every answer repeats
        body["seed"] = seed + number
    if number % BAD_EVERY == BAD_EVERY - 1:
        response = await http.post(f"{url}/v1/chat/completions", json={**body, "temperature": -1})
        level.bad_refused += response.status_code == 400
        level.server_errors += response.status_code >= 500
        return
    hang_up = number % DISCONNECT_EVERY == DISCONNECT_EVERY - 1
    while True:
        start = time.perf_counter()
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code == 429:
                level.retried_429 += 1
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))
                continue
            if response.status_code != 200:
                level.server_errors += response.status_code >= 500
                return
            first, chunks, usage, finish = None, 0, None, None
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    level.server_errors += 1
                    return
                if data.get("usage"):
                    usage = data["usage"]
                for choice in data.get("choices", []):
                    if choice["delta"].get("content"):
                        first = first or time.perf_counter() - start
                        chunks += 1
                    finish = choice.get("finish_reason") or finish
                if hang_up and chunks >= 2:
                    level.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
            level.completed += 1
            if first is not None:
                level.first_token.append(first)
            tokens = usage["completion_tokens"] if usage else -1
            level.tokens += max(tokens, 0)
            level.wrong_length += not (0 < tokens <= max_tokens and (finish == "stop" or tokens == max_tokens))
            return


async def _level(url: str, model: str, clients: int, extra: dict, requests: int, seed: int | None = None) -> Level:
    level = Level(clients=clients)
    async with httpx.AsyncClient(timeout=600) as http:
        async def client(index: int) -> None:
            for request in range(requests):
                number = index * requests + request
                await _request(http, url, model, number, CHAT_PROMPTS[number % len(CHAT_PROMPTS)], level, extra,
                               seed)

        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        level.seconds = time.perf_counter() - start
    return level


def run(serve_args: list[str], levels=LEVELS, extra: dict | None = None, progress=None,
        requests: int = REQUESTS_PER_CLIENT, seed: int | None = None) -> dict:
    """Start `spectr serve serve_args...`, load it level by level; the results as JSON-ready data."""
    with ServerProcess(serve_args) as server:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        results = []
        for clients in levels:
            level = asyncio.run(_level(server.url, model, clients, extra or {}, requests, seed))
            level.rss_mib = round(_rss_mib(server.process.pid), 1)
            results.append(level.summary())
            if progress:
                progress(results[-1])
        return {"model": model, "serve_args": [without_machine_paths(arg) for arg in serve_args], "extra": extra or {},
                "startup": {"listening_seconds": round(server.listening, 2), "ready_seconds": round(server.ready, 2)},
                "cpus": os.cpu_count(), "requests_per_client": requests, "seed": seed, "levels": results}


def render(result: dict, command: str) -> str:
    rows = ["| clients | tok/s | TTFT p50 (s) | TTFT p95 (s) | completed | disconnected | bad → 400 | 429 retried | "
            "5xx | wrong length | server RSS (MiB) |", "|" + "---|" * 11]
    for level in result["levels"]:
        rows.append(f"| {level['clients']} | {level['tokens_per_second']:.1f} | {level['ttft_p50']} | "
                    f"{level['ttft_p95']} | {level['completed']} | {level['disconnected']} | {level['bad_refused']} | "
                    f"{level['retried_429']} | {level['server_errors']} | {level['wrong_length']} | "
                    f"{level['rss_mib']} |")
    startup = result["startup"]
    return (f"# Serving under load\n\nProduced by `{command}` on {result['cpus']} CPUs; model "
            f"{result['model']}, server flags `{' '.join(result['serve_args']) or '(defaults)'}`, request extras "
            f"{result['extra'] or '(none)'}. Each client sends {result.get('requests_per_client', REQUESTS_PER_CLIENT)} streamed chat requests in "
            f"turn (max_tokens cycling {', '.join(map(str, LENGTHS))}); every {DISCONNECT_EVERY}th hangs up after "
            f"two chunks, every {BAD_EVERY}th is a bad request.\n\nStart-up: /health answers after "
            f"{startup['listening_seconds']} s, ready after {startup['ready_seconds']} s.\n\n" + "\n".join(rows) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [level["clients"] for level in result["levels"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [level["tokens_per_second"] for level in result["levels"]], marker="o")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="aggregate tokens/s", title="throughput")
    for key, label in (("ttft_p50", "p50"), ("ttft_p95", "p95")):
        right.plot(clients, [level[key] for level in result["levels"]], marker="o", label=label)
    right.set(xscale="log", xlabel="concurrent clients", ylabel="seconds", title="time to first token")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
