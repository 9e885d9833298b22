"""VLAA-Thinking records: loading and validation, the epoch sampler, and batching through the processor.

One code path for the toy world (toyworld.py) and the real data set. A record is a plain dict as in
VLAA-Thinking's JSON: "id", "image" (path relative to an images root; absent, null or "" for text-only),
"question", "gt", "verifier_type" (digit/mcq/math/iou/open), "answer" (SFT target
"<think>...</think> <answer>...</answer>"), optional "ds_answer", "caption", "meta" (dict).

- `load_records` reads a JSON array or JSON lines (told apart by the first character, not the extension) with
  the json module and validates EVERY record before training starts (normalise_record lists the checks). An
  error names the file, the line (JSON lines) or the record and its line (JSON arrays), the id and the field:
  "<file>:<line> [id <id>]: <field>: <problem>". skip_bad=True skips bad records instead and counts them.
- `check_prompt_lengths`: every prompt fits the trainer's length limit, once a processor is loaded;
  `check_sft_lengths`: every whole SFT sample (prompt + answer) does, or is cut only when the user asked for it.
- `EpochSampler`: a deterministic permutation per epoch, batches across epoch boundaries, exact resume.
- `encode_prompt` / `encode_sft` / `collate_prompts` / `collate_sft`: records -> the processor's batches.

Choices the data set card leaves open: image paths must be relative and may not contain ".." (symbolic links
inside the root are followed); the default images root is "<json folder>/images" when it exists, else the
file's folder; "answer" is built from "ds_answer" when absent (build_answer).

    records = load_records("toy/rl.json")                      # images root: toy/images
    records = load_records("VLAA-Thinking-SFT-126K.json", "images", require_answer=True, skip_bad=True)
    batch = collate_prompts([records[i] for i in EpochSampler(len(records), seed=0).next_batch(8)], ...)
"""

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageOps

import rewards
from vlaa_min.infra.cli import UserError
from vlaa_min.processor import MAX_ASPECT_RATIO

SKIP_REPORT_EXAMPLES = 5  # how many skipped-record messages skip_bad prints
SPECIAL_TOKEN_TEXT = re.compile(r"<\|[A-Za-z_]+\|>")  # Qwen's special tokens: <|im_end|>, <|image_pad|>, ...
IMAGE_PLACEHOLDER = "<image>"
# The paper's "aha" words, matched as lower-cased substrings ("check" also catches "checked"): a trace with one
# goes to the RL file in the pipeline's split step, and evaluate.py counts them as a reasoning statistic.
AHA_WORDS = ("wait", "again", "double-check", "hmm", "mistake", "alternatively", "check", "i should confirm")


class DataError(UserError, ValueError):
    """A bad data file or record: "<where>: <field>: <problem>". `kind` is a short code used for skip counts.
    A UserError: the scripts print it in one line, without a traceback."""

    def __init__(self, where: str, field: str, problem: str, kind: str):
        super().__init__(f"{where}: {field}: {problem}")
        self.where, self.field, self.problem, self.kind = where, field, problem, kind


class RecordList(list):
    """The records load_records returns; `skipped` counts the records skip_bad left out, by problem kind, and
    `where` maps each record's id to its place in the file ("<file>:<line>")."""

    def __init__(self, records=(), skipped: Counter | None = None, where: dict | None = None):
        super().__init__(records)
        self.skipped = skipped if skipped is not None else Counter()
        self.where = where if where is not None else {}


# ----------------------------------------------------------------------------------------------------------------
# Reading the file: (location, record) pairs from a JSON array or JSON lines

_WHITESPACE = re.compile(r"[ \t\r\n]*")
_JSON_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[][{},]')  # a string (skipped over whole) or a bracket/comma
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # the bytes that are not UTF-8, as surrogateescape keeps them


