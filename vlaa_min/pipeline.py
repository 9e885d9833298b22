"""The six-step VLAA-Thinking data pipeline: (image, question, answer) records -> SFT and RL files for our trainers.

Each step reads one JSONL file and writes one (the split step writes two), in data.py's record format:

    1 metadata  import a source file (JSON array or JSONL): id, image, question, gt (the source's "gt", else its
                "answer"), verifier_type, meta; every record validated by data.py (image exists and decodes, ...)
    2 caption   a vision model writes a detailed caption of each image                          -> "caption"
    3 distill   a text-only reasoner gets caption + question and answers as if it saw the image -> "ds_answer"
                (its raw output, reasoning in <think>) and "answer" = <think>..</think> <answer>..</answer>
    4 rewrite   answers that mention a caption / description / rationale are rewritten by an LLM to remove the
                mentions; dropped when the rewrite changes the length by more than 15 words, still mentions one,
                or breaks the tags
    5 verify    an LLM judge compares the final answer with the ground truth (Yes / No); only Yes is kept
    6 split     traces with an "aha" word (the paper's list, lower-cased substring match) -> RL file, the rest ->
                SFT file; each record re-validated as train_sft.py / train_grpo.py load it

Backends (steps 2-5), one small interface, `complete(requests) -> (index, ChatResult)` pairs as they finish:
    local:PATH        our engine (vlaa_min/generate.py) on a local checkpoint, prompts in batches of --batch-size
    openai            an OpenAI-compatible /chat/completions endpoint: base URL from OPENAI_BASE_URL (default
                      https://api.openai.com/v1), key from OPENAI_API_KEY (no header when unset), --model;
                      images as base64 data: URLs; --concurrency requests in flight, each within --timeout-s from
                      connecting to the last byte, and --max-retries retries with exponential backoff (and jitter,
                      honouring Retry-After) on timeouts, connection errors, HTTP 408/409/429/5xx, bodies cut short
                      and malformed bodies;
                      HTTP 401/403/404 stop the step at once (no request can succeed), and so do 20 failed
                      requests in a row (a server that is down)
    openai:BASE_URL   the same with another base URL (e.g. a second vLLM server)
    A reasoning model's separate "reasoning_content" / "reasoning" field becomes the <think> block of step 3.

Resumable: every step appends each finished record to OUT (kept) or OUT.dropped.jsonl (id, reason, detail) and
flushes, and on start skips the ids already in either file, so a crash or Ctrl-C loses at most the records in
flight. A torn last line (a crash mid-write) is cut off and that record redone. A record whose request failed
(retries used up, a rejected request) is written nowhere: it is reported and a rerun retries it; the command then
exits with status 1. OUT.stats.json holds the counts: kept, dropped by reason, failed, pending.

Choices the paper leaves open (it names the models, not the prompts; ours are in vlaa_min/prompts.py):
- Captions are per image: records sharing an image (and identical requests in general) cost one request. The
  captioner does not see the question. A caption cut at --caption-max-tokens is kept (it is still true); a
  reasoning trace or rewrite cut at its limit is dropped ("truncated").
- Step 4 sends only answers that mention one of the words to the rewriter; the others pass unchanged. Length is
  counted in whitespace-separated words of the whole answer, tags not counted.
- Step 5 keeps an answer equal to the ground truth (case, spaces and a final full stop aside) without asking
  the judge (meta.pipeline.verified_by = "exact"); the judge's verdict is its first word, else its last.
- Step 6 looks for aha words in the whole (rewritten) answer, think block and answer block.
- The local backend folds a step's system prompt into the user turn: Processor.encode_prompt always uses the
  paper's VL-Thinking system prompt.

Usage:
    python -m vlaa_min.pipeline all --source toy/rl.json --images toy/images --workdir runs/pipeline \
        --backend local:runs/base/model
    export OPENAI_BASE_URL=http://localhost:8000/v1 OPENAI_API_KEY=...
    python -m vlaa_min.pipeline all --source raw.jsonl --images images --workdir runs/pipeline --backend openai \
        --caption-model gpt-4o --distill-model deepseek-r1 --rewrite-model gpt-4o-mini --verify-model gpt-4o-mini
    python -m vlaa_min.pipeline caption --in runs/pipeline/1_metadata.jsonl --out runs/pipeline/2_caption.jsonl \
        --images images --backend openai --model gpt-4o        # one step; steps: metadata caption distill ...
    python train_sft.py --data runs/pipeline/sft.jsonl --images images ...   # and train_grpo.py --data .../rl.jsonl
"""

import argparse
import base64
import functools
import http.client
import io
import itertools
import json
import os
import random
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image
from tqdm import tqdm

import data
import rewards
from vlaa_min import prompts
from vlaa_min.cli import build_parser, config_to_dict, print_config

