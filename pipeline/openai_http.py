"""The pipeline's backend for an OpenAI-compatible /chat/completions endpoint (vLLM, SGLang, a hosted API).

Plain urllib, threads for concurrency. Images travel as base64 data: URLs. Each request gets --timeout-s from
connecting to the last byte (a whole-request deadline: a server that trickles a byte at a time cannot hold it
longer) and --max-retries retries with exponential backoff, jitter and Retry-After, on timeouts, connection
errors, HTTP 408/409/429/5xx, bodies cut short and malformed bodies. HTTP 401/403/404 raise BackendError: no
request can succeed with a wrong key, model or URL. A reasoning model's separate "reasoning_content" /
"reasoning" field is returned as ChatResult.reasoning.
"""

import base64
import http.client
import io
import itertools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from PIL import Image

from pipeline.backends import BackendError, ChatRequest, ChatResult

FATAL_HTTP_STATUS = (401, 403, 404)  # wrong key, model or URL: no request can succeed
RETRYABLE_HTTP_STATUS = (408, 409, 429)  # plus every 5xx


class MalformedResponse(ValueError):
    """A 200 response whose body is not a chat completion."""


def image_data_url(path: str) -> str:
    """A base64 data: URL of the image file; PNG and JPEG are sent as they are, other formats as PNG."""
    with Image.open(path) as image:
        if image.format in ("PNG", "JPEG"):
            mime, payload = f"image/{image.format.lower()}", Path(path).read_bytes()
        else:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            mime, payload = "image/png", buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def parse_chat_response(raw: bytes) -> ChatResult:
    """The reply of a /chat/completions body; MalformedResponse when the body is not one."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        message = choice["message"]
    except (ValueError, KeyError, IndexError, TypeError) as error:
        raise MalformedResponse(f"not a chat completion ({type(error).__name__}: {error}): {raw[:200]!r}") from None
    if not isinstance(message, dict):
        raise MalformedResponse(f"message is a {type(message).__name__}, not an object: {raw[:200]!r}")
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise MalformedResponse(f"message.content is a {type(content).__name__}: {raw[:200]!r}")
    reasoning = message.get("reasoning_content") or message.get("reasoning")  # vLLM / DeepSeek spell it both ways
    return ChatResult(text=content, reasoning=reasoning if isinstance(reasoning, str) else None,
                      truncated=choice.get("finish_reason") == "length")


def error_body(error: urllib.error.HTTPError) -> str:
    """The start of an HTTP error's body, as much of it as arrived (a failing server may cut it short)."""
    try:
        body = error.read()
    except http.client.IncompleteRead as cut:
        body = cut.partial
    except (OSError, http.client.HTTPException):
        body = b""
    return body[:300].decode("utf-8", "replace")


def retry_after_s(headers) -> float:
    """The Retry-After header in seconds; 0 when absent or not a number (an HTTP date, say)."""
    try:
        return max(0.0, float(headers.get("Retry-After", "0"))) if headers else 0.0
    except ValueError:
        return 0.0


class RequestDeadline:
    """The end of one request, `seconds` from now: then it shuts down the sockets it watches, so that a blocked
    read fails at once. A socket timeout bounds each read alone, and a server that trickles a byte at a time
    never trips it."""

    def __init__(self, seconds: float):
        self.end, self.expired, self.timers = time.monotonic() + seconds, False, []

    def watch(self, sock: socket.socket) -> None:
        timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._expire, (sock,))
        timer.daemon = True
        timer.start()
        self.timers.append(timer)

    def _expire(self, sock: socket.socket) -> None:
        self.expired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()


class _WatchedConnection:
    """Mixed into http.client's connections: once connected, the socket is watched by the request's deadline."""

    def __init__(self, *args, deadline: RequestDeadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTPConnection(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handler with watched connections (proxies and errors work as usual)."""

    def __init__(self, deadline: RequestDeadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, request):
        return self.do_open(_WatchedHTTPConnection, request, deadline=self.deadline)

    def https_open(self, request):
        return self.do_open(_WatchedHTTPSConnection, request, deadline=self.deadline)


class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint over HTTP (urllib; threads for concurrency)."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, concurrency: int = 8,
                 timeout_s: float = 600.0, max_retries: int = 5, backoff_s: float = 2.0, max_backoff_s: float = 60.0):
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("OpenAIBackend: need concurrency >= 1, max_retries >= 0, timeout_s > 0")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s

    def payload(self, request: ChatRequest) -> bytes:
        """The JSON body: OpenAI's vision message format, the image as a data: URL before the text."""
        messages = [{"role": "system", "content": request.system}] if request.system else []
        if request.image:
            content = [{"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
                       {"type": "text", "text": request.user}]
        else:
            content = request.user
        messages.append({"role": "user", "content": content})
        return json.dumps({"model": self.model, "messages": messages, "max_tokens": request.max_tokens,
                           "temperature": request.temperature}).encode("utf-8")

    def _attempt(self, payload: bytes) -> ChatResult | tuple[str, bool, float]:
        """One POST within timeout_s in all: the result, or (error, retryable, Retry-After seconds)."""
        deadline = RequestDeadline(self.timeout_s)
        try:
            outcome = self._post(payload, deadline)
        finally:
            deadline.cancel()
        if deadline.expired:  # whatever the cut-off read made of it
            return f"timed out: no complete reply within {self.timeout_s:g} s", True, 0.0
        return outcome

    def _post(self, payload: bytes, deadline: RequestDeadline) -> ChatResult | tuple[str, bool, float]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        opener = urllib.request.build_opener(_DeadlineHandler(deadline))
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = error_body(error)
            if error.code in FATAL_HTTP_STATUS:
                raise BackendError(f"{self.url}: HTTP {error.code} {detail}; check OPENAI_BASE_URL, OPENAI_API_KEY "
                                   f"and --model ({self.model!r})") from None
            return (f"HTTP {error.code}: {detail}", error.code in RETRYABLE_HTTP_STATUS or error.code >= 500,
                    retry_after_s(error.headers))
        except (OSError, http.client.HTTPException) as error:  # timeouts, refused / reset connections, cut bodies
            return f"{type(error).__name__}: {error}", True, 0.0
        try:
            return parse_chat_response(raw)
        except MalformedResponse as error:
            return f"malformed response: {error}", True, 0.0

    def send(self, request: ChatRequest) -> ChatResult:
        """One request with retries; a failure after the last retry is returned, not raised."""
        try:
            payload = self.payload(request)
        except OSError as error:
            return ChatResult(error=f"cannot read the image: {error}")
        retries = 0
        while True:
            outcome = self._attempt(payload)
            if isinstance(outcome, ChatResult):
                return outcome
            error, retryable, retry_after = outcome
            if not retryable or retries == self.max_retries:
                return ChatResult(error=f"{error} (after {retries + 1} attempt(s))")
            delay = self.backoff_s * 2**retries * random.uniform(0.5, 1.5)  # jitter: clients do not retry in step
            time.sleep(min(self.max_backoff_s, max(delay, retry_after)))
            retries += 1

    def complete(self, requests: list[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        # A sliding window of `concurrency` requests: payloads (base64 images) exist only while in flight.
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="chat")
        queue = iter(enumerate(requests))
        in_flight = {pool.submit(self.send, request): index
                     for index, request in itertools.islice(queue, self.concurrency)}
        try:
            while in_flight:
                finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = in_flight.pop(future)
                    for next_index, next_request in itertools.islice(queue, 1):
                        in_flight[pool.submit(self.send, next_request)] = next_index
                    yield index, future.result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

