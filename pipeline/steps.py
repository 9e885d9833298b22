"""The six steps of the VLAA-Thinking data pipeline, and the text rules they apply.

Choices the paper leaves open (it names the models, not the prompts; ours are in pipeline/prompts.py):
- Captions are per image: records sharing an image (and identical requests in general) cost one request. The
  captioner does not see the question. A caption cut at its token limit is kept (it is still true); a
  reasoning trace or rewrite cut at its limit is dropped ("truncated").
- Step 3: the reasoner's thought is the text before its one </think>; its final answer is the single <answer>
  block after it, or all the text after it. The target becomes <think>..</think> <answer>..</answer>.
- Step 4 sends only answers that mention one of the words to the rewriter; the others pass unchanged. Length is
  counted in whitespace-separated words of the whole answer, tags not counted.
- Step 5 keeps an answer equal to the ground truth (case, spaces and a final full stop aside) without asking
  the judge (meta.pipeline.verified_by = "exact"); the judge's verdict is its first word, else its last.
- Step 6 looks for aha words (data.AHA_WORDS) in the whole (rewritten) answer, think block and answer block.
"""

import functools
import json
import re
from pathlib import Path

import data
import rewards
from pipeline import prompts
from pipeline.backends import Backend, ChatRequest, PipelineError
from pipeline.step_files import (Outcome, StepOutput, drop, drop_not_utf8, read_jsonl, read_step_input,
                                 run_model_step, with_trail)

PIPELINE_FIELDS = ("answer", "ds_answer", "caption")  # written by the pipeline, never imported from a source

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
    return [word for word in data.AHA_WORDS if word in lowered]


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
# The six steps


def read_source(path: Path) -> list[tuple[str, object]]:
    """(where, raw item) of a JSON array file or a JSON-lines file (told apart by the first character); the item
    of a JSON line that is not UTF-8 is the data.DataError naming its line and byte."""
    if not path.is_file():
        raise PipelineError(f"{path}: source file not found")
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")  # a bad byte stays, for require_utf8
    if text.lstrip().startswith("["):
        data.require_utf8(text, str(path))  # one JSON value: a bad byte cannot be skipped
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise PipelineError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from None
        return [(f"{path}:record {number}", item) for number, item in enumerate(items, start=1)]
    items = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                data.require_utf8(line, str(path), number)
            except data.DataError as error:
                items.append((f"{path}:{number}", error))  # dropped by step_metadata
                continue
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
        if isinstance(item, data.DataError):  # not UTF-8
            print(f"{item}; dropped as {record_id}")
            return drop(item.kind, str(item))
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
    records, not_utf8 = read_step_input(in_path, ("question", "gt", "answer"))
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
        drop_not_utf8(output, not_utf8)
        for record in records:
            if record["id"] not in output.done:
                output.write(record["id"], split(record))
        stats = output.finish(len(records) + len(not_utf8), config)
    for path, count in stats["kept_by_file"].items():
        if count == 0:
            print(f"  note: {path} is empty; the trainers need at least one record")
    return stats