STEPS = ("metadata", "caption", "distill", "rewrite", "verify", "split")
# The paper's "aha" words (SPEC.md step 6); matched as lower-cased substrings, so "check" also catches "checked".
AHA_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")
PIPELINE_FIELDS = ("answer", "ds_answer", "caption")  # written by the pipeline, never imported from a source
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
FATAL_HTTP_STATUS = (401, 403, 404)  # wrong key, model or URL: no request can succeed
RETRYABLE_HTTP_STATUS = (408, 409, 429)  # plus every 5xx
FAILURES_SHOWN = 5
FAILURES_IN_A_ROW_TO_STOP = 20  # a server that is down fails every request: stop instead of trying them all


class PipelineError(ValueError):
    """Bad input to a step: the message names the file, line, record and field."""


class BackendError(RuntimeError):
    """A backend that cannot work at all (wrong URL, key or model); the step stops."""


# ----------------------------------------------------------------------------------------------------------------
# Text rules of the steps (pure functions)

_TAGS = re.compile(r"</?(?:think|answer)>", re.IGNORECASE)


def word_count(text: str) -> int:
    """Whitespace-separated words, the <think>/<answer> tags not counted."""
    return len(_TAGS.sub(" ", text).split())


def length_change(before: str, after: str) -> int:
    """How many words a rewrite added or removed (step 4 drops a change above --max-length-change)."""
    return abs(word_count(after) - word_count(before))


def mentions(text: str) -> list[str]:
    """The caption / description / rationale words in `text` (lower-cased substring match)."""
    lowered = text.lower()
    return [word for word in prompts.MENTION_WORDS if word in lowered]


def aha_words(text: str) -> list[str]:
    """The paper's aha words in `text` (lower-cased substring match, as the paper counts them)."""
    lowered = text.lower()
    return [word for word in AHA_WORDS if word in lowered]


def after_thinking(text: str) -> str:
    """The text after a reasoning model's last </think> (all of it when there is none)."""
    return text.rsplit("</think>", 1)[-1].strip()


def unwrap_answer(text: str) -> str:
    """The content of a single <answer> block, else the text itself."""
    answer, _ = rewards.extract_answer(text)
    return answer if answer is not None else text.strip()


def parse_reasoning(text: str) -> tuple[str, str] | str:
    """(thought, final answer) of a reasoner's output, or the reason it is unusable.

    The thought is the text before the one </think> (after <think> when present: R1 often omits the opening tag);
    the final answer is the single <answer> block after it, or all the text after it.
    """
    closings = text.count("</think>")
    if closings != 1:
        return "no_think" if closings == 0 else "several_think_blocks"
    thought, after = text.split("</think>")
    if thought.count("<think>") > 1:
        return "several_think_blocks"
    thought = thought.split("<think>")[-1].strip()
    if not thought:
        return "empty_think"
    after = after.strip()
    if "answer>" in after.lower():
        final, _ = rewards.extract_answer(after)
        if final is None:
            return "bad_answer_block"
    else:
        final = after
    return (thought, final) if final else "no_answer"


def parse_verdict(text: str) -> str | None:
    """"yes" / "no" from a judge's reply (its first word, else its last), None when it says neither."""
    words = re.findall(r"[a-z]+", unwrap_answer(after_thinking(text)).lower())
    for word in words[:1] + words[-1:]:
        if word in ("yes", "no"):
            return word
    return None


def _plain(text: str) -> str:
    """Lower-cased, spaces collapsed, a final full stop dropped (step 5's exact-match shortcut)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(".").lower()


# ----------------------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class ChatRequest:
    """One chat turn: an optional system prompt, the user's text and at most one image (a file path)."""

    user: str
    system: str | None = None
    image: str | None = None
    max_tokens: int = 1024
    temperature: float = 0.0  # 0 = greedy


@dataclass
class ChatResult:
    text: str | None = None  # the reply; None when the request failed
    reasoning: str | None = None  # a reasoning model's separate thinking (OpenAI-compatible servers only)
    truncated: bool = False  # cut at max_tokens
    error: str | None = None


