"""The resumable files of a pipeline step, and the loop that asks a backend for every record.

Every step appends each finished record to OUT (kept) or OUT.dropped.jsonl (id, reason, detail) and flushes, and
on start skips the ids already in either file, so a crash or Ctrl-C loses at most the records in flight. An input
line that is not UTF-8 is dropped (reason not_utf8, its file:line and byte in the detail), not read. A torn
last line (a crash mid-write) is cut off and that record redone. A record whose request failed (retries used up,
a rejected request) is written nowhere: it is reported, and a rerun retries it. OUT.stats.json holds the counts:
kept, dropped by reason, failed, pending.
"""

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import data
from pipeline.backends import Backend, BackendError, ChatRequest, PipelineError

FAILURES_SHOWN = 5
FAILURES_IN_A_ROW_TO_STOP = 20  # a server that is down fails every request: stop instead of trying them all


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


def read_jsonl(path: Path, not_utf8: list | None = None) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line; a line that is not a JSON object raises PipelineError. A line that
    is not UTF-8 raises data.DataError, or, when `not_utf8` is given (a step's input), is skipped and appended to
    it as (default id "<file stem>:<line>", the DataError naming the line and byte)."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # a bad byte stays, for require_utf8
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                data.require_utf8(line, str(path), number)
            except data.DataError as error:
                if not_utf8 is None:
                    raise
                not_utf8.append((f"{path.stem}:{number}", error))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PipelineError(f"{where}: invalid JSON ({error.msg}); a torn last line means the step that "
                                    f"wrote this file was interrupted: rerun it") from None
            if not isinstance(record, dict):
                raise PipelineError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def read_step_input(path, required: tuple[str, ...]) -> tuple[list[dict], list[tuple[str, "data.DataError"]]]:
    """The records of a step's input file, each with a unique string "id" and the `required` fields, and the lines
    that are not UTF-8 ((id, error): for drop_not_utf8)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: input file not found")
    records, seen, not_utf8 = [], {}, []
    for where, record in read_jsonl(path, not_utf8):
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
    return records, not_utf8


def drop_not_utf8(output: "StepOutput", not_utf8: list[tuple[str, "data.DataError"]]) -> None:
    """Write each input line that is not UTF-8 to the step's dropped file (reason not_utf8), once, and say so."""
    for record_id, error in not_utf8:
        if record_id not in output.done:
            print(f"{error}; dropped as {record_id}")
            output.write(record_id, drop(error.kind, str(error)))


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
    records, not_utf8 = read_step_input(in_path, required)
    with StepOutput(step, {"out": Path(out)}) as output:
        drop_not_utf8(output, not_utf8)
        run_requests(records, output, backend, prepare, finish)
        return output.finish(len(records) + len(not_utf8), config)