def _read_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 stay as lone surrogates, for require_utf8 to place."""
    try:
        return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")  # -sig: tolerate a byte order mark
    except FileNotFoundError:
        raise DataError(str(path), "file", "not found", "file") from None


def require_utf8(text: str, path: str, first_line: int = 1) -> None:
    """Raise DataError at the first byte of `text` that is not UTF-8, naming its line and column."""
    bad = _NOT_UTF8.search(text)
    if bad is None:
        return
    line_start = text.rfind("\n", 0, bad.start()) + 1
    line = first_line + text.count("\n", 0, bad.start())
    raise DataError(f"{path}:{line}", "encoding", f"not UTF-8 text: byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                    f"column {bad.start() - line_start + 1}", "not_utf8")


def _json_array_items(text: str, path: str):
    """(location, value) for each element of the JSON array `text`, parsed by json.loads."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}", "json", f"invalid JSON: {error.msg} (column {error.colno})",
                        "bad_json") from None
    lines = _element_lines(text)
    return [(f"{path}:record {number} (line {line})", value)
            for number, (line, value) in enumerate(zip(lines, values), start=1)]


def _element_lines(text: str) -> list[int]:
    """The line each element of a valid JSON array starts on: after the "[" and after each comma at depth 1,
    skipping over strings (which may hold brackets and commas)."""
    lines, depth, line, counted_to = [], 0, 1, 0
    for token in _JSON_STRUCTURE.finditer(text):
        char = token.group()
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if depth == 1 and char in "[,":
            start = _WHITESPACE.match(text, token.end()).end()
            line += text.count("\n", counted_to, start)
            counted_to = start
            lines.append(line)
    return lines


def _json_lines_items(text: str, path: str, skip_bad: bool, skipped: Counter, messages: list[str]):
    """Yield (location, value) for each non-blank line; a bad line raises, or is counted when skip_bad."""
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON text may hold U+2028
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            value = _json_line(line, path, line_number)
        except DataError as bad:
            if not skip_bad:
                raise
            skipped[bad.kind] += 1
            messages.append(str(bad))
            continue
        yield where, value


def _json_line(line: str, path: str, line_number: int):
    """The value on one line of a JSON-lines file; DataError when it is not UTF-8 or not JSON."""
    require_utf8(line, path, line_number)
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{line_number}", "json", f"invalid JSON line: {error.msg} (column {error.colno})",
                        "bad_json") from None


# ----------------------------------------------------------------------------------------------------------------
# Validating and normalising one record


def check_image_path(relative_path: str) -> PurePosixPath:
    """The path as a relative POSIX path, or ValueError when it is absolute or climbs out with '..'."""
    path = PurePosixPath(relative_path)
    if path.is_absolute() or Path(relative_path).is_absolute():
        raise ValueError(f"absolute path {relative_path!r}; image paths must be relative to the images root")
    if ".." in path.parts:
        raise ValueError(f"path {relative_path!r} contains '..' and could leave the images root")
    return path


def load_image(images_root, relative_path: str) -> Image.Image:
    """Open images_root/relative_path as an RGB image (path rules as in load_records)."""
    try:
        path = Path(images_root) / check_image_path(relative_path)
    except ValueError as error:
        raise DataError(str(images_root), "image", str(error), "unsafe_path") from None
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")  # a photo's EXIF rotation, as viewers show it
    except FileNotFoundError:
        raise DataError(str(path), "image", "file not found", "image_not_found") from None
    except (OSError, SyntaxError, ValueError) as error:  # PIL raises these on undecodable files
        raise DataError(str(path), "image", f"cannot be decoded ({error})", "image_corrupt") from None


def build_answer(ds_answer: str, gt: str) -> str:
    """An SFT target "<think>..</think> <answer>..</answer>" from an R1 output.

    The thought is the text inside <think>..</think> (or everything before a lone </think>, or the whole text);
    the answer is the text after </think> if any, else gt. Text after </think> that already holds an <answer>
    block is kept as it is."""
    if "</think>" in ds_answer:
        thought, after = ds_answer.split("</think>", 1)
        thought = thought.replace("<think>", "", 1)
    else:
        thought, after = ds_answer, ""
    after = after.strip()
    if "<answer>" in after:
        return f"<think>{thought.strip()}</think> {after}"
    return f"<think>{thought.strip()}</think> <answer>{after or gt}</answer>"


