"""An HTTP reward server: ``POST /get_reward`` for OpenRLHF, ``POST /score`` and ``GET /health``.

``/get_reward`` takes ``{"query": [texts], "prompts": [...], "labels": [...]}`` and returns
``{"rewards": [...]}``, the request and response of OpenRLHF's remote reward model client
(``openrlhf/utils/remote_rm_utils.py``). Each query is a whole prompt and response that the policy already
rendered with its chat template, so it is encoded as plain text, with no template added. Its reward equals
``score_rows`` (``ummrm score``) on the row ``{"prompt": "", "response": text}`` with ``text_format="plain"``
and the same ``max_length``. ``prompts`` and ``labels`` are accepted and ignored, because the query
already contains the whole text.

``/score`` takes ``{"items": [{"prompt", "response"}, ...]}``, rows as ``ummrm score`` reads them, and
returns the rewards ``score_rows`` gives with the server's ``text_format`` and ``max_length``.

Requests are validated and encoded on their own threads. One worker thread owns the model: it takes
encoded items from a queue and runs them in batches, so concurrent requests share forward passes.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import queue
import signal
import socket
import socketserver
import threading
import time
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from ummrm.errors import UmmrmError
from ummrm.scoring import ROLES, prompt_forms

logger = logging.getLogger(__name__)

TOKEN_ENVIRONMENT_VARIABLE = "UMMRM_SERVE_TOKEN"
# method and handler name of each path
ROUTES = {"/get_reward": ("POST", "get_reward"), "/score": ("POST", "score"), "/health": ("GET", "health")}
ENDPOINTS = ", ".join(f"{method} {path}" for path, (method, _) in ROUTES.items())
# seconds a request waits for the model before it gets a 503
RESULT_TIMEOUT_SECONDS = 600.0
# seconds a connection may stay idle, or take to send its request, before it is closed
CONNECTION_TIMEOUT_SECONDS = 60.0
# seconds that stopping the server waits for requests in progress to get their rewards
STOP_GRACE_SECONDS = 10.0
# Before closing a connection whose request body was not read, the server reads and drops at most this
# many bytes for at most this many seconds. Closing with unread data sends a TCP reset, which can destroy
# the error response before the client reads it.
LINGER_MAX_BYTES = 4 * 2**20
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ServeSettings:
    """Address, bearer token, request limits and batching of a reward server."""

    host: str = "127.0.0.1"
    port: int = 8000
    # repr=False keeps the token out of any log line or traceback that prints the settings
    token: str | None = field(default=None, repr=False)
    max_items: int = 1024
    max_body_bytes: int = 16 * 2**20
    max_tokens: int = 8192
    batch_size: int = 16
    max_wait_ms: float = 5.0
    max_length: int = 512
    text_format: str = "auto"

    def validate(self) -> None:
        """Raise ``UmmrmError`` for a value out of range, or for a non-loopback host without a token."""
        for name in ("max_items", "max_body_bytes", "max_tokens", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise UmmrmError(f"{name}={value} is invalid; use at least 1.")
        if self.max_wait_ms < 0:
            raise UmmrmError(f"max_wait_ms={self.max_wait_ms} is invalid; use 0 or more.")
        if not 0 <= self.port <= 65535:
            raise UmmrmError(f"port={self.port} is invalid; use 0 to 65535 (0 picks a free port).")
        if self.token is not None and not self.token:
            raise UmmrmError("the bearer token is empty; give a non-empty token or none.")
        if not self.token and not is_loopback(self.host):
            raise UmmrmError(
                f"host {self.host!r} is not a loopback address, so the server needs a bearer token; give "
                f"--token-file FILE or set {TOKEN_ENVIRONMENT_VARIABLE}, or serve on 127.0.0.1."
            )


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is ``localhost`` or a loopback IP address; other host names count as not loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: str | None, environ=os.environ) -> str | None:
    """Return the bearer token from ``token_file`` (stripped), else from ``UMMRM_SERVE_TOKEN``, else None."""
    if token_file is not None:
        path = Path(token_file)
        try:
            token = path.read_text().strip()
        except OSError as error:
            raise UmmrmError(f"cannot read the token file {path}: {error.strerror}.") from error
        if not token:
            raise UmmrmError(f"the token file {path} is empty; write the token into it.")
        return token
    token = environ.get(TOKEN_ENVIRONMENT_VARIABLE, "").strip()
    return token or None


class RequestError(Exception):
    """A request the server rejects: the HTTP status and the message sent as ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class ScoringError(Exception):
    """The model failed on a batch, or returned a reward that is not finite."""


