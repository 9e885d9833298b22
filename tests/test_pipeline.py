"""The six-step data pipeline (the pipeline package): its text rules on hand cases, the HTTP backend against a
local OpenAI-compatible server (errors, timeouts, malformed bodies, concurrency), crash-and-resume, and end-to-end
runs with the toy model as every backend and with a scripted backend whose output the trainers load.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import data
import toyworld
import pipeline
from pipeline import ChatResult, OpenAIBackend, prompts
from vlaa_min.toy_model import build_toy_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny toy world (images + records) and a random toy checkpoint trained on its texts."""
    root = tmp_path_factory.mktemp("toy")
    toyworld.build_world(str(root / "world"), sizes={"base": 4, "sft": 4, "rl": 12, "test": 2})
    build_toy_checkpoint(str(root / "checkpoint"), str(root / "world"))
    rl = json.loads((root / "world" / "rl.json").read_text())
    return {"world": root / "world", "images": root / "world" / "images", "checkpoint": root / "checkpoint",
            "rl": rl}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def ids_once(*paths: Path) -> list[str]:
    """All ids across the files, asserting that none appears twice."""
    ids = [record_id for path in paths if path.exists() for record_id in jsonl_ids(path)]
    assert len(ids) == len(set(ids)), f"duplicate ids: {sorted(ids)}"
    return ids


