"""The reward server: rewards equal to score_rows, every rejected input, the token, batching and shutdown."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from conftest import save_tiny_base_model
from ummrm.cli import build_parser, main
from ummrm.errors import UmmrmError
from ummrm.models import create_reward_model, save_reward_model
from ummrm.scoring import score_rows
from ummrm.serving import RewardServer, ServeSettings, is_loopback, read_token

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"
# rewards of one sequence in different batches agree to this in fp32
TOLERANCE = 1e-4

QUERIES = ["hello world", "the cat sat on the mat", "why is it fine because it is", "yes"]
ROWS = [
    {"prompt": "hello world", "response": "the cat sat"},
    {"prompt": [{"role": "system", "content": "be good"}, {"role": "user", "content": "why"}], "response": "because it is fine"},
    {"prompt": "question", "response": "yes " * 20},
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny dense reward model saved as ummrm saves one, with the tiny tokenizer and its chat template."""
    base = save_tiny_base_model(tmp_path_factory.mktemp("serve") / "base")
    model, tokenizer = create_reward_model(str(base), seed=1)
    folder = base.parent / "reward"
    save_reward_model(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def model_and_tokenizer(model_folder):
    from ummrm.models import load_reward_model

    return load_reward_model(str(model_folder))


@pytest.fixture
def start_server(model_and_tokenizer):
    """Return a function that starts a server on 127.0.0.1 with a free port; every server stops after the test."""
    servers = []

    def start(**overrides) -> RewardServer:
        model, tokenizer = model_and_tokenizer
        settings = ServeSettings(**{"host": "127.0.0.1", "port": 0, "max_length": 32, "max_wait_ms": 1.0, **overrides})
        server = RewardServer(model, tokenizer, "tiny-reward-model", settings)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def send(server: RewardServer, method: str, path: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    """Send one request on a new connection and return ``(status, decoded JSON, response headers)``."""
    data = raw
    if data is None and body is not None:
        data = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


def expected_query_rewards(model_and_tokenizer, queries, max_length=32):
    model, tokenizer = model_and_tokenizer
    rows = [{"prompt": "", "response": text} for text in queries]
    return score_rows(model, tokenizer, rows, max_length=max_length, text_format="plain")


def assert_close(actual, expected):
    assert len(actual) == len(expected)
    for index, (a, b) in enumerate(zip(actual, expected)):
        assert abs(a - b) <= TOLERANCE, f"reward {index}: served {a}, score_rows {b}"


def assert_still_serving(server, model_and_tokenizer, headers=None):
    status, payload, _ = send(server, "POST", "/get_reward", {"query": QUERIES[:2]}, headers=headers)
    assert status == 200, payload
    assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, QUERIES[:2]))


# ---------------------------------------------------------------- rewards

def test_get_reward_equals_score_rows(start_server, model_and_tokenizer):
    server = start_server()
    body = {"query": QUERIES, "prompts": ["p"] * len(QUERIES), "labels": [None] * len(QUERIES)}
    status, payload, headers = send(server, "POST", "/get_reward", body)
    assert status == 200, payload
    assert headers["Content-Type"] == "application/json"
    assert set(payload) == {"rewards"}
    assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, QUERIES))


def test_get_reward_reads_pad_text_as_characters(start_server, model_and_tokenizer):
    # a policy can write the pad token's string; it is read as its characters, which this word-level
    # tokenizer maps to <unk>, so the reward equals that of the same text ending in <unk>
    server = start_server()
    status, payload, _ = send(server, "POST", "/get_reward", {"query": ["the cat <|pad|>", "the cat <unk>"]})
    assert status == 200, payload
    assert abs(payload["rewards"][0] - payload["rewards"][1]) <= TOLERANCE, payload["rewards"]
    assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, ["the cat <unk>"] * 2))


def test_get_reward_truncates_like_score(start_server, model_and_tokenizer):
    server = start_server(max_length=8, max_tokens=100)
    long_text = " ".join(["the cat sat on the mat"] * 5)
    status, payload, _ = send(server, "POST", "/get_reward", {"query": [long_text, "yes"]})
    assert status == 200, payload
    assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, [long_text, "yes"], max_length=8))


@pytest.mark.parametrize("text_format", ["auto", "chat"])
def test_score_equals_score_rows(start_server, model_and_tokenizer, text_format):
    server = start_server(text_format=text_format)
    status, payload, _ = send(server, "POST", "/score", {"items": ROWS})
    assert status == 200, payload
    model, tokenizer = model_and_tokenizer
    assert_close(payload["rewards"], score_rows(model, tokenizer, ROWS, max_length=32, text_format=text_format))