def strip_image_placeholder(question: str) -> str:
    """Remove VLAA-Thinking's literal "<image>" markers (the processor inserts the image tokens itself)."""
    if IMAGE_PLACEHOLDER not in question:
        return question.strip()
    return " ".join(part.strip() for part in question.split(IMAGE_PLACEHOLDER) if part.strip())


def _text_field(record: dict, name: str, where: str, *, allow_number: bool = False, tokenised: bool = True) -> str:
    """record[name] as a non-empty string; text the model reads (tokenised) may not spell special tokens."""
    if name not in record or record[name] is None:
        raise DataError(where, name, "missing", "missing_field")
    value = record[name]
    if allow_number and isinstance(value, float) and not math.isfinite(value):
        raise DataError(where, name, f"{value} is not a usable value (JSON NaN or Infinity)", "wrong_type")
    if allow_number and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(where, name, f"expected a string, got {type(value).__name__}", "wrong_type")
    if not value.strip():
        raise DataError(where, name, "empty", "empty_field")
    if tokenised and SPECIAL_TOKEN_TEXT.search(value):
        raise DataError(where, name, f"contains special-token text {SPECIAL_TOKEN_TEXT.search(value).group()!r}",
                        "special_token_text")
    return value


def _check_image(record: dict, where: str, images_root: Path, verified: dict) -> str | None:
    """The record's relative image path after checking that it is safe, exists and decodes (None: text-only)."""
    image = record.get("image")
    if image is None or image == "":
        return None
    if not isinstance(image, str):
        raise DataError(where, "image", f"expected a path string, got {type(image).__name__}", "wrong_type")
    try:
        path = images_root / check_image_path(image)
    except ValueError as error:
        raise DataError(where, "image", str(error), "unsafe_path") from None
    if path not in verified:  # many records share an image: check each file once
        verified[path] = _image_problem(path)
    if verified[path] is not None:
        kind, problem = verified[path]
        raise DataError(where, "image", problem, kind)
    return image


def _image_problem(path: Path) -> tuple[str, str] | None:
    """(kind, problem) when the file is missing, does not decode, or has a size the processor cannot use."""
    if not path.is_file():
        return "image_not_found", f"file not found: {path}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
            with Image.open(path) as opened:
                width, height = opened.size
                cut_short_jpeg = opened.format == "JPEG" and not _ends_a_jpeg(path)
                opened.verify()  # checks a PNG's chunks, but not a JPEG's data
            if cut_short_jpeg:
                with Image.open(path) as opened:
                    opened.load()  # raises "image file is truncated"; a JPEG with bytes after its end decodes
    except Image.DecompressionBombError as error:
        return "image_too_large", f"{path}: {error}"
    except Exception as error:  # PIL signals corrupt files with many exception types
        return "image_corrupt", f"{path} cannot be decoded ({type(error).__name__}: {error})"
    if width * height > Image.MAX_IMAGE_PIXELS:
        return "image_too_large", (f"{path} is {width}x{height}, more than {Image.MAX_IMAGE_PIXELS} pixels "
                                   f"(PIL.Image.MAX_IMAGE_PIXELS: a decompression bomb?)")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return "image_unusable", (f"{path} is {width}x{height}: an aspect ratio above {MAX_ASPECT_RATIO}, which the "
                                  f"processor cannot resize")
    return None


def _ends_a_jpeg(path: Path) -> bool:
    """Whether the file's last two bytes are JPEG's end-of-image marker, which a file cut short lacks (the marker
    cannot occur inside the compressed data, where a 0xFF byte is always followed by 0x00)."""
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) == b"\xff\xd9"