class Backend(Protocol):
    def complete(self, requests: list[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        """Answer every request; yields (index into requests, result) as they finish, in any order."""


class LocalBackend:
    """Our generation engine on a local checkpoint (the toy model or a real Qwen2-VL / Qwen2.5-VL).

    The checkpoint is loaded on the first request, so a rerun with nothing left to do loads nothing."""

    def __init__(self, checkpoint: str, *, device: str = "auto", precision: str = "auto", batch_size: int = 8,
                 seed: int = 0):
        if not (Path(checkpoint) / "config.json").is_file():
            raise PipelineError(f"local backend: {checkpoint}/config.json not found (expected a checkpoint folder)")
        self.checkpoint, self.device_name, self.precision_name = checkpoint, device, precision
        self.batch_size, self.seed = batch_size, seed
        self.model = None

    def _load(self) -> None:
        import torch  # here, so that the HTTP backend runs without loading torch

        from vlaa_min.generate import Engine
        from vlaa_min.model import VLModel
        from vlaa_min.processor import Processor
        from vlaa_min.runtime import resolve_device, resolve_dtype

        self.device = resolve_device(self.device_name)
        self.precision = resolve_dtype(self.precision_name, self.device)
        self.processor = Processor.from_pretrained(self.checkpoint)
        weights_dtype = torch.float32 if self.device.type == "cpu" else self.precision
        self.model = VLModel.from_pretrained(self.checkpoint, dtype=weights_dtype, device=self.device).eval()
        self.engine = Engine(self.model, pad_token_id=self.processor.pad_token_id)
        self.generator = torch.Generator(self.device).manual_seed(self.seed)

    def _encode(self, request: ChatRequest):
        text = f"{request.system}\n\n{request.user}" if request.system else request.user
        images = []
        if request.image:
            with Image.open(request.image) as image:
                images.append(image.convert("RGB"))
        return self.processor.encode_prompt(text, images)

    def complete(self, requests: list[ChatRequest]) -> Iterator[tuple[int, ChatResult]]:
        from vlaa_min.generate import SamplingParams
        from vlaa_min.runtime import autocast

        if requests and self.model is None:
            self._load()
        # One SamplingParams per batch: group requests by their limits first.
        by_settings: dict[tuple[int, float], list[int]] = {}
        for index, request in enumerate(requests):
            by_settings.setdefault((request.max_tokens, request.temperature), []).append(index)
        for (max_tokens, temperature), indices in by_settings.items():
            params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature or 1.0,
                                    greedy=temperature == 0, stop_token_ids=self.processor.stop_token_ids)
            for start in range(0, len(indices), self.batch_size):
                encoded, rows = [], []
                for index in indices[start : start + self.batch_size]:
                    try:
                        encoded.append(self._encode(requests[index]))
                        rows.append(index)
                    except (OSError, ValueError) as error:  # unreadable image, special-token text, ...
                        yield index, ChatResult(error=f"cannot encode the prompt: {error}")
                if not encoded:
                    continue
                batch = self.processor.collate_prompts(encoded).to(self.device)
                with autocast(self.device, self.precision):
                    rollout = self.engine.generate(batch, 1, params, self.generator)
                for row, index in enumerate(rows):
                    length = int(rollout.completion_lengths[row])
                    text = self.processor.decode(rollout.completion_ids[row, :length])
                    yield index, ChatResult(text=text, truncated=rollout.finish_reasons[row] == "length")


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


def make_backend(spec: str, model: str | None, cfg: "PipelineConfig") -> Backend:
    """A backend from a --backend spec: local:PATH, openai or openai:BASE_URL."""
    if spec.startswith("local:"):
        return LocalBackend(spec.removeprefix("local:"), device=cfg.device, precision=cfg.precision,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    if spec == "openai" or spec.startswith("openai:"):
        if not model:
            raise PipelineError(f"backend {spec!r} needs a model name: --model (or --<step>-model)")
        base_url = spec.removeprefix("openai").removeprefix(":") or os.environ.get("OPENAI_BASE_URL") \
            or DEFAULT_OPENAI_BASE_URL
        return OpenAIBackend(base_url, model, os.environ.get("OPENAI_API_KEY"), concurrency=cfg.concurrency,
                             timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s)
    raise PipelineError(f"backend {spec!r}: expected local:PATH, openai or openai:BASE_URL")


# ----------------------------------------------------------------------------------------------------------------
# Resumable step files


def sidecar(out: Path, suffix: str) -> Path:
    """OUT.jsonl -> OUT<suffix> (e.g. 2_caption.dropped.jsonl, 2_caption.stats.json)."""
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + suffix)


def cut_torn_tail(path: Path) -> bool:
    """Truncate the file after its last newline (a crash mid-write leaves a partial line); True if it cut."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        content = f.read()
        if content.endswith(b"\n"):
            return False
        f.truncate(content.rfind(b"\n") + 1)
    return True


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; a line that is not a JSON object raises PipelineError."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PipelineError(f"{where}: invalid JSON ({error.msg}); a torn last line means the step that "
                                    f"wrote this file was interrupted: rerun it") from None
            if not isinstance(record, dict):
                raise PipelineError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def read_step_input(path, required: tuple[str, ...]) -> list[dict]:
    """The records of a step's input file; each needs a unique string "id" and the `required` fields."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: input file not found")
    records, seen = [], {}
    for where, record in read_jsonl(path):
        record_id = record.get("id")
        if not isinstance(record_id, str) or not record_id:
            raise PipelineError(f"{where}: id: missing or not a string (run the metadata step first)")
        if record_id in seen:
            raise PipelineError(f"{where} [id {record_id}]: id: duplicate of {seen[record_id]}")
        seen[record_id] = where
        for name in required:
            if record.get(name) in (None, ""):
                raise PipelineError(f"{where} [id {record_id}]: {name}: missing (written by an earlier step)")
        records.append(record)
    return records


@dataclass
class Outcome:
    """What a step decided for one record: kept (record, and which output file) or dropped (reason)."""

    record: dict | None = None
    reason: str | None = None
    detail: str = ""
    output: str = "out"


def drop(reason: str, detail: str = "") -> Outcome:
    return Outcome(reason=reason, detail=detail[:300])


def with_trail(record: dict, **notes) -> dict:
    """A copy of the record with `notes` added to meta["pipeline"] (what the steps decided)."""
    meta = dict(record.get("meta") or {})
    meta["pipeline"] = {**meta.get("pipeline", {}), **notes}
    return {**record, "meta": meta}


class StepOutput:
    """A step's files, appended and flushed per record: the kept records (one file per output name),
    OUT.dropped.jsonl and, at the end, OUT.stats.json. On open, a torn last line is cut and the ids already
    written are loaded into `done`."""

    def __init__(self, step: str, outputs: dict[str, Path]):
        self.step, self.started = step, time.perf_counter()
        self.paths = {name: Path(path) for name, path in outputs.items()}
        self.dropped_path = sidecar(self.paths["out"], ".dropped.jsonl")
        self.stats_path = sidecar(self.paths["out"], ".stats.json")
        self.done: set[str] = set()
        self.kept, self.dropped = Counter(), Counter()  # over all runs: per output name, per reason
        self.this_run, self.failures = Counter(), []
        self.files = {}
        for name, path in [*self.paths.items(), ("dropped", self.dropped_path)]:
            path.parent.mkdir(parents=True, exist_ok=True)
            if cut_torn_tail(path):
                print(f"{path}: cut a torn last line (an interrupted write); that record is redone")
            if path.exists():
                for where, record in read_jsonl(path):
                    if record.get("id") in self.done:
                        raise PipelineError(f"{where}: id {record.get('id')!r} is already in another of this "
                                            f"step's files; the step's outputs are inconsistent")
                    self.done.add(record.get("id"))
                    if name == "dropped":
                        self.dropped[record.get("reason")] += 1
                    else:
                        self.kept[name] += 1
            self.files[name] = open(path, "a", encoding="utf-8")
        self.this_run["already_done"] = len(self.done)

    def __enter__(self) -> "StepOutput":
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files.values():
            f.close()

    def write(self, record_id: str, outcome: Outcome) -> None:
        if outcome.record is not None:
            if outcome.record.get("id") != record_id:
                raise AssertionError(f"{self.step}: kept record has id {outcome.record.get('id')!r}, not {record_id!r}")
            name, line = outcome.output, outcome.record
            self.kept[name] += 1
            self.this_run["kept"] += 1
        else:
            name, line = "dropped", {"id": record_id, "reason": outcome.reason, "detail": outcome.detail}
            self.dropped[outcome.reason] += 1
            self.this_run["dropped"] += 1
        self.files[name].write(json.dumps(line, ensure_ascii=False) + "\n")
        self.files[name].flush()
        self.done.add(record_id)

    def fail(self, record_id: str, error: str) -> None:
        """The backend gave no answer: written nowhere, so a rerun retries the record."""
        self.this_run["failed"] += 1
        self.failures.append(f"{record_id}: {error}")

    def finish(self, input_count: int, config: dict | None = None) -> dict:
        """Write OUT.stats.json atomically and print a summary line; returns the stats."""
        kept, dropped = sum(self.kept.values()), sum(self.dropped.values())
        stats = {
            "step": self.step, "input": input_count, "kept": kept,
            "kept_by_file": {str(self.paths[name]): self.kept[name] for name in self.paths},
            "dropped": dropped, "dropped_by_reason": dict(self.dropped.most_common()),
            "failed": self.this_run["failed"], "pending": input_count - kept - dropped,
            "this_run": {key: self.this_run[key] for key in ("already_done", "kept", "dropped", "failed")},
            "failures": self.failures[:100], "seconds": round(time.perf_counter() - self.started, 2),
            "config": config or {},
        }
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, self.stats_path)
        reasons = ", ".join(f"{reason} {count}" for reason, count in self.dropped.most_common()) or "none"
        print(f"[{self.step}] {input_count} in -> {kept} kept, {dropped} dropped ({reasons}); "
              f"{stats['failed']} failed this run, {stats['pending']} pending -> {self.paths['out']}")
        for message in self.failures[:FAILURES_SHOWN]:
            print(f"  failed {message}")
        if self.failures:
            print(f"  {len(self.failures)} record(s) failed; rerun the same command to retry them")
        return stats