def test_score_plain_format(start_server, model_and_tokenizer):
    server = start_server(text_format="plain")
    rows = [row for row in ROWS if isinstance(row["prompt"], str)]
    status, payload, _ = send(server, "POST", "/score", {"items": rows})
    assert status == 200, payload
    model, tokenizer = model_and_tokenizer
    assert_close(payload["rewards"], score_rows(model, tokenizer, rows, max_length=32, text_format="plain"))


def test_health_reports_model(start_server):
    server = start_server(max_items=7)
    status, payload, _ = send(server, "GET", "/health")
    assert status == 200
    assert payload["status"] == "ok"
    assert payload["model"] == "tiny-reward-model"
    assert payload["limits"]["max_items"] == 7
    assert payload["text_format"] == "chat"
    assert payload["torch_threads"] >= 1


def test_keep_alive_connection(start_server, model_and_tokenizer):
    server = start_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for path in ("/nowhere", "/get_reward", "/get_reward"):
            connection.request("POST", path, body=json.dumps({"query": QUERIES[:2]}).encode())
            response = connection.getresponse()
            payload = json.loads(response.read())
            assert response.status == (404 if path == "/nowhere" else 200), payload
    finally:
        connection.close()
    assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, QUERIES[:2]))


def test_ipv6_loopback(start_server, model_and_tokenizer):
    try:
        server = start_server(host="::1")
    except UmmrmError as error:
        pytest.skip(f"this machine cannot listen on ::1: {error}")
    assert server.url.startswith("http://[::1]:")
    request = urllib.request.Request(server.url + "/get_reward", data=json.dumps({"query": QUERIES}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        rewards = json.loads(response.read())["rewards"]
    assert_close(rewards, expected_query_rewards(model_and_tokenizer, QUERIES))


# ---------------------------------------------------------------- rejected requests

LIMITS = {"max_items": 3, "max_body_bytes": 2000, "max_tokens": 10}

# (method, path, JSON body or raw bytes, status, regular expression the error message must match)
BAD_REQUESTS = [
    ("POST", "/get_reward", b'{"query": ["hello"', 400, "not valid JSON"),
    ("POST", "/get_reward", b"\xff\xfe\x00garbage", 400, "not valid JSON"),
    ("POST", "/get_reward", b"[" * 100_000 + b"]" * 100_000, 413, "over the limit of 2000 bytes"),
    ("POST", "/get_reward", b"", 400, "body is empty"),
    ("POST", "/get_reward", ["hello"], 422, "must be a JSON object.*got a JSON array"),
    ("POST", "/get_reward", {}, 422, "missing the field `query`"),
    ("POST", "/get_reward", {"query": "hello"}, 422, "`query` must be a list.*got a JSON string"),
    ("POST", "/get_reward", {"query": []}, 422, "`query` is an empty list"),
    ("POST", "/get_reward", {"query": ["hello", 3]}, 422, r"query\[1\] must be a string; got a JSON number"),
    ("POST", "/get_reward", {"query": ["hello", ""]}, 422, r"query\[1\] is an empty string"),
    ("POST", "/get_reward", {"query": ["yes"] * 4}, 422, "has 4 items, over the limit of 3 items"),
    ("POST", "/get_reward", {"query": ["yes " * 11]}, 422, r"query\[0\] has 11 tokens, over the limit of 10 tokens"),
    ("POST", "/score", [{"prompt": "a", "response": "b"}], 422, "must be a JSON object"),
    ("POST", "/score", {"rows": []}, 422, "missing the field `items`"),
    ("POST", "/score", {"items": []}, 422, "`items` is an empty list"),
    ("POST", "/score", {"items": ["hello"]}, 422, r"items\[0\] must be an object"),
    ("POST", "/score", {"items": [{"prompt": "a"}]}, 422, r"items\[0\] is missing the field `response`"),
    ("POST", "/score", {"items": [{"prompt": "a", "response": 1}]}, 422, r"items\[0\]\.response must be a string"),
    ("POST", "/score", {"items": [{"prompt": "a", "response": "yes"}, {"prompt": "a", "response": ""}]}, 422, r"items\[1\]\.response is an empty string"),
    ("POST", "/score", {"items": [{"prompt": "", "response": "b"}]}, 422, r"items\[0\]\.prompt is an empty string"),
    ("POST", "/score", {"items": [{"prompt": 5, "response": "b"}]}, 422, r"items\[0\]\.prompt must be a string or a non-empty list"),
    ("POST", "/score", {"items": [{"prompt": [{"role": "robot", "content": "x"}], "response": "b"}]}, 422, r"items\[0\]\.prompt must be"),
    ("POST", "/score", {"items": [{"prompt": "a", "response": "yes"}] * 4}, 422, "has 4 items, over the limit of 3"),
    ("POST", "/score", {"items": [{"prompt": "the cat", "response": "yes " * 10}]}, 422, r"items\[0\] has \d+ tokens, over the limit of 10"),
    ("POST", "/nowhere", {"query": ["hello"]}, 404, "unknown path '/nowhere'"),
    ("GET", "/", None, 404, "unknown path '/'"),
    ("GET", "/get_reward", None, 405, "GET is not allowed on /get_reward; use POST"),
    ("POST", "/health", {}, 405, "POST is not allowed on /health; use GET"),
    ("PUT", "/score", {"items": []}, 405, "PUT is not allowed"),
]


@pytest.mark.parametrize("method, path, body, status, message", BAD_REQUESTS, ids=[f"{case[3]}-{case[4][:30]}" for case in BAD_REQUESTS])
def test_bad_request_rejected(start_server, model_and_tokenizer, method, path, body, status, message):
    server = start_server(**LIMITS)
    raw = body if isinstance(body, bytes) else None
    got_status, payload, _ = send(server, method, path, body=None if raw is not None else body, raw=raw)
    assert got_status == status, payload
    assert set(payload) == {"error"}
    assert re.search(message, payload["error"]), payload["error"]
    assert_still_serving(server, model_and_tokenizer)


def test_deeply_nested_json(start_server, model_and_tokenizer):
    server = start_server()
    status, payload, _ = send(server, "POST", "/get_reward", raw=b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400, payload
    assert "not valid JSON" in payload["error"]
    assert_still_serving(server, model_and_tokenizer)


def test_missing_content_length(start_server, model_and_tokenizer):
    server = start_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("POST", "/get_reward")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        connection.send(b"5\r\nhello\r\n0\r\n\r\n")
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 411
    assert "Content-Length" in payload["error"]
    assert_still_serving(server, model_and_tokenizer)


def test_model_error_returns_500(start_server, model_and_tokenizer):
    server = start_server()
    batcher = server.service.batcher
    working = batcher.score_function

    def fail_once(*arguments):
        batcher.score_function = working
        raise RuntimeError("simulated CUDA failure")

    batcher.score_function = fail_once
    status, payload, _ = send(server, "POST", "/get_reward", {"query": QUERIES})
    assert status == 500
    assert "RuntimeError: simulated CUDA failure" in payload["error"]
    assert_still_serving(server, model_and_tokenizer)


def test_non_finite_reward_returns_500(start_server, model_and_tokenizer):
    server = start_server()
    batcher = server.service.batcher
    working = batcher.score_function

    def nan_once(model, sequences, *arguments):
        batcher.score_function = working
        return [float("nan")] * len(sequences)

    batcher.score_function = nan_once
    status, payload, _ = send(server, "POST", "/get_reward", {"query": QUERIES})
    assert status == 500
    assert "non-finite reward" in payload["error"]
    assert_still_serving(server, model_and_tokenizer)


# ---------------------------------------------------------------- token

@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", "Bearer é"])
def test_token_rejected(start_server, model_and_tokenizer, header, caplog):
    server = start_server(token=TOKEN)
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in (("POST", "/get_reward", {"query": QUERIES}), ("GET", "/health", None), ("GET", "/nowhere", None)):
        status, payload, response_headers = send(server, method, path, body, headers=headers)
        assert status == 401, (path, payload)
        assert "bearer token" in payload["error"]
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert_still_serving(server, model_and_tokenizer, headers={"Authorization": f"Bearer {TOKEN}"})
    assert TOKEN not in caplog.text


def test_token_accepted(start_server, model_and_tokenizer):
    server = start_server(token=TOKEN)
    assert_still_serving(server, model_and_tokenizer, headers={"Authorization": f"Bearer {TOKEN}"})
    status, _, _ = send(server, "GET", "/health", headers={"Authorization": f"bearer  {TOKEN} "})
    assert status == 200


def test_settings_repr_hides_token():
    assert TOKEN not in repr(ServeSettings(token=TOKEN))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "example.com"])
def test_non_loopback_needs_token(host):
    with pytest.raises(UmmrmError, match="not a loopback address.*bearer token"):
        ServeSettings(host=host).validate()
    ServeSettings(host=host, token=TOKEN).validate()


def test_server_rejects_non_loopback_without_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UmmrmError, match="not a loopback address"):
        RewardServer(model, tokenizer, "tiny", ServeSettings(host="0.0.0.0", port=0))