class ScriptedBackend:
    """A backend whose replies come from reply(request) (a str or a ChatResult); remembers every request."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []

    def complete(self, requests):
        for index, request in enumerate(requests):
            self.requests.append(request)
            reply = self.reply(request)
            yield index, reply if isinstance(reply, ChatResult) else ChatResult(text=reply)


def completion(content, reasoning=None) -> bytes:
    message = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    return json.dumps({"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}).encode()


class ChatServer:
    """An OpenAI-compatible test server on 127.0.0.1 (ephemeral port) in a thread.

    respond(body: dict, attempt: int) -> (status, payload, delay seconds, headers); `attempt` counts the
    requests with the same key(body) so far (1 = first). The payload is bytes, or an iterator of byte chunks sent
    as it yields them (then headers must give the Content-Length). Tracks the most requests in flight at once.
    """

    def __init__(self, respond, key=lambda body: json.dumps(body["messages"])):
        self.respond, self.key = respond, key
        self.requests, self.attempts, self.lock = [], {}, threading.Lock()
        self.in_flight = self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    key = server.key(body)
                    server.attempts[key] = server.attempts.get(key, 0) + 1
                    attempt = server.attempts[key]
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload, delay, headers = server.respond(body, attempt)
                    time.sleep(delay)
                    self.send_response(status)
                    if isinstance(payload, bytes):
                        headers, payload = {"Content-Length": str(len(payload)), **headers}, [payload]
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    for chunk in payload:
                        self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or was killed
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def image_key(body: dict) -> str:
    """The base64 image of a caption request (identifies the record)."""
    return body["messages"][-1]["content"][0]["image_url"]["url"].split(",", 1)[1]


def metadata_records(toy, count: int) -> list[dict]:
    """The first `count` toy RL records as the metadata step writes them."""
    return [{key: record[key] for key in ("id", "image", "question", "gt", "verifier_type", "meta")}
            for record in toy["rl"][:count]]


# ----------------------------------------------------------------------------------------------------------------
# Text rules on hand cases


def test_aha_words_hand_cases():
    assert pipeline.aha_words("Wait, the circle is red.") == ["wait"]
    assert pipeline.aha_words("Let me double-check.") == ["double-check", "check"]  # "check" is inside it
    assert pipeline.aha_words("HMM. I Should Confirm this.") == ["hmm", "i should confirm"]
    assert pipeline.aha_words("This goes against the rule.") == ["again"]  # the paper's substring rule
    assert pipeline.aha_words("Alternatively, no mistake here.") == ["mistake", "alternatively"]
    assert pipeline.aha_words("There are 3 red shapes.") == []


def test_split_sends_aha_traces_to_rl_and_writes_loadable_files(toy, tmp_path):
    base = metadata_records(toy, 4)
    answers = ["<think>Two red circles.</think> <answer>2</answer>",
               "<think>Two. Wait, one more: three.</think> <answer>3</answer>",
               "<think>Let me double-check the count.</think> <answer>1</answer>",
               "<think>Leaked <|im_end|> token.</think> <answer>1</answer>"]
    source = write_jsonl(tmp_path / "verified.jsonl", [{**r, "answer": a} for r, a in zip(base, answers)])
    stats = pipeline.step_split(source, tmp_path / "sft.jsonl", tmp_path / "rl.jsonl", toy["images"])
    assert jsonl_ids(tmp_path / "sft.jsonl") == [base[0]["id"]]
    assert jsonl_ids(tmp_path / "rl.jsonl") == [base[1]["id"], base[2]["id"]]
    assert stats["dropped_by_reason"] == {"invalid_answer": 1}  # special-token text: the trainers would refuse it
    rl = data.load_records(tmp_path / "rl.jsonl", toy["images"])
    assert [r["meta"]["pipeline"]["aha_words"] for r in rl] == [["wait"], ["double-check", "check"]]
    assert len(data.load_records(tmp_path / "sft.jsonl", toy["images"], require_answer=True)) == 1


def test_word_count_ignores_tags():
    assert pipeline.word_count("<think>a b</think><answer>c</answer>") == 3
    assert pipeline.word_count("<think>a\n b\tc</think> <answer>d e</answer>") == 5
    assert pipeline.length_change("<think>a b c</think>", "<think>a</think>") == 2


def test_rewrite_length_rule_on_hand_cases(tmp_path):
    limit = 15

    def original(name):  # the [name] tag tells the scripted rewriter which case it is rewriting
        return (f"<think>[{name}] the caption says there are two red circles and one blue square in the picture, "
                f"so counting every shape gives three shapes in total</think> <answer>3</answer>")

    cases = {  # name -> (how the rewriter changes the original, the expected drop reason or None)
        "same_length": (lambda text: text.replace("the caption says", "in the image"), None),
        "adds_limit": (lambda text: text.replace("the caption says", "in the image" + " indeed" * limit), None),
        "adds_more": (lambda text: text.replace("the caption says", "in the image" + " indeed" * (limit + 1)),
                      "length_change"),
        "removes_more": (lambda text: text.split(" the caption")[0] + "</think> <answer>3</answer>", "length_change"),
        "still_mentions": (lambda text: text.replace("caption", "description"), "still_mentions"),
        "broken_tags": (lambda text: text.replace("<think>", "").replace("the caption says", "in the image"),
                        "broken_tags"),
    }
    changes = {name: pipeline.length_change(original(name), change(original(name)))
               for name, (change, _) in cases.items()}
    assert changes["same_length"] == 0 and changes["adds_limit"] == limit and changes["adds_more"] == limit + 1
    assert changes["removes_more"] > limit
    records = [{"id": name, "question": "How many shapes?", "answer": original(name)} for name in cases]
    unmentioned = "<think>Two red circles and one blue square.</think> <answer>3</answer>"
    records.append({"id": "no_mention", "question": "How many shapes?", "answer": unmentioned})

    def reply(request):
        assert request.system == prompts.REWRITE_SYSTEM
        name = next(name for name in cases if f"[{name}]" in request.user)
        return cases[name][0](original(name))

    backend = ScriptedBackend(reply)
    in_path = write_jsonl(tmp_path / "distilled.jsonl", records)
    stats = pipeline.step_rewrite(in_path, tmp_path / "rewritten.jsonl", backend, max_length_change=limit)

    kept = {r["id"]: r for r in map(json.loads, (tmp_path / "rewritten.jsonl").read_text().splitlines())}
    dropped = {r["id"]: r["reason"]
               for r in map(json.loads, (tmp_path / "rewritten.dropped.jsonl").read_text().splitlines())}
    assert set(kept) == {"same_length", "adds_limit", "no_mention"}
    assert dropped == {name: reason for name, (_, reason) in cases.items() if reason}
    assert kept["same_length"]["answer"] == cases["same_length"][0](original("same_length"))
    assert kept["same_length"]["meta"]["pipeline"]["rewritten"] is True
    assert kept["no_mention"]["answer"] == unmentioned  # passed unchanged, without a request
    assert kept["no_mention"]["meta"]["pipeline"]["rewritten"] is False
    assert len(backend.requests) == len(cases)
    assert (stats["kept"], stats["dropped"]) == (3, len(records) - 3)


def test_parse_reasoning_hand_cases():
    assert pipeline.parse_reasoning("<think>a b</think><answer>B</answer>") == ("a b", "B")
    assert pipeline.parse_reasoning("a b\n</think>\n\nThe answer is B.") == ("a b", "The answer is B.")  # R1 style
    assert pipeline.parse_reasoning("no tags at all") == "no_think"
    assert pipeline.parse_reasoning("<think> </think> B") == "empty_think"
    assert pipeline.parse_reasoning("<think>a</think>  ") == "no_answer"
    assert pipeline.parse_reasoning("<think>a</think><answer>1</answer><answer>2</answer>") == "bad_answer_block"
    assert pipeline.parse_reasoning("<think>a</think>b</think>c") == "several_think_blocks"


def test_parse_verdict_hand_cases():
    for reply, verdict in [("Yes", "yes"), ("No.", "no"), ("**Yes**", "yes"), ("<answer>No</answer>", "no"),
                           ("<think>no, wait, it matches</think>Yes", "yes"), ("They match. Yes", "yes"),
                           ("Maybe", None), ("", None)]:
        assert pipeline.parse_verdict(reply) == verdict, reply


def test_distill_and_verify_steps_on_scripted_replies(tmp_path):
    records = [{"id": str(i), "question": f"Question {i}?", "gt": "3", "caption": f"Caption {i}."} for i in range(6)]
    replies = {
        "0": ChatResult(text="<answer>3</answer>", reasoning="Three shapes."),  # a server that splits off reasoning
        "1": ChatResult(text="Counting gives three.\n</think>\nThe answer is 3"),  # R1 without the opening tag
        "2": ChatResult(text="<think>Four.</think> <answer>4</answer>"),
        "3": ChatResult(text="<think>I am still counting", truncated=True),
        "4": ChatResult(text="3"),
        "5": ChatResult(error="HTTP 400: context too long"),
    }
    distill = ScriptedBackend(lambda request: replies[request.user.split("Question ")[1][0]])
    in_path = write_jsonl(tmp_path / "captioned.jsonl", records)
    stats = pipeline.step_distill(in_path, tmp_path / "distilled.jsonl", distill)
    assert all("Caption" in r.user and r.system is None for r in distill.requests)
    kept = {r["id"]: r for r in map(json.loads, (tmp_path / "distilled.jsonl").read_text().splitlines())}
    assert kept["0"]["answer"] == "<think>Three shapes.</think> <answer>3</answer>"
    assert kept["0"]["ds_answer"].startswith("<think>\nThree shapes.\n</think>")
    assert kept["1"]["answer"] == "<think>Counting gives three.</think> <answer>The answer is 3</answer>"
    assert set(kept) == {"0", "1", "2"}
    assert stats["dropped_by_reason"] == {"truncated": 1, "no_think": 1}
    assert (stats["failed"], stats["pending"]) == (1, 1)  # a failed request is written nowhere: a rerun retries it

    judge = ScriptedBackend(lambda request: "Yes" if "Model's answer: The answer is 3" in request.user else "No")
    stats = pipeline.step_verify(tmp_path / "distilled.jsonl", tmp_path / "verified.jsonl", judge)
    verified = {r["id"]: r for r in map(json.loads, (tmp_path / "verified.jsonl").read_text().splitlines())}
    assert verified["0"]["meta"]["pipeline"]["verified_by"] == "exact"  # equal to the ground truth: no judge
    assert verified["1"]["meta"]["pipeline"]["verified_by"] == "judge"
    assert set(verified) == {"0", "1"} and stats["dropped_by_reason"] == {"judged_wrong": 1}
    assert len(judge.requests) == 2


def test_metadata_imports_and_validates(toy, tmp_path):
    image = toy["rl"][0]["image"]
    source = write_jsonl(tmp_path / "source.jsonl", [
        {"id": "a", "image": image, "question": "How many?", "answer": "3", "verifier_type": "digit"},
        {"id": "b", "image": "missing.png", "question": "How many?", "gt": "1", "verifier_type": "digit"},
        {"id": "c", "image": image, "question": "<image>What is 1+1?", "gt": 2, "answer": "<think>x</think>",
         "ds_answer": "x", "caption": "old"},
        {"id": "d", "image": image, "question": "Which?", "gt": "A", "verifier_type": "nonsense"},
    ])
    stats = pipeline.step_metadata(source, tmp_path / "meta.jsonl", toy["images"], verifier_type="math")
    kept = {r["id"]: r for r in map(json.loads, (tmp_path / "meta.jsonl").read_text().splitlines())}
    assert kept["a"]["gt"] == "3" and "answer" not in kept["a"]  # a source's "answer" is its ground truth
    assert kept["c"] == {"id": "c", "image": image, "question": "What is 1+1?", "gt": "2", "verifier_type": "math"}
    assert stats["dropped_by_reason"] == {"image_not_found": 1, "unknown_type": 1}
    toy_stats = pipeline.step_metadata(toy["world"] / "rl.json", tmp_path / "toy.jsonl", toy["images"])  # JSON array
    assert toy_stats["kept"] == len(toy["rl"])
    write_jsonl(tmp_path / "dup.jsonl", [{"id": "x", "question": "q", "gt": "1"}] * 2)
    with pytest.raises(pipeline.PipelineError, match="repeats"):
        pipeline.step_metadata(tmp_path / "dup.jsonl", tmp_path / "dup_out.jsonl", toy["images"])


# ----------------------------------------------------------------------------------------------------------------
# The HTTP backend against a local OpenAI-compatible server


def test_http_backend_retries_reports_and_resumes(toy, tmp_path):
    records = metadata_records(toy, 6)
    # PNG files travel byte for byte: the base64 payload of a request names its record.
    payloads = {base64.b64encode((toy["images"] / r["image"]).read_bytes()).decode(): r["id"] for r in records}
    ids = [r["id"] for r in records]
    healed = threading.Event()
    timeout_s, max_retries = 1.0, 3

    def respond(body, attempt):
        record_id = payloads[image_key(body)]
        ok = (200, completion(f"Caption of {record_id}."), 0.0, {})
        if record_id == ids[1] and attempt == 1:
            return 500, b'{"error": "overloaded"}', 0.0, {}
        if record_id == ids[2] and attempt == 1:
            return (*ok[:2], 2.5 * timeout_s, {})  # answers after the client gave up
        if record_id == ids[3] and attempt <= 2:
            return 200, [b"{not json", b'{"choices": []}'][attempt - 1], 0.0, {}
        if record_id == ids[4] and not healed.is_set():
            return 503, b"down", 0.0, {}
        if record_id == ids[5] and attempt == 1:
            return 429, b"slow down", 0.0, {"Retry-After": "0"}
        return ok

    in_path = write_jsonl(tmp_path / "meta.jsonl", records)
    out = tmp_path / "caption.jsonl"
    with ChatServer(respond, key=image_key) as server:
        backend = OpenAIBackend(server.base_url, "test-model", "test-key", concurrency=2, timeout_s=timeout_s,
                                max_retries=max_retries, backoff_s=0.01)
        stats = pipeline.step_caption(in_path, out, toy["images"], backend, max_tokens=77)
        assert sorted(ids_once(out, tmp_path / "caption.dropped.jsonl")) == sorted(set(ids) - {ids[4]})
        assert (stats["failed"], stats["pending"], stats["dropped"]) == (1, 1, 0)
        assert ids[4] in stats["failures"][0] and "HTTP 503" in stats["failures"][0]
        attempts = {payloads[key]: count for key, count in server.attempts.items()}
        assert attempts == {ids[0]: 1, ids[1]: 2, ids[2]: 2, ids[3]: 3, ids[4]: max_retries + 1, ids[5]: 2}

        request = server.requests[0]
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == "Bearer test-key"
        body = request["body"]
        assert (body["model"], body["max_tokens"], body["temperature"]) == ("test-model", 77, 0.0)
        assert body["messages"][0] == {"role": "system", "content": prompts.CAPTION_SYSTEM}
        user = body["messages"][1]["content"]
        assert user[0]["image_url"]["url"].startswith("data:image/png;base64,")
        assert user[1] == {"type": "text", "text": prompts.CAPTION_USER}

        healed.set()  # the server recovers: the rerun asks only for the record that failed
        requests_before = len(server.requests)
        stats = pipeline.step_caption(in_path, out, toy["images"], backend)
        assert len(server.requests) == requests_before + 1
    assert (stats["kept"], stats["failed"], stats["pending"]) == (6, 0, 0)
    captions = {r["id"]: r["caption"] for r in map(json.loads, out.read_text().splitlines())}
    assert captions == {record_id: f"Caption of {record_id}." for record_id in ids}
    assert sorted(ids_once(out)) == sorted(ids)


MALFORMED_REPLIES = {  # first replies that are retried as failures of their record, not crashes of the step
    "message-null": (200, b'{"choices": [{"message": null}]}', {}),
    "message-string": (200, b'{"choices": [{"message": "hello"}]}', {}),
    "no-choices": (200, b'{"object": "chat.completion"}', {}),
    "choices-null": (200, b'{"choices": null}', {}),
    "choice-empty": (200, b'{"choices": [{}]}', {}),
    "not-utf8": (200, b'\xff\xfe', {}),
    "cut-200": (200, completion("Cut off")[:20], {"Content-Length": "1000"}),
    "cut-500": (500, b'{"error": "overl', {"Content-Length": "1000"}),
    "bad-retry-after": (503, b"busy", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
}


def test_http_backend_retries_malformed_and_cut_short_replies(tmp_path):
    records = [{"id": name, "question": f"{name}?", "caption": "Shapes."} for name in MALFORMED_REPLIES]

    def respond(body, attempt):
        name = next(key for key in MALFORMED_REPLIES if f"{key}?" in json.dumps(body))
        if attempt == 1:
            status, payload, headers = MALFORMED_REPLIES[name]
            return status, payload, 0.0, headers
        return 200, completion(f"<think>Fine.</think> <answer>{name}</answer>"), 0.0, {}

    with ChatServer(respond) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", concurrency=3, timeout_s=5.0, max_retries=1,
                                backoff_s=0.01)
        stats = pipeline.step_distill(write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl", backend)
        assert sorted(server.attempts.values()) == [2] * len(records)
    assert (stats["kept"], stats["failed"]) == (len(records), 0)


def trickle(payload: bytes, every_s: float):
    for byte in payload:
        time.sleep(every_s)
        yield bytes([byte])


def test_http_timeout_bounds_the_whole_request_not_each_read(tmp_path):
    body = completion("A reply that arrives one byte at a time.")
    timeout_s, every_s = 1.0, 0.1  # each read is quick, the whole reply takes len(body) * 0.1 s > 6 s

    def respond(request_body, attempt):
        return 200, trickle(body, every_s), 0.0, {"Content-Length": str(len(body))}

    with ChatServer(respond) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", timeout_s=timeout_s, max_retries=1, backoff_s=0.01)
        started = time.monotonic()
        result = backend.send(pipeline.ChatRequest(user="Question?"))
        elapsed = time.monotonic() - started
        assert len(server.requests) == 2
    assert result.text is None and "no complete reply within 1 s (after 2 attempt(s))" in result.error
    assert elapsed < 2 * timeout_s + 1.0

    fast = completion("Quick enough.")
    with ChatServer(lambda request_body, attempt: (200, trickle(fast, 0.001), 0.0,
                                                   {"Content-Length": str(len(fast))})) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", timeout_s=timeout_s, max_retries=0)
        assert backend.send(pipeline.ChatRequest(user="Question?")).text == "Quick enough."


def test_http_backend_respects_the_concurrency_limit_and_keeps_reasoning(tmp_path):
    records = [{"id": f"q{i}", "question": f"Question {i}?", "caption": "Three shapes."} for i in range(8)]
    concurrency = 3

    def respond(body, attempt):
        return 200, completion("<answer>3</answer>", reasoning="I count three."), 0.2, {}

    with ChatServer(respond) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", None, concurrency=concurrency, backoff_s=0.01)
        stats = pipeline.step_distill(write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl", backend)
    assert server.max_in_flight == concurrency  # used, never exceeded
    assert "Authorization" not in server.requests[0]["headers"]  # no key, no header (a local vLLM needs none)
    assert stats["kept"] == len(records)
    answers = {json.loads(line)["answer"] for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    assert answers == {"<think>I count three.</think> <answer>3</answer>"}


def test_http_backend_stops_on_a_wrong_key(tmp_path):
    records = [{"id": "q0", "question": "Question?", "caption": "Shapes."}]
    with ChatServer(lambda body, attempt: (401, b'{"error": "bad key"}', 0.0, {})) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", "wrong", max_retries=3, backoff_s=0.01)
        with pytest.raises(pipeline.BackendError, match="HTTP 401"):
            pipeline.step_distill(write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl", backend)
        assert len(server.requests) == 1  # not retried
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_a_step_stops_when_every_request_fails(tmp_path):
    records = [{"id": f"q{i:02d}", "question": f"Question {i}?", "caption": "Shapes."} for i in range(30)]
    with ChatServer(lambda body, attempt: (503, b"down", 0.0, {})) as server:
        backend = OpenAIBackend(server.base_url, "reasoner", max_retries=0, concurrency=1)
        with pytest.raises(pipeline.BackendError, match=f"{pipeline.FAILURES_IN_A_ROW_TO_STOP} requests in a row"):
            pipeline.step_distill(write_jsonl(tmp_path / "in.jsonl", records), tmp_path / "out.jsonl", backend)
        stop = pipeline.FAILURES_IN_A_ROW_TO_STOP
        assert stop <= len(server.requests) <= stop + 1  # + the one request in flight when it stopped
    assert ids_once(tmp_path / "out.jsonl", tmp_path / "out.dropped.jsonl") == []  # nothing written: all retried


def test_killing_a_step_midway_and_rerunning_writes_each_record_once(tmp_path):
    records = [{"id": f"q{i:02d}", "question": f"Question {i}?", "caption": "Shapes."} for i in range(12)]
    answered_at_once = 4
    release = threading.Event()

    def respond(body, attempt):
        if len(server.requests) > answered_at_once and not release.is_set():
            release.wait(timeout=20)  # hold the rest until the client has been killed
        return 200, completion("<think>Counted.</think> <answer>3</answer>"), 0.0, {}

    in_path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    with ChatServer(respond) as server:
        command = [sys.executable, "-m", "pipeline", "distill", "--in", str(in_path), "--out", str(out),
                   "--backend", f"openai:{server.base_url}", "--model", "reasoner", "--concurrency", "2"]
        env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while (not out.exists() or out.read_text().count("\n") < answered_at_once) and process.poll() is None:
            assert time.monotonic() < deadline, "the step never wrote its first records"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
        text = out.read_text()
        written = [json.loads(line)["id"] for line in text[: text.rfind("\n") + 1].splitlines()]
        assert len(written) == answered_at_once  # the others were held in flight when the process died
        with open(out, "a") as f:
            f.write('{"id": "q99", "ques')  # as if the crash had hit mid-write
        release.set()
        requests_before = len(server.requests)
        assert pipeline.main(command[3:]) == 0
        assert len(server.requests) - requests_before == len(records) - len(written)  # done records not asked again
    assert sorted(ids_once(out, tmp_path / "out.dropped.jsonl")) == [r["id"] for r in records]
    assert json.loads((tmp_path / "out.stats.json").read_text())["kept"] == len(records)


# ----------------------------------------------------------------------------------------------------------------
# End to end


def test_all_six_steps_with_the_toy_model_as_every_backend(toy, tmp_path):
    """A random toy model writes gibberish: every step must still run and account for every record."""
    source = write_jsonl(tmp_path / "source.jsonl", metadata_records(toy, 3))
    workdir = tmp_path / "run"
    command = ["all", "--source", str(source), "--images", str(toy["images"]), "--workdir", str(workdir),
               "--backend", f"local:{toy['checkpoint']}", "--temperature", "1.0", "--distill-temperature", "1.0",
               "--caption-max-tokens", "8", "--distill-max-tokens", "8", "--rewrite-max-tokens", "8",
               "--verify-max-tokens", "4", "--device", "cpu"]
    assert pipeline.main(command) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert list(summary) == list(pipeline.STEPS)
    assert summary["metadata"]["input"] == 3
    paths = pipeline.workdir_paths(workdir, source)
    for previous, step in zip(pipeline.STEPS, pipeline.STEPS[1:]):
        assert summary[step]["input"] == summary[previous]["kept"]
    for step, stats in summary.items():
        assert stats["kept"] + stats["dropped"] == stats["input"] and stats["pending"] == 0, step
        outputs = [paths[step]["out"]] + ([paths[step]["rl"]] if step == "split" else [])
        dropped_path = pipeline.sidecar(paths[step]["out"], ".dropped.jsonl")
        assert len(ids_once(*outputs, dropped_path)) == stats["input"]
        assert all(json.loads(line)["reason"] for line in dropped_path.read_text().splitlines())
        assert json.loads(pipeline.sidecar(paths[step]["out"], ".stats.json").read_text())["kept"] == stats["kept"]

    assert pipeline.main(command) == 0  # a rerun finds everything done and asks nothing
    rerun = json.loads((workdir / "summary.json").read_text())
    assert all(stats["this_run"]["kept"] + stats["this_run"]["dropped"] == 0 for stats in rerun.values())

    # Gibberish rarely survives distillation, so steps 4-6 also get records that make the toy model rewrite and judge.
    answer = "<think>The caption lists shapes.</think> <answer>no</answer>"  # to rewrite, and not the gt: to judge
    distilled = write_jsonl(tmp_path / "distilled.jsonl",
                            [{**record, "caption": "Shapes.", "answer": answer} for record in metadata_records(toy, 3)])
    backend = pipeline.LocalBackend(str(toy["checkpoint"]), device="cpu")
    all_stats = [pipeline.step_rewrite(distilled, tmp_path / "rewrite.jsonl", backend, max_tokens=8, temperature=1.0),
                 pipeline.step_verify(distilled, tmp_path / "verify.jsonl", backend, max_tokens=4, temperature=1.0),
                 pipeline.step_split(distilled, tmp_path / "sft.jsonl", tmp_path / "rl.jsonl", toy["images"])]
    assert backend.model is not None  # the toy model was asked to rewrite and to judge
    for stats in all_stats:
        assert stats["kept"] + stats["dropped"] == 3 and stats["failed"] == 0, stats["step"]
    assert len(data.load_records(tmp_path / "sft.jsonl", toy["images"], require_answer=True)) == 3


def scripted_world_backend(plans: dict[str, dict]):
    """A scripted stand-in for every model: plans[image stem] says how each step treats that record."""

    def find(text):
        return next(stem for stem in plans if stem in text)

    def reply(request):
        if request.image:  # caption
            return f"A scene: {Path(request.image).stem}."
        if request.system == prompts.REWRITE_SYSTEM:
            return request.user.split("Text:\n", 1)[1].replace("the caption says", "I see")
        if request.system == prompts.VERIFY_SYSTEM:  # the answers the judge sees name their image
            return "Yes" if plans[find(request.user)]["correct"] else "No"
        return plans[find(request.user)]["trace"]  # distill: the caption names the image

    return ScriptedBackend(reply)


@pytest.fixture(scope="module")
def scripted_run(toy, tmp_path_factory):
    """All six steps with a scripted backend; plans say what happens to each of six toy records."""
    records = metadata_records(toy, 6)
    stems = [Path(r["image"]).stem for r in records]
    gts = [r["gt"] for r in records]
    plans = {
        stems[0]: {"trace": f"<think>In {stems[0]} I count.</think> <answer>{gts[0]}</answer>", "correct": True},
        stems[1]: {"trace": f"<think>In {stems[1]} I count. Wait, again.</think> <answer>{gts[1]}</answer>",
                   "correct": True},
        stems[2]: {"trace": f"<think>In {stems[2]} the caption says so.</think> <answer>{gts[2]}</answer>",
                   "correct": True},
        stems[3]: {"trace": f"<think>In {stems[3]} I guess.</think> <answer>not {gts[3]} in {stems[3]}</answer>",
                   "correct": False},
        stems[4]: {"trace": f"<think>In {stems[4]} I count and count", "correct": True},
        stems[5]: {"trace": f"<think>In {stems[5]} I count.</think> <answer>It is {gts[5]} in {stems[5]}</answer>",
                   "correct": True},
    }
    root = tmp_path_factory.mktemp("scripted")
    source = write_jsonl(root / "source.jsonl", records)
    cfg = pipeline.PipelineConfig(source=str(source), images=str(toy["images"]), workdir=str(root / "run"))
    backend = scripted_world_backend(plans)
    summary = pipeline.run_all(cfg, backend_for_step=lambda step: backend)
    return {"workdir": root / "run", "summary": summary, "records": records, "stems": stems, "gts": gts}


def test_scripted_pipeline_writes_files_the_trainers_load(toy, scripted_run):
    from vlaa_min.processor import Processor

    summary, workdir, images = scripted_run["summary"], scripted_run["workdir"], toy["images"]
    records, stems, gts = scripted_run["records"], scripted_run["stems"], scripted_run["gts"]
    assert summary["distill"]["dropped_by_reason"] == {"no_think": 1}
    assert summary["rewrite"]["kept"] == 5 and summary["verify"]["dropped_by_reason"] == {"judged_wrong": 1}
    sft = data.load_records(workdir / "sft.jsonl", images, require_answer=True)  # as train_sft.py loads it
    rl = data.load_records(workdir / "rl.jsonl", images)  # as train_grpo.py loads it
    assert [r["id"] for r in sft] == [records[i]["id"] for i in (0, 2, 5)]
    assert [r["id"] for r in rl] == [records[1]["id"]]
    assert sft[1]["answer"] == f"<think>In {stems[2]} I see so.</think> <answer>{gts[2]}</answer>"
    assert sft[1]["caption"] == f"A scene: {stems[2]}."
    assert [r["meta"]["pipeline"]["verified_by"] for r in sft] == ["exact", "exact", "judge"]
    processor = Processor.from_pretrained(toy["checkpoint"])
    assert data.collate_sft(sft, processor, images).loss_mask.any()
    assert data.collate_prompts(rl, processor, images).input_ids.shape[0] == 1


@pytest.mark.slow
def test_trainers_run_a_step_on_the_pipeline_files(toy, scripted_run, tmp_path):
    import train_grpo
    import train_sft
    from vlaa_min.infra.cli import parse_config

    workdir, images = scripted_run["workdir"], str(toy["images"])
    train_sft.main(parse_config(train_sft.SFTConfig, [
        "--model", str(toy["checkpoint"]), "--data", str(workdir / "sft.jsonl"), "--images", images,
        "--eval-data", str(workdir / "sft.jsonl"), "--out", str(tmp_path / "sft"), "--steps", "1",
        "--batch-size", "3", "--micro-batch-size", "3", "--device", "cpu"]))
    history = train_grpo.main(parse_config(train_grpo.GRPOConfig, [
        "--model", str(toy["checkpoint"]), "--data", str(workdir / "rl.jsonl"), "--images", images,
        "--eval-data", "none", "--out", str(tmp_path / "grpo"), "--steps", "1", "--prompts-per-step", "1",
        "--group-size", "2", "--train-batch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "8",
        "--save-every", "0", "--sample-every", "0", "--device", "cpu"]))
    assert (tmp_path / "sft" / "model" / "config.json").exists() and isinstance(history, dict)