def run_requests(records: list[dict], output: StepOutput, backend: Backend, prepare, finish) -> None:
    """Ask the backend for every record not yet done and write each outcome as soon as it is known.

    prepare(record) -> ChatRequest (ask the backend) or Outcome (decided without it);
    finish(record, ChatResult) -> Outcome. Identical requests are sent once and answer all their records.
    """
    waiting: dict[ChatRequest, list[dict]] = {}
    for record in records:
        if record["id"] in output.done:
            continue
        prepared = prepare(record)
        if isinstance(prepared, Outcome):
            output.write(record["id"], prepared)
        else:
            waiting.setdefault(prepared, []).append(record)
    requests = list(waiting)
    failures_in_a_row = 0
    with tqdm(total=len(requests), desc=output.step, unit="request", dynamic_ncols=True, leave=False) as bar:
        for index, result in backend.complete(requests):
            failures_in_a_row = failures_in_a_row + 1 if result.error is not None else 0
            if failures_in_a_row == FAILURES_IN_A_ROW_TO_STOP:
                raise BackendError(f"{output.step}: {failures_in_a_row} requests in a row failed, the last with "
                                   f"{result.error}; fix the backend and rerun to continue")
            for record in waiting[requests[index]]:
                if result.error is not None:
                    output.fail(record["id"], result.error)
                else:
                    output.write(record["id"], finish(record, result))
            bar.update()