def test_cli_rejects_non_loopback_without_token(model_folder, capsys, monkeypatch):
    monkeypatch.delenv("UMMRM_SERVE_TOKEN", raising=False)
    assert main(["serve", "--model", str(model_folder), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "not a loopback address" in capsys.readouterr().err


@pytest.mark.parametrize("host, expected", [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
                                            ("LOCALHOST", True), ("0.0.0.0", False), ("10.0.0.1", False), ("localhost.example", False)])
def test_is_loopback(host, expected):
    assert is_loopback(host) is expected


def test_read_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert read_token(str(token_file), environ={"UMMRM_SERVE_TOKEN": "other"}) == TOKEN
    assert read_token(None, environ={"UMMRM_SERVE_TOKEN": "other"}) == "other"
    assert read_token(None, environ={}) is None
    token_file.write_text("\n")
    with pytest.raises(UmmrmError, match="is empty"):
        read_token(str(token_file))
    with pytest.raises(UmmrmError, match="cannot read the token file"):
        read_token(str(tmp_path / "absent"))


@pytest.mark.parametrize("overrides, message", [({"max_items": 0}, "max_items=0"), ({"max_body_bytes": 0}, "max_body_bytes=0"),
                                                ({"max_tokens": -1}, "max_tokens=-1"), ({"batch_size": 0}, "batch_size=0"),
                                                ({"max_wait_ms": -1}, "max_wait_ms=-1"), ({"port": 70000}, "port=70000"),
                                                ({"token": ""}, "token is empty")])
def test_invalid_settings(overrides, message):
    with pytest.raises(UmmrmError, match=re.escape(message)):
        ServeSettings(**overrides).validate()


# ---------------------------------------------------------------- batching

def test_concurrent_requests_batched(start_server, model_and_tokenizer):
    server = start_server(batch_size=64, max_wait_ms=300.0)
    clients = 8
    texts = [[QUERIES[client % len(QUERIES)], " ".join(["yes"] * (client + 1))] for client in range(clients)]
    results: dict[int, tuple] = {}
    barrier = threading.Barrier(clients)

    def client(index: int) -> None:
        barrier.wait()
        results[index] = send(server, "POST", "/get_reward", {"query": texts[index]})

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    for index in range(clients):
        status, payload, _ = results[index]
        assert status == 200, payload
        assert_close(payload["rewards"], expected_query_rewards(model_and_tokenizer, texts[index]))
    assert server.service.batcher.items_scored == 2 * clients
    assert server.service.batcher.forward_passes < clients


# ---------------------------------------------------------------- command line and load script

def test_serve_arguments_parse():
    arguments = build_parser().parse_args(["serve", "--model", "m", "--port", "0", "--max-items", "5", "--max-wait-ms", "2.5"])
    assert arguments.command == "serve"
    assert arguments.host == "127.0.0.1"
    assert arguments.max_items == 5
    assert arguments.max_wait_ms == 2.5


def test_cli_serves_until_sigterm(model_folder, model_and_tokenizer, tmp_path):
    """Run `ummrm serve` as a process: it logs its address, returns rewards, and exits 0 on SIGTERM."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    command = [sys.executable, "-m", "ummrm.cli", "serve", "--model", str(model_folder), "--port", "0",
               "--token-file", str(token_file), "--max-length", "32"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment, cwd=ROOT)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            found = re.search(r"at http://127\.0\.0\.1:(\d+) ", line)
            if found:
                break
        assert found, "".join(lines)
        server = type("Address", (), {"port": int(found.group(1))})
        assert_still_serving(server, model_and_tokenizer, headers={"Authorization": f"Bearer {TOKEN}"})
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    log = "".join(lines) + rest
    assert process.returncode == 0, log
    assert "received SIGTERM" in log
    assert "stopped serving" in log
    assert TOKEN not in log


def test_load_script_rejects_remote_host(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load.py"), "--url", "http://192.0.2.1:8000", "--seconds", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "loopback" in result.stderr


def test_load_script_runs(start_server, tmp_path):
    server = start_server()
    results = tmp_path / "RESULTS.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--url", server.url + "/get_reward", "--clients", "2", "--seconds", "1",
               "--items-per-request", "2", "--max-requests", "20", "--results", str(results)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "requests/s" in result.stdout
    assert "errors: 0" in result.stdout
    assert "load:" in results.read_text()