def normalise_record(record, where: str, images_root: Path, *, require_answer: bool, default_id: str,
                     verified: dict, reward_config: "rewards.RewardConfig | None" = None) -> dict:
    """A validated, normalised copy of one raw record; raises DataError naming `where`, the id and the field.

    Checks: "question" and "gt" present and strings (a number in "gt" becomes a string; NaN and inf are
    refused); a known reward type (verifier_type, or the source: rewards/types.py) and a gt the reward
    can score (rewards.check_sample); no Qwen special-token text ("<|...|>") in the question or answer; an image
    that is safe, exists, decodes, is not a decompression bomb and has an aspect ratio the processor accepts.
    Normalises: "verifier_type" always set, a literal "<image>" removed from the question, "answer" built from
    "ds_answer" when absent, "id" filled in ("<file stem>:<record number>") when absent.
    """
    if not isinstance(record, dict):
        raise DataError(where, "record", f"expected a JSON object, got {type(record).__name__}", "not_an_object")
    out = dict(record)
    record_id = record.get("id", default_id)
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise DataError(where, "id", f"expected a string or integer, got {type(record_id).__name__}", "wrong_type")
    out["id"] = str(record_id)
    where = f"{where} [id {out['id']}]"
    out["question"] = strip_image_placeholder(_text_field(record, "question", where))
    if not out["question"]:
        raise DataError(where, "question", f"empty once the {IMAGE_PLACEHOLDER} placeholder is removed", "empty_field")
    out["gt"] = _text_field(record, "gt", where, allow_number=True, tokenised=False)
    if "meta" in record and record["meta"] is not None and not isinstance(record["meta"], dict):
        raise DataError(where, "meta", f"expected a JSON object, got {type(record['meta']).__name__}", "wrong_type")
    try:
        out["verifier_type"] = rewards.check_sample(out, reward_config)
    except rewards.SampleError as error:
        raise DataError(where, error.field, error.problem, "bad_gt") from None
    except ValueError as error:
        raise DataError(where, "verifier_type", str(error), "unknown_type") from None

    if record.get("answer") is None and isinstance(record.get("ds_answer"), str) and record["ds_answer"].strip():
        out["answer"] = build_answer(record["ds_answer"], out["gt"])
    if require_answer:
        out["answer"] = _text_field(out, "answer", where)
        answer, reason = rewards.extract_answer(out["answer"])
        if answer is None:
            raise DataError(where, "answer", f"no single <answer>...</answer> block ({reason})", "bad_answer")
    out["image"] = _check_image(record, where, images_root, verified)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The loader


def default_images_root(path) -> Path:
    folder = Path(path).parent
    return folder / "images" if (folder / "images").is_dir() else folder


def load_records(path, images_root=None, *, require_answer: bool = False, skip_bad: bool = False,
                 reward_config: "rewards.RewardConfig | None" = None) -> RecordList:
    """Read, validate and normalise every record of a JSON array or JSON-lines file (see the module docstring).

    require_answer: every record needs an SFT target ("answer", or "ds_answer" to build it from) with exactly
    one <answer> block. skip_bad: leave bad records out (counts in the result's `skipped`) instead of raising.
    reward_config: the rewards the records will be scored with (their gt is checked against it).
    """
    path = Path(path)
    images_root = Path(images_root) if images_root is not None else default_images_root(path)
    if not images_root.is_dir():
        raise DataError(str(path), "images_root", f"{images_root} is not a folder", "file")
    text = _read_text(path)
    start = _WHITESPACE.match(text).end()
    skipped: Counter = Counter()
    messages: list[str] = []
    if not text.startswith("{", start):  # one JSON value, not lines: a bad byte cannot be skipped
        require_utf8(text, str(path))
    if text.startswith("[", start):
        items = _json_array_items(text, str(path))
    elif text.startswith("{", start):
        items = _json_lines_items(text, str(path), skip_bad, skipped, messages)
    elif start == len(text):
        raise DataError(str(path), "file", "empty: no records", "file")
    else:
        raise DataError(f"{path}:{1 + text.count(chr(10), 0, start)}", "file",
                        f"neither a JSON array ('[') nor JSON lines ('{{'): starts with {text[start:start + 20]!r}",
                        "bad_json")

    records, verified = RecordList(skipped=skipped), {}
    for number, (where, raw) in enumerate(items, start=1):
        try:
            record = normalise_record(raw, where, images_root, require_answer=require_answer,
                                      default_id=f"{path.stem}:{number}", verified=verified,
                                      reward_config=reward_config)
            if record["id"] in records.where:
                raise DataError(f"{where} [id {record['id']}]", "id",
                                f"duplicate of the record at {records.where[record['id']]}", "duplicate_id")
        except DataError as error:
            if not skip_bad or error.field == "json":
                raise
            skipped[error.kind] += 1
            messages.append(str(error))
            continue
        records.append(record)
        records.where[record["id"]] = where
    _report_skipped(str(path), skipped, records, messages)
    return records


