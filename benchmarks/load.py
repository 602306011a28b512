"""Load test of a running `ummrm serve`: concurrent clients post /get_reward requests for a fixed time.

Each client sends OpenRLHF's request shape, ``{"query", "prompts", "labels"}``, waits for the response and
sends the next. The script prints requests/s, items/s, p50 and p99 latency and the error count, and appends
them to RESULTS.md. It only sends to a loopback address, and it stops after ``--seconds`` or
``--max-requests``, whichever comes first. Requests still in flight at the deadline finish within
``--timeout`` seconds. Start the server first, for example:

    ummrm serve --model runs/quickstart/merged --max-length 128 &
    python benchmarks/load.py --clients 8 --seconds 30
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MAX_SECONDS = 3600
MAX_CLIENTS = 256
MAX_REQUESTS = 1_000_000
TOKEN_ENVIRONMENT_VARIABLE = "UMMRM_SERVE_TOKEN"
# used when no preference file is found: short chat-formatted texts in SmolLM2's template
SYNTHETIC_PROMPTS = ["What is the capital of France?", "How do I boil an egg?", "Write a haiku about rain.", "Why is the sky blue?"]
SYNTHETIC_RESPONSES = [
    "Paris is the capital of France.", "Put the egg in boiling water for nine minutes, then cool it in cold water.",
    "Rain on the tin roof, a slow drum for the evening, the garden drinks deep.",
    "Sunlight scatters off air molecules, and blue light scatters the most.",
]


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000/get_reward",
                        help="the server's /get_reward URL, as given to OpenRLHF's --remote_rm_url; loopback hosts only (default: http://127.0.0.1:8000/get_reward)")
    parser.add_argument("--clients", type=int, default=8, help=f"concurrent clients, each waiting for its response before the next request (default: 8, at most {MAX_CLIENTS})")
    parser.add_argument("--seconds", type=float, default=30.0, help=f"seconds to send requests for (default: 30, at most {MAX_SECONDS})")
    parser.add_argument("--items-per-request", type=int, default=4, help="texts per request (default: 4)")
    parser.add_argument("--max-requests", type=int, default=10_000, help=f"requests to send at most, over all clients (default: 10000, at most {MAX_REQUESTS})")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take before it counts as an error (default: 120)")
    parser.add_argument("--data", type=Path, default=common.HH_FILE,
                        help=f"JSON lines file, gzipped or not, whose `chosen` (or `text`) strings are sent as queries; built-in chat texts when it does not exist (default: {common.HH_FILE})")
    parser.add_argument("--token-file", type=Path, default=None, help=f"file holding the server's bearer token (default: ${TOKEN_ENVIRONMENT_VARIABLE}, else none)")
    parser.add_argument("--results", type=Path, default=common.DEFAULT_RESULTS, help="Markdown file that the run is appended to (default: benchmarks/RESULTS.md)")
    arguments = parser.parse_args(argv)

    parts = urlsplit(arguments.url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        parser.error(f"--url {arguments.url} is invalid: this script sends only to http:// on a loopback host ({', '.join(LOOPBACK_HOSTS)}).")
    for name, value, low, high in (("--clients", arguments.clients, 1, MAX_CLIENTS), ("--seconds", arguments.seconds, 0.1, MAX_SECONDS),
                                   ("--max-requests", arguments.max_requests, 1, MAX_REQUESTS), ("--items-per-request", arguments.items_per_request, 1, 100_000),
                                   ("--timeout", arguments.timeout, 0.1, MAX_SECONDS)):
        if not low <= value <= high:
            parser.error(f"{name} {value} is invalid; give a value from {low:g} to {high:g}.")
    return arguments


def read_token(token_file: Path | None) -> str | None:
    if token_file is not None:
        try:
            return token_file.read_text().strip() or None
        except OSError as error:
            raise SystemExit(f"cannot read --token-file {token_file}: {error.strerror}.") from None
    return os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, "").strip() or None


def load_texts(path: Path, count: int = 512) -> tuple[list[str], str]:
    """Return up to ``count`` query texts and a description of where they came from."""
    if path.is_file():
        opener = gzip.open if path.suffix == ".gz" else open
        texts = []
        with opener(path, "rt") as lines:
            for line in lines:
                row = json.loads(line)
                text = row.get("chosen", row.get("text")) if isinstance(row, dict) else None
                if isinstance(text, str) and text:
                    texts.append(text)
                if len(texts) >= count:
                    break
        if texts:
            return texts, f"the `chosen` dialogues of the first {len(texts)} rows of {path}"
    texts = [
        f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>\n"
        for prompt in SYNTHETIC_PROMPTS for response in SYNTHETIC_RESPONSES
    ]
    return texts, f"{len(texts)} built-in chat texts in the SmolLM2 template"


class LoadRun:
    """Shared state of the clients: the request budget, latencies and errors."""

    def __init__(self, arguments, texts: list[str], token: str | None):
        self.arguments = arguments
        self.texts = texts
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.lock = threading.Lock()
        self.sent = 0
        self.latencies: list[float] = []
        self.items = 0
        self.errors: Counter = Counter()
        self.deadline = 0.0

    def claim(self) -> int | None:
        """Return the index of the next request, or None when time or the request budget is used up."""
        with self.lock:
            if self.sent >= self.arguments.max_requests or time.monotonic() >= self.deadline:
                return None
            self.sent += 1
            return self.sent - 1

    def client(self) -> None:
        count = self.arguments.items_per_request
        while (index := self.claim()) is not None:
            start = index * count
            queries = [self.texts[(start + offset) % len(self.texts)] for offset in range(count)]
            body = json.dumps({"query": queries, "prompts": [""] * count, "labels": [""] * count}).encode()
            request = urllib.request.Request(self.arguments.url, data=body, headers=self.headers, method="POST")
            began = time.perf_counter()
            error = None
            try:
                with urllib.request.urlopen(request, timeout=self.arguments.timeout) as response:
                    rewards = json.loads(response.read()).get("rewards")
                if not isinstance(rewards, list) or len(rewards) != count:
                    error = "wrong reward count"
            except urllib.error.HTTPError as failure:
                error = f"HTTP {failure.code}"
            except (urllib.error.URLError, OSError, ValueError) as failure:
                error = type(getattr(failure, "reason", failure)).__name__
            elapsed = time.perf_counter() - began
            with self.lock:
                if error is None:
                    self.latencies.append(elapsed)
                    self.items += count
                else:
                    self.errors[error] += 1


def get_health(arguments, headers: dict[str, str]) -> dict:
    parts = urlsplit(arguments.url)
    request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}/health", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise SystemExit(f"cannot read {parts.netloc}/health: {error}. Start `ummrm serve` first, or check --url and the token.") from None


def main(argv=None) -> int:
    arguments = parse_arguments(argv)
    texts, text_source = load_texts(arguments.data)
    run = LoadRun(arguments, texts, read_token(arguments.token_file))
    before = get_health(arguments, run.headers)

    report = common.Report(f"load: ummrm serve /get_reward, {arguments.clients} clients × {arguments.items_per_request} items", quick=False)
    report.add(f"server: model {before['model']}, max_length {before['max_length']}, batch_size {before['batch_size']}, "
               f"max_wait_ms {before['max_wait_ms']:g}, torch threads {before['torch_threads']}, at {arguments.url}. "
               "The server ran on this machine, so clients and server shared its cores.")
    lengths = sorted(len(text) for text in run.texts)
    report.add(f"queries: {text_source}; characters per text: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    report.add(f"load: {arguments.clients} clients for {arguments.seconds:g} s, {arguments.items_per_request} items per request, "
               f"at most {arguments.max_requests} requests")

    run.deadline = time.monotonic() + arguments.seconds
    began = time.perf_counter()
    threads = [threading.Thread(target=run.client, name=f"client-{index}") for index in range(arguments.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    after = get_health(arguments, run.headers)

    succeeded = len(run.latencies)
    error_count = sum(run.errors.values())
    details = ", ".join(f"{kind} × {count}" for kind, count in run.errors.most_common())
    report.add(f"requests: {succeeded} answered in {elapsed:.1f} s")
    report.add(f"errors: {error_count}" + (f" ({details})" if details else ""))
    report.add(f"throughput: {succeeded / elapsed:.3g} requests/s, {run.items / elapsed:.3g} items/s")
    if succeeded:
        milliseconds = sorted(1000 * value for value in run.latencies)
        p99 = statistics.quantiles(milliseconds, n=100, method="inclusive")[98] if succeeded > 1 else milliseconds[0]
        report.add(f"latency ms: p50 {statistics.median(milliseconds):.1f}, p99 {p99:.1f}, max {milliseconds[-1]:.1f}")
    passes = after["forward_passes"] - before["forward_passes"]
    scored = after["items_scored"] - before["items_scored"]
    if passes:
        report.add(f"server: {scored} items in {passes} forward passes, {scored / passes:.3g} items per pass")
    # a 1-minute load average above the core count means other processes competed with the server
    report.add(f"load average at end (1 min): {os.getloadavg()[0]:.2f}, with {os.cpu_count()} logical cores")
    report.append_to(arguments.results)
    return 0 if error_count == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