def run_model_step(step: str, in_path, required: tuple[str, ...], out, backend: Backend, prepare, finish,
                   config: dict | None) -> dict:
    """A backend step from its input file to its output files; returns the stats."""
    records = read_step_input(in_path, required)
    with StepOutput(step, {"out": Path(out)}) as output:
        run_requests(records, output, backend, prepare, finish)
        return output.finish(len(records), config)


# ----------------------------------------------------------------------------------------------------------------
# The six steps


def read_source(path: Path) -> list[tuple[str, object]]:
    """(where, raw item) of a JSON array file or a JSON-lines file (told apart by the first character)."""
    if not path.is_file():
        raise PipelineError(f"{path}: source file not found")
    text = path.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise PipelineError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        return [(f"{path}:record {number}", item) for number, item in enumerate(items, start=1)]
    items = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                items.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as error:
                raise PipelineError(f"{path}:{number}: invalid JSON line ({error.msg})") from None
    return items


def step_metadata(source, out, images_root, verifier_type: str | None = None, config: dict | None = None) -> dict:
    """Step 1: source records -> our format (gt from "gt", else the source's "answer"); bad records dropped."""
    source, images_root = Path(source), Path(images_root)
    if not images_root.is_dir():
        raise PipelineError(f"--images {images_root}: not a folder")
    items = read_source(source)
    ids = [str(item.get("id", f"{source.stem}:{n}")) if isinstance(item, dict) else f"{source.stem}:{n}"
           for n, (_, item) in enumerate(items, start=1)]
    first_seen = {}
    for (where, _), record_id in zip(items, ids):
        if record_id in first_seen:
            raise PipelineError(f"{where}: id {record_id!r} repeats {first_seen[record_id]}; ids must be unique")
        first_seen[record_id] = where
    verified: dict = {}  # image files already checked (shared with data.py's validation)

    def imported(where, item, record_id) -> Outcome:
        raw = item
        if isinstance(item, dict):
            raw = {key: value for key, value in item.items() if key not in PIPELINE_FIELDS}
            if "gt" not in item and "answer" in item:
                raw["gt"] = item["answer"]
            if verifier_type and "verifier_type" not in item:
                raw["verifier_type"] = verifier_type
        try:
            record = data.normalise_record(raw, where, images_root, require_answer=False, default_id=record_id,
                                           verified=verified)
        except data.DataError as error:
            return drop(error.kind, str(error))
        record.pop("answer", None)  # normalise_record builds one from ds_answer; the pipeline writes its own
        return Outcome(record=record)

    with StepOutput("metadata", {"out": Path(out)}) as output:
        for (where, item), record_id in zip(items, ids):
            if record_id not in output.done:
                output.write(record_id, imported(where, item, record_id))
        return output.finish(len(items), config)


def step_caption(in_path, out, images_root, backend: Backend, *, max_tokens: int = 1024, temperature: float = 0.0,
                 config: dict | None = None) -> dict:
    """Step 2: a detailed caption of each image ("caption"); one request per image."""

    @functools.cache
    def earlier_captions() -> dict[str, str]:  # image -> caption; first called once the torn tail is cut
        return {r["image"]: r["caption"] for _, r in read_jsonl(Path(out))} if Path(out).exists() else {}

    def prepare(record):
        if not record.get("image"):
            return drop("no_image", "a text-only record has nothing to caption")
        if record["image"] in earlier_captions():  # captioned in an earlier run, for another record of that image
            return Outcome(record={**record, "caption": earlier_captions()[record["image"]]})
        return ChatRequest(system=prompts.CAPTION_SYSTEM, user=prompts.CAPTION_USER,
                           image=str(Path(images_root) / record["image"]), max_tokens=max_tokens,
                           temperature=temperature)

    def finish(record, result):
        caption = unwrap_answer(after_thinking(result.text))
        if not caption:
            return drop("empty_caption", result.text)
        return Outcome(record=with_trail({**record, "caption": caption}, caption_truncated=result.truncated))

    return run_model_step("caption", in_path, ("question",), out, backend, prepare, finish, config)