def _report_skipped(path: str, skipped: Counter, records: list, messages: list[str]) -> None:
    """Print what skip_bad left out; no record left at all is an error."""
    if skipped:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(skipped.items()))
        print(f"{path}: skipped {sum(skipped.values())} bad record(s) ({counts}); kept {len(records)}")
        for message in messages[:SKIP_REPORT_EXAMPLES]:
            print(f"  {message}")
    if not records:
        raise DataError(path, "file", "no valid records", "file")


def check_prompt_lengths(records: RecordList, path, processor, images_root, limit: int, flag: str, *,
                         leave_room: bool, skip_bad: bool = False) -> RecordList:
    """The records whose prompt (images included) fits `limit` tokens, with room for one answer token when
    leave_room (SFT); a longer one raises DataError naming the flag, or is skipped and counted when skip_bad."""
    def problem(record: dict, where: str) -> DataError | None:
        return _long_prompt(where, _prompt_length(record, processor, images_root), limit, flag, leave_room)

    return _check_each(records, path, problem, skip_bad)


def check_sft_lengths(records: RecordList, path, processor, images_root, limit: int, flag: str, *,
                      skip_bad: bool = False, truncate: bool = False) -> RecordList:
    """The SFT records whose whole sample -- prompt (images included), answer and the <|im_end|> that closes it --
    fits `limit` tokens. A longer one raises DataError with its token counts, or is skipped and counted when
    skip_bad. truncate (train_sft.py's --truncate true: the user's choice) keeps the records whose answer overflows,
    to be cut to fit, and prints how many; a prompt that leaves no room for an answer is never kept."""
    cut = []

    def problem(record: dict, where: str) -> DataError | None:
        prompt = _prompt_length(record, processor, images_root)
        answer = processor.target_length(record["answer"])
        if prompt + answer <= limit:
            return None
        if prompt >= limit or not truncate:
            return _long_prompt(where, prompt, limit, flag, leave_room=True) or DataError(
                where, "answer", f"the sample is {prompt + answer} tokens (prompt {prompt}, image included, + answer "
                f"{answer}), more than {flag} {limit}; raise it, or cut such answers with --truncate true",
                "too_long")
        cut.append(where)
        return None

    kept = _check_each(records, path, problem, skip_bad)
    if cut:
        print(f"{path}: {len(cut)} of {len(kept)} record(s) are longer than {flag} {limit}; their answers are cut "
              f"to fit (--truncate true), e.g. {cut[0]}")
    return kept


def _long_prompt(where: str, length: int, limit: int, flag: str, leave_room: bool) -> DataError | None:
    if length <= limit - leave_room:
        return None
    return DataError(where, "question", f"the prompt is {length} tokens (image included), more than {flag} {limit} "
                     f"allows" + (" with room for an answer" if leave_room else ""), "too_long")


def _prompt_length(record: dict, processor, images_root) -> int:
    sizes = []
    if record.get("image"):
        with Image.open(Path(images_root) / record["image"]) as image:  # reads the header, not the pixels
            sizes.append(image.size)
    return processor.prompt_length(record["question"], sizes)