# ---------------------------------------------------------------- batching

@dataclass
class _Job:
    sequences: list[list[int]]
    future: Future


_STOP = object()


class RewardBatcher:
    """Runs the model on one worker thread, batching the items of concurrent requests.

    The worker takes the first waiting request, then adds requests that arrive within ``max_wait_ms``
    until the batch contains at least ``batch_size`` items. ``score_sequences`` then runs the collected
    items ``batch_size`` at a time. A request is never split across two rounds, so a round can contain
    more than ``batch_size`` items.
    """

    def __init__(self, model, pad_token_id: int, batch_size: int, max_wait_ms: float):
        from ummrm.rewards import score_sequences

        self.model = model
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size
        self.max_wait_seconds = max_wait_ms / 1000
        self.score_function = score_sequences
        self.forward_passes = 0
        self.items_scored = 0
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ummrm-reward-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, sequences: list[list[int]]) -> Future:
        """Queue token id sequences; the future resolves to their rewards or to a ``ScoringError``."""
        job = _Job(sequences, Future())
        with self._lock:
            if self._closed:
                raise RequestError(503, "the server is shutting down; send the request again after it restarts.")
            self._queue.put(job)
        return job.future

    def close(self) -> None:
        """Score every request queued so far, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # queued after every accepted job, so the worker finishes them all before it stops
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is _STOP:
                break
            jobs = [job]
            items = len(job.sequences)
            deadline = time.monotonic() + self.max_wait_seconds
            while items < self.batch_size:
                remaining = deadline - time.monotonic()
                try:
                    waiting = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is _STOP:
                    stopping = True
                    break
                jobs.append(waiting)
                items += len(waiting.sequences)
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        sequences = [sequence for job in jobs for sequence in job.sequences]
        try:
            rewards = self.score_function(self.model, sequences, self.pad_token_id, self.batch_size)
        except Exception as error:  # noqa: BLE001 - any model failure goes to the waiting requests, and the worker keeps serving
            logger.exception("the model failed on a batch of %d items from %d requests", len(sequences), len(jobs))
            failure = ScoringError(f"the model failed on this request's batch: {type(error).__name__}: {error}")
            for job in jobs:
                job.future.set_exception(failure)
            return
        self.forward_passes += math.ceil(len(sequences) / self.batch_size)
        self.items_scored += len(sequences)
        start = 0
        for job in jobs:
            job.future.set_result(rewards[start : start + len(job.sequences)])
            start += len(job.sequences)


# ---------------------------------------------------------------- requests

class RewardService:
    """Validates and encodes requests, gets their rewards from the batcher and keeps the counters."""

    def __init__(self, model, tokenizer, model_reference: str, settings: ServeSettings):
        from ummrm.rewards import RewardEncoder

        self.tokenizer = tokenizer
        self.model_reference = model_reference
        self.settings = settings
        self.score_encoder = RewardEncoder(tokenizer, max_length=settings.max_length, text_format=settings.text_format)
        self.query_encoder = RewardEncoder(tokenizer, max_length=settings.max_length, text_format="plain")
        self.batcher = RewardBatcher(model, tokenizer.pad_token_id, settings.batch_size, settings.max_wait_ms)
        # a fast tokenizer's Rust backend may fail with "Already borrowed" when threads share it
        self._tokenizer_lock = threading.Lock()
        self._counts_lock = threading.Condition()
        self.status_counts: Counter = Counter()
        self.active_requests = 0

    # -- authorization and bookkeeping

    def authorize(self, header: str | None) -> None:
        """Raise a 401 ``RequestError`` unless ``header`` is ``Bearer <token>`` (or the server has no token)."""
        token = self.settings.token
        if token is None:
            return
        scheme, _, credentials = (header or "").strip().partition(" ")
        # compare_digest takes time independent of where the strings differ, so timing reveals nothing of the token
        valid = scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode())
        if not valid:
            raise RequestError(
                401, "missing or invalid bearer token; send the header `Authorization: Bearer <token>`.",
                headers={"WWW-Authenticate": 'Bearer realm="ummrm"'},
            )

    def begin_request(self) -> None:
        with self._counts_lock:
            self.active_requests += 1

    def end_request(self, status: int) -> None:
        with self._counts_lock:
            self.active_requests -= 1
            self.status_counts[str(status)] += 1
            self._counts_lock.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in progress; return False if some still are after ``timeout`` seconds."""
        with self._counts_lock:
            return self._counts_lock.wait_for(lambda: self.active_requests == 0, timeout)

    # -- endpoints

    def health(self) -> dict:
        import torch

        settings = self.settings
        with self._counts_lock:
            responses = dict(self.status_counts)
        return {
            "status": "ok",
            "model": self.model_reference,
            "text_format": self.score_encoder.text_format,
            "max_length": settings.max_length,
            "limits": {"max_items": settings.max_items, "max_body_bytes": settings.max_body_bytes, "max_tokens": settings.max_tokens},
            "batch_size": settings.batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "torch_threads": torch.get_num_threads(),
            "items_scored": self.batcher.items_scored,
            "forward_passes": self.batcher.forward_passes,
            "responses": responses,
        }

    def get_reward(self, body) -> dict:
        """Return ``{"rewards": [...]}`` for ``{"query": [texts]}``, each text encoded as plain text.

        NOTE: a tokenizer that adds a BOS token to plain text (Llama's does, SmolLM2's does not) adds a
        second one to a query that the policy decoded with its BOS, as ``ummrm score`` would.
        """
        if not isinstance(body, dict):
            raise RequestError(422, f"the request body must be a JSON object with a `query` list of texts; got a JSON {_json_type(body)}.")
        queries = self._field_list(body, "query", "texts")
        sequences = []
        for index, text in enumerate(queries):
            name = f"query[{index}]"
            if not isinstance(text, str):
                raise RequestError(422, f"{name} must be a string; got a JSON {_json_type(text)}.")
            if not text:
                raise RequestError(422, f"{name} is an empty string; send the whole prompt and response text.")
            sequences.append(self._encode(name, self.query_encoder, (), "", text, False))
        return {"rewards": self._rewards(sequences)}

    def score(self, body) -> dict:
        """Return ``{"rewards": [...]}`` for ``{"items": [{"prompt", "response"}, ...]}``, as ``ummrm score`` does."""
        if not isinstance(body, dict):
            raise RequestError(422, f"the request body must be a JSON object {{\"items\": [...]}}; got a JSON {_json_type(body)}.")
        items = self._field_list(body, "items", "{prompt, response} objects")
        sequences = []
        for index, item in enumerate(items):
            name = f"items[{index}]"
            if not isinstance(item, dict):
                raise RequestError(422, f"{name} must be an object with `prompt` and `response`; got a JSON {_json_type(item)}.")
            for key in ("prompt", "response"):
                if key not in item:
                    raise RequestError(422, f"{name} is missing the field `{key}`.")
            response = item["response"]
            if not isinstance(response, str):
                raise RequestError(422, f"{name}.response must be a string; got a JSON {_json_type(response)}.")
            if not response:
                raise RequestError(422, f"{name}.response is an empty string.")
            messages, prompt_text, messages_only = self._prompt(name, item["prompt"])
            sequences.append(self._encode(name, self.score_encoder, messages, prompt_text, response, messages_only))
        return {"rewards": self._rewards(sequences)}

    # -- helpers

    def _field_list(self, body: dict, key: str, contents: str) -> list:
        if key not in body:
            raise RequestError(422, f"the request body is missing the field `{key}`, a list of {contents}.")
        values = body[key]
        if not isinstance(values, list):
            raise RequestError(422, f"`{key}` must be a list of {contents}; got a JSON {_json_type(values)}.")
        if not values:
            raise RequestError(422, f"`{key}` is an empty list; send at least one item.")
        if len(values) > self.settings.max_items:
            raise RequestError(
                422, f"`{key}` has {len(values)} items, over the limit of {self.settings.max_items} items per request (--max-items); split the request."
            )
        return values

    def _prompt(self, name: str, prompt) -> tuple[tuple[dict, ...], str, bool]:
        if isinstance(prompt, str) and not prompt:
            raise RequestError(422, f"{name}.prompt is an empty string.")
        try:
            return prompt_forms(prompt, 0)
        except UmmrmError:
            raise RequestError(
                422, f"{name}.prompt must be a string or a non-empty list of {{\"role\", \"content\"}} messages with roles "
                f"{', '.join(ROLES)} and string content; got a JSON {_json_type(prompt)}."
            ) from None

    def _encode(self, name: str, encoder, messages, prompt_text: str, response: str, messages_only: bool) -> list[int]:
        """Return the token ids of one item, rejecting it when its whole text has more than ``max_tokens`` tokens."""
        with self._tokenizer_lock:
            try:
                text, _ = encoder.render(messages, prompt_text, response, messages_only)
                # Counted before truncation to max_length. Like the encoder, this adds special tokens to plain text only.
                count = len(self.tokenizer(text, add_special_tokens=encoder.text_format == "plain")["input_ids"])
                if count > self.settings.max_tokens:
                    raise RequestError(
                        422, f"{name} has {count} tokens, over the limit of {self.settings.max_tokens} tokens per item (--max-tokens)."
                    )
                return encoder.encode(messages, prompt_text, response, messages_only)
            except UmmrmError as error:
                raise RequestError(422, f"{name}: {error}") from None

    def _rewards(self, sequences: list[list[int]]) -> list[float]:
        future = self.batcher.submit(sequences)
        try:
            rewards = future.result(timeout=RESULT_TIMEOUT_SECONDS)
        except FutureTimeoutError:
            raise RequestError(503, f"timed out after {RESULT_TIMEOUT_SECONDS:g} s waiting for the model; the server is overloaded.") from None
        for index, reward in enumerate(rewards):
            if not math.isfinite(reward):
                raise ScoringError(f"the model returned a non-finite reward ({reward}) for item {index}.")
        return rewards