def step_distill(in_path, out, backend: Backend, *, max_tokens: int = 8192, temperature: float = 0.6,
                 config: dict | None = None) -> dict:
    """Step 3: caption + question -> the reasoner's trace ("ds_answer") and the target "answer"."""
    def prepare(record):
        return ChatRequest(system=prompts.DISTILL_SYSTEM,
                           user=prompts.DISTILL_USER.format(caption=record["caption"], question=record["question"]),
                           max_tokens=max_tokens, temperature=temperature)

    def finish(record, result):
        text = result.text
        if result.reasoning is not None:  # the server split the reasoning off: put it back in its <think> block
            text = f"<think>\n{result.reasoning.strip()}\n</think>\n\n{result.text.strip()}"
        if result.truncated:
            return drop("truncated", text[-300:])
        parsed = parse_reasoning(text)
        if isinstance(parsed, str):
            return drop(parsed, text)
        thought, final = parsed
        answer = f"<think>{thought}</think> <answer>{final}</answer>"
        if rewards.extract_answer(answer, require_think=True)[0] is None:  # tags inside the thought or answer
            return drop("tags_inside_text", answer)
        return Outcome(record={**record, "ds_answer": text, "answer": answer})

    return run_model_step("distill", in_path, ("question", "caption"), out, backend, prepare, finish, config)


def step_rewrite(in_path, out, backend: Backend, *, max_tokens: int = 8192, temperature: float = 0.0,
                 max_length_change: int = 15, config: dict | None = None) -> dict:
    """Step 4: remove mentions of a caption / description / rationale from "answer" (kept when none)."""
    def prepare(record):
        if not mentions(record["answer"]):
            return Outcome(record=with_trail(record, rewritten=False))
        return ChatRequest(system=prompts.REWRITE_SYSTEM, user=prompts.REWRITE_USER.format(response=record["answer"]),
                           max_tokens=max_tokens, temperature=temperature)

    def finish(record, result):
        rewritten = result.text.strip()
        if result.truncated:
            return drop("truncated", rewritten[-300:])
        if rewards.extract_answer(rewritten, require_think=True)[0] is None:
            return drop("broken_tags", rewritten)
        if mentions(rewritten):
            return drop("still_mentions", ", ".join(mentions(rewritten)) + ": " + rewritten)
        change = length_change(record["answer"], rewritten)
        if change > max_length_change:
            return drop("length_change", f"{change} words ({word_count(record['answer'])} -> "
                                         f"{word_count(rewritten)})")
        return Outcome(record=with_trail({**record, "answer": rewritten}, rewritten=True))

    return run_model_step("rewrite", in_path, ("question", "answer"), out, backend, prepare, finish, config)


def step_verify(in_path, out, backend: Backend, *, max_tokens: int = 1024, temperature: float = 0.0,
                config: dict | None = None) -> dict:
    """Step 5: keep the records whose final answer the judge says matches the ground truth."""
    def prepare(record):
        final, why = rewards.extract_answer(record["answer"])
        if final is None:
            return drop("no_answer_block", why)
        if _plain(final) == _plain(str(record["gt"])):
            return Outcome(record=with_trail(record, verified_by="exact"))
        return ChatRequest(system=prompts.VERIFY_SYSTEM,
                           user=prompts.VERIFY_USER.format(question=record["question"], gt=record["gt"], answer=final),
                           max_tokens=max_tokens, temperature=temperature)

    def finish(record, result):
        verdict = parse_verdict(result.text)
        if verdict is None:
            return drop("unclear_verdict", result.text)
        if verdict == "no":
            return drop("judged_wrong", f"gt {record['gt']!r}; answer {rewards.extract_answer(record['answer'])[0]!r}")
        return Outcome(record=with_trail(record, verified_by="judge"))

    return run_model_step("verify", in_path, ("question", "gt", "answer"), out, backend, prepare, finish, config)