def _check_each(records: RecordList, path, problem, skip_bad: bool) -> RecordList:
    """The records for which problem(record, where) gives no DataError; one raises, or is skipped and counted
    when skip_bad."""
    kept, skipped, messages = RecordList(where=records.where), Counter(), []
    for record in records:
        error = problem(record, f"{records.where.get(record['id'], path)} [id {record['id']}]")
        if error is None:
            kept.append(record)
        elif not skip_bad:
            raise error
        else:
            skipped[error.kind] += 1
            messages.append(str(error))
    kept.skipped = records.skipped + skipped
    _report_skipped(str(path), skipped, kept, messages)
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Sampling


class EpochSampler:
    """Batches of record indices: a fresh permutation each epoch (numpy seeded with (seed, epoch)), resumable
    mid-epoch through state_dict() / load_state_dict(). No record is ever dropped: every epoch visits each one
    exactly once.

    Under torchrun (world_size > 1) every rank draws the same global batch and next_batch returns this rank's
    contiguous share of it: shares are disjoint, together they are the one-process batch, and since every rank's
    state is the same, a resumed sampler continues every share exactly.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if num_items <= 0:
            raise ValueError(f"EpochSampler: num_items must be positive, got {num_items}")
        if seed < 0:
            raise ValueError(f"EpochSampler: seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} is not in 0..{world_size - 1}")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_items).tolist()

    def next_batch(self, batch_size: int) -> list[int]:
        """The next global batch of `batch_size` indices (this rank's share of it under torchrun); a batch that
        reaches the end of an epoch goes on in the next epoch's order."""
        if batch_size <= 0:
            raise ValueError(f"EpochSampler: batch_size must be positive, got {batch_size}")
        if batch_size % self.world_size:
            raise ValueError(f"EpochSampler: a batch of {batch_size} does not split evenly over {self.world_size} "
                             f"ranks")
        batch: list[int] = []
        while len(batch) < batch_size:
            taken = self._order[self.position : self.position + batch_size - len(batch)]
            batch += taken
            self.position += len(taken)
            if self.position == self.num_items:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        share = batch_size // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_items": self.num_items,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["num_items"] != self.num_items:
            raise ValueError(f"EpochSampler: the saved state is for {state['num_items']} records but the data has "
                             f"{self.num_items}; did the data file change?")
        self.seed, self.shuffle = state["seed"], state["shuffle"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------------------------
# Batching through the processor


def _images_of(record: dict, images_root) -> list[Image.Image]:
    return [load_image(images_root, record["image"])] if record.get("image") else []


def encode_prompt(record: dict, processor, images_root, max_prompt_length: int | None = None):
    """One record -> the processor's EncodedPrompt (its image loaded and processed once)."""
    try:
        return processor.encode_prompt(record["question"], _images_of(record, images_root),
                                       max_length=max_prompt_length)
    except DataError:
        raise
    except ValueError as error:  # e.g. the prompt is longer than max_prompt_length
        raise DataError(f"record {record.get('id')}", "question", str(error), "encode") from None


def encode_sft(record: dict, processor, images_root, max_length: int | None = None):
    """One record -> the processor's EncodedSFT (loss on the record's "answer" and the closing <|im_end|>)."""
    if not isinstance(record.get("answer"), str):
        raise DataError(f"record {record.get('id')}", "answer", "missing (load SFT data with require_answer=True)",
                        "missing_field")
    try:
        return processor.encode_sft(record["question"], _images_of(record, images_root), record["answer"],
                                    max_length=max_length)
    except DataError:
        raise
    except ValueError as error:
        raise DataError(f"record {record.get('id')}", "answer", str(error), "encode") from None


def collate_prompts(records: list[dict], processor, images_root, max_prompt_length: int | None = None):
    """Records -> the processor's PromptBatch: left padded, one row per prompt (GRPO then samples G per row)."""
    return processor.collate_prompts([encode_prompt(r, processor, images_root, max_prompt_length) for r in records])


def collate_sft(records: list[dict], processor, images_root, max_length: int | None = None):
    """Records -> the processor's SFTBatch: right padded, with the assistant-only loss mask."""
    return processor.collate_sft([encode_sft(r, processor, images_root, max_length) for r in records])