def _json_type(value) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- HTTP

class _RequestHandler(BaseHTTPRequestHandler):
    """Routes requests to the ``RewardService`` and sends every response, errors included, as JSON."""

    protocol_version = "HTTP/1.1"
    server_version = "ummrm-serve"
    timeout = CONNECTION_TIMEOUT_SECONDS

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        service: RewardService = self.server.service
        path = urlsplit(self.path).path
        self.body_read = False
        status = 500
        service.begin_request()
        try:
            service.authorize(self.headers.get("Authorization"))
            if path not in ROUTES:
                raise RequestError(404, f"unknown path {path!r}; the server handles {ENDPOINTS}.")
            route_method, handler_name = ROUTES[path]
            if method != route_method:
                raise RequestError(405, f"{method} is not allowed on {path}; use {route_method}.", headers={"Allow": route_method})
            if method == "POST":
                payload = getattr(service, handler_name)(self._read_json())
            else:
                payload = getattr(service, handler_name)()
            status = 200
            self._send_json(200, payload)
        except RequestError as error:
            status = error.status
            # the message can quote request text but never the token
            logger.warning("%s %s from %s: %d %s", method, path, self.client_address[0], error.status, error.message)
            self._send_json(error.status, {"error": error.message}, error.headers)
        except ScoringError as error:
            logger.error("%s %s from %s: 500 %s", method, path, self.client_address[0], error)
            self._send_json(500, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 - an unexpected failure answers 500 and the server keeps serving
            logger.exception("%s %s from %s: 500 internal error", method, path, self.client_address[0])
            self._send_json(500, {"error": f"internal error: {type(error).__name__}: {error}"})
        finally:
            service.end_request(status)

    def _body_length(self) -> int:
        """Return the request body's length from Content-Length. A request without the header has no body."""
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "chunked request bodies are not supported; send the body with a Content-Length header.")
        header = self.headers.get("Content-Length", "0")
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(400, f"invalid Content-Length header {header!r}; expected a byte count.")
        return length

    def _read_json(self):
        limit = self.server.service.settings.max_body_bytes
        length = self._body_length()
        if length > limit:
            raise RequestError(413, f"request body is {length} bytes, over the limit of {limit} bytes (--max-body-bytes); split the request.")
        body = self.rfile.read(length)
        self.body_read = True
        if len(body) < length:
            self.close_connection = True
            raise RequestError(400, f"request body ended after {len(body)} of {length} bytes.")
        if not body:
            raise RequestError(400, "request body is empty; send a JSON object.")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as error:
            # ValueError covers invalid JSON and invalid UTF-8, and RecursionError covers very deep nesting
            raise RequestError(400, f"request body is not valid JSON: {error}") from None

    def _discard_unread_body(self) -> None:
        """Read and drop a body the request handling did not read, or mark the connection for closing.

        A body left in the stream would be parsed as the next request on this connection.
        """
        self.body_read = True
        try:
            length = self._body_length()
        except RequestError:
            length = None
        if length is not None and length <= self.server.service.settings.max_body_bytes:
            self.rfile.read(length)
        else:
            self.close_connection = True
            self.linger = True

    def _send_json(self, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        try:
            if not getattr(self, "body_read", True):
                self._discard_unread_body()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except OSError as error:
            # BrokenPipeError, ConnectionResetError and socket timeouts: the client is gone
            self.close_connection = True
            logger.info("%s %s from %s: the %d response was not sent: %s", self.command, self.path, self.client_address[0], status, error)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # http.server calls this for requests it cannot parse: a bad request line, long headers, an unknown method
        logger.warning("request from %s rejected by http.server: %d %s", self.client_address[0], code, message or "")
        self.close_connection = True
        self.body_read = True
        self.linger = True
        self._send_json(code, {"error": message or HTTPStatus(code).phrase})

    def finish(self) -> None:
        super().finish()
        if not getattr(self, "linger", False):
            return
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            dropped = 0
            while dropped < LINGER_MAX_BYTES and time.monotonic() < deadline:
                chunk = self.connection.recv(65536)
                if not chunk:
                    break
                dropped += len(chunk)
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        logger.debug("%s %s", self.client_address[0], format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: RewardService):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.service = service
        super().__init__(address, _RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's fully qualified name, a DNS look-up the server never needs
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


# ---------------------------------------------------------------- server

class RewardServer:
    """A reward model served over HTTP: binds at construction, serves after ``start`` until ``stop``.

    Built on the standard library's ``ThreadingHTTPServer`` (one thread per connection) so that serving
    adds no dependency. The model's forward passes, which dominate the time per request, run on a single
    worker thread whatever the number of connections.
    """

    def __init__(self, model, tokenizer, model_reference: str, settings: ServeSettings):
        settings.validate()
        self.settings = settings
        self.service = RewardService(model, tokenizer, model_reference, settings)
        try:
            self.httpd = _HTTPServer((settings.host, settings.port), self.service)
        except OSError as error:
            raise UmmrmError(
                f"cannot listen on {settings.host} port {settings.port}: {error.strerror or error}; choose another --host or --port."
            ) from error
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ummrm-http", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.settings.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> None:
        settings = self.settings
        self.service.batcher.start()
        self._thread.start()
        logger.info(
            "serving %s at %s (POST /get_reward, POST /score, GET /health); text format %s, max length %d tokens; "
            "limits: %d items per request, %d bytes per body, %d tokens per item; batches of %d items, waiting up to %g ms; "
            "bearer token %s",
            self.service.model_reference, self.url, self.service.score_encoder.text_format, settings.max_length,
            settings.max_items, settings.max_body_bytes, settings.max_tokens, settings.batch_size, settings.max_wait_ms,
            "required" if settings.token else "not required",
        )

    def stop(self) -> None:
        """Stop accepting requests, let those in progress get their rewards, then stop the worker."""
        if self._thread.is_alive():
            self.httpd.shutdown()
        if not self.service.wait_idle(STOP_GRACE_SECONDS):
            logger.warning("stopping with %d requests still in progress after %g s", self.service.active_requests, STOP_GRACE_SECONDS)
        self.service.batcher.close()
        self.httpd.server_close()
        health = self.service.health()
        logger.info(
            "stopped serving %s: %d items scored in %d forward passes; responses by status: %s",
            self.service.model_reference, health["items_scored"], health["forward_passes"], health["responses"] or "none",
        )

    def __enter__(self) -> "RewardServer":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def serve(model_reference: str, settings: ServeSettings) -> None:
    """Load a reward model and serve it until SIGINT or SIGTERM."""
    from ummrm.models import load_reward_model

    # checked before the model loads, so that a host without a token fails at once
    settings.validate()
    model, tokenizer = load_reward_model(model_reference)
    server = RewardServer(model, tokenizer, model_reference, settings)
    stop_requested = threading.Event()

    def request_stop(signal_number, frame) -> None:
        logger.info("received %s; shutting down", signal.Signals(signal_number).name)
        stop_requested.set()

    previous_handlers = {number: signal.signal(number, request_stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        while not stop_requested.wait(timeout=1.0):
            pass
    finally:
        server.stop()
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