def step_split(in_path, sft_out, rl_out, images_root, config: dict | None = None) -> dict:
    """Step 6: records with an aha word -> rl_out, the rest -> sft_out; each validated as the trainers load it."""
    records = read_step_input(in_path, ("question", "gt", "answer"))
    verified: dict = {}

    def split(record) -> Outcome:
        try:  # what train_sft.py's data.load_records(require_answer=True) checks, so both files load
            checked = data.normalise_record(record, f"{in_path} [id {record['id']}]", Path(images_root),
                                            require_answer=True, default_id=record["id"], verified=verified)
        except data.DataError as error:
            return drop(f"invalid_{error.field}", str(error))
        found = aha_words(checked["answer"])
        return Outcome(record=with_trail(checked, aha_words=found), output="rl" if found else "out")

    with StepOutput("split", {"out": Path(sft_out), "rl": Path(rl_out)}) as output:
        for record in records:
            if record["id"] not in output.done:
                output.write(record["id"], split(record))
        stats = output.finish(len(records), config)
    for path, count in stats["kept_by_file"].items():
        if count == 0:
            print(f"  note: {path} is empty; the trainers need at least one record")
    return stats


# ----------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class PipelineConfig:
    input: str | None = field(default=None, metadata={"help": "the step's input JSONL (also --in); metadata: the "
                                                                "source file (JSON array or JSONL)"})
    out: str | None = field(default=None, metadata={"help": "the step's output JSONL (split: the SFT file)"})
    rl_out: str | None = field(default=None, metadata={"help": "split: the RL file"})
    source: str | None = field(default=None, metadata={"help": "all: the source file of (image, question, answer) "
                                                                 "records"})
    workdir: str | None = field(default=None, metadata={"help": "all: folder for every step's files"})
    images: str | None = field(default=None, metadata={"help": "images root the records' image paths are relative "
                                                                 "to (metadata, caption, split, all)"})
    verifier_type: str | None = field(default=None, metadata={"help": "metadata: reward type of source records "
                                                                        "without one (digit/mcq/math/iou/open)"})
    backend: str = field(default="openai", metadata={"help": "local:CHECKPOINT, openai (OPENAI_BASE_URL, "
                                                             "OPENAI_API_KEY) or openai:BASE_URL"})
    caption_backend: str | None = field(default=None, metadata={"help": "caption step's backend (default --backend)"})
    distill_backend: str | None = field(default=None, metadata={"help": "distill step's backend (default --backend)"})
    rewrite_backend: str | None = field(default=None, metadata={"help": "rewrite step's backend (default --backend)"})
    verify_backend: str | None = field(default=None, metadata={"help": "verify step's backend (default --backend)"})
    model: str | None = field(default=None, metadata={"help": "model name sent to an openai backend"})
    caption_model: str | None = field(default=None, metadata={"help": "captioner, e.g. gpt-4o (default --model)"})
    distill_model: str | None = field(default=None, metadata={"help": "reasoner, e.g. deepseek-r1 (default --model)"})
    rewrite_model: str | None = field(default=None, metadata={"help": "rewriter (default --model)"})
    verify_model: str | None = field(default=None, metadata={"help": "judge (default --model)"})
    caption_max_tokens: int = field(default=1024, metadata={"help": "caption length limit (tokens)"})
    distill_max_tokens: int = field(default=8192, metadata={"help": "reasoning trace limit; longer ones are dropped"})
    rewrite_max_tokens: int = field(default=8192, metadata={"help": "rewrite limit; longer ones are dropped"})
    verify_max_tokens: int = field(default=1024, metadata={"help": "judge reply limit"})
    temperature: float = field(default=0.0, metadata={"help": "caption / rewrite / verify temperature (0 = greedy)"})
    distill_temperature: float = field(default=0.6, metadata={"help": "reasoner temperature (R1's recommended 0.6)"})
    max_length_change: int = field(default=15, metadata={"help": "rewrite: drop when the length changes by more "
                                                                 "words (the paper: 15)"})
    batch_size: int = field(default=8, metadata={"help": "local backend: prompts per generation batch"})
    concurrency: int = field(default=8, metadata={"help": "openai backend: requests in flight"})
    timeout_s: float = field(default=600.0, metadata={"help": "openai backend: time limit of one request, from "
                                                               "connecting to the last byte (s)"})
    max_retries: int = field(default=5, metadata={"help": "openai backend: retries of a failed request"})
    backoff_s: float = field(default=2.0, metadata={"help": "openai backend: first retry delay, doubled each time"})
    device: str = field(default="auto", metadata={"help": "local backend: auto, cpu, cuda"})
    precision: str = field(default="auto", metadata={"help": "local backend: auto (bf16 on GPU), fp32, bf16"})
    seed: int = field(default=0, metadata={"help": "local backend: sampling seed"})

    def __post_init__(self):
        if self.max_length_change < 0 or self.batch_size < 1:
            raise ValueError("--max-length-change must be >= 0 and --batch-size >= 1")


def _required(cfg: PipelineConfig, step: str, *names: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(cfg, name) in (None, "")]
    if missing:
        raise PipelineError(f"step {step} needs {' '.join(missing)}")


class Backends:
    """The backend of each step, built once per (spec, model): a local checkpoint is loaded only once."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg, self.built = cfg, {}

    def for_step(self, step: str) -> Backend:
        spec = getattr(self.cfg, f"{step}_backend") or self.cfg.backend
        model = None if spec.startswith("local:") else getattr(self.cfg, f"{step}_model") or self.cfg.model
        if (spec, model) not in self.built:
            self.built[spec, model] = make_backend(spec, model, self.cfg)
        return self.built[spec, model]


def run_step(step: str, cfg: PipelineConfig, backend_for_step, paths: dict[str, Path]) -> dict:
    """Run one step with the files in `paths` ("in", "out" and, for split, "rl"); backend_for_step(step) gives
    the backend of a model step."""
    config = {"step": step, **config_to_dict(cfg)}
    if step == "metadata":
        return step_metadata(paths["in"], paths["out"], cfg.images, cfg.verifier_type, config)
    if step == "caption":
        return step_caption(paths["in"], paths["out"], cfg.images, backend_for_step(step),
                            max_tokens=cfg.caption_max_tokens, temperature=cfg.temperature, config=config)
    if step == "distill":
        return step_distill(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.distill_max_tokens,
                            temperature=cfg.distill_temperature, config=config)
    if step == "rewrite":
        return step_rewrite(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.rewrite_max_tokens,
                            temperature=cfg.temperature, max_length_change=cfg.max_length_change, config=config)
    if step == "verify":
        return step_verify(paths["in"], paths["out"], backend_for_step(step), max_tokens=cfg.verify_max_tokens,
                           temperature=cfg.temperature, config=config)
    return step_split(paths["in"], paths["out"], paths["rl"], cfg.images, config)


def workdir_paths(workdir: Path, source: Path) -> dict[str, dict[str, Path]]:
    """The files of `all`: source -> 1_metadata.jsonl -> ... -> 5_verify.jsonl -> sft.jsonl + rl.jsonl."""
    numbered = [workdir / f"{number}_{step}.jsonl" for number, step in enumerate(STEPS[:-1], start=1)]
    paths = {step: {"in": step_in, "out": step_out}
             for step, step_in, step_out in zip(STEPS, [source, *numbered], [*numbered, workdir / "sft.jsonl"])}
    paths["split"]["rl"] = workdir / "rl.jsonl"
    return paths


def run_all(cfg: PipelineConfig, backend_for_step=None) -> dict[str, dict]:
    """All six steps in order into cfg.workdir; returns each step's stats (also in summary.json).

    backend_for_step(step) -> Backend; default: the backends the --*backend / --*model flags name."""
    workdir = Path(cfg.workdir)
    paths = workdir_paths(workdir, Path(cfg.source))
    if backend_for_step is None:
        backends = Backends(cfg)
        for step in ("caption", "distill", "rewrite", "verify"):
            backends.for_step(step)  # a missing --model fails now, not after hours of captioning
        backend_for_step = backends.for_step
    summary = {step: run_step(step, cfg, backend_for_step, paths[step]) for step in STEPS}
    lines = [f"{'step':<9} {'in':>7} {'kept':>7} {'dropped':>8} {'failed':>7}  dropped by reason"]
    for step, stats in summary.items():
        reasons = ", ".join(f"{reason} {count}" for reason, count in stats["dropped_by_reason"].items())
        lines.append(f"{step:<9} {stats['input']:>7} {stats['kept']:>7} {stats['dropped']:>8} {stats['failed']:>7}  "
                     f"{reasons}")
    lines.append(f"SFT file {paths['split']['out']} ({summary['split']['kept_by_file'][str(paths['split']['out'])]}), "
                 f"RL file {paths['split']['rl']} ({summary['split']['kept_by_file'][str(paths['split']['rl'])]})")
    print("\n".join(lines))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (1 when some record failed and a rerun is needed)."""
    parser = build_parser(PipelineConfig, description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=(*STEPS, "all"), help="the step to run, or all six in order")
    parser.add_argument("--in", dest="input", default=argparse.SUPPRESS, help="same as --input")
    args = vars(parser.parse_args(argv))
    step = args.pop("step")
    cfg = PipelineConfig(**args)
    print(f"step: {step}")
    print_config(cfg)
    if step == "all":
        _required(cfg, step, "source", "images", "workdir")
        summary = run_all(cfg)
    else:
        _required(cfg, step, "input", "out", *(("images",) if step in ("metadata", "caption", "split") else ()),
                  *(("rl_out",) if step == "split" else ()))
        paths = {"in": Path(cfg.input), "out": Path(cfg.out), "rl": Path(cfg.rl_out) if cfg.rl_out else None}
        summary = {step: run_step(step, cfg, Backends(cfg).for_step, paths)}
    failed = sum(stats["failed"] for stats in summary.values())
    if failed:
        print(f"{failed} record(s) failed (see the failures above); rerun the same command to retry only them")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (PipelineError, BackendError, data.DataError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every finished record is saved; rerun the same command to continue")
