"""The mixed reward of VLAA-Thinking: one reward in [0, 1] per (response, sample), picked by the sample's type.

A sample is a data record (data.py): "verifier_type" (or a source it is inferred from, vlaa_min/reward_types.py),
"gt", optional "question" and "meta". The answer is the text of exactly one <answer>...</answer> block; there is
no separate format term (the paper's implicit format reward): a missing, repeated or empty block gives 0.

    digit  the answer's numbers must all equal gt (Decimal: "3", "3.0", "03"); arithmetic ("3*3") gives 0
    mcq    the answer must name exactly one option letter A-H ("B", "(b)", "option B", "\\boxed{B}") or be one
           option's text; a gt written as option text is mapped to its letter through the question's options
    math   symbolic equivalence with gt by Math-Verify, within the hard time limit math_timeout_s
    iou    the IoU of the answer's one box [x1, y1, x2, y2] with gt's; correct from IOU_CORRECT = 0.5
    open   the paper's R = 1 - exp(-(S(pred) - S(gt)) * beta) if S(pred) > S(gt) else 0 for a relative scorer S
           (a reward model); a similarity scorer (token F1) gives the similarity, correct from SIMILARITY_CORRECT

Choices the paper leaves open: tags match case-insensitively; require_think (off) also demands a <think> block
first; number words zero..twenty count when the answer has no digits; a math answer over 1,000 characters gives
0; beta = 1.0 (not reported). The paper's reward model (InternLM-XComposer2.5-Reward) is replaced by
ToySceneScorer (the toy world's scene facts) when meta["scene"] exists, else by token F1 with gt.
Nothing here raises on model output; a bad sample raises SampleError naming the record and the field.

    from rewards import RewardConfig, compute_reward, compute_rewards
    compute_reward("<think>...</think><answer>(B)</answer>", {"verifier_type": "mcq", "gt": "B"})
    # {'reward': 1.0, 'type': 'mcq', 'reason': 'ok', 'answer': '(B)', 'correct': True, 'info': {}}
"""

from __future__ import annotations

import importlib
import logging
import math
import multiprocessing
import re
import signal
import string
import threading
import time
import unicodedata
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Callable, Protocol

from math_verify import parse as math_parse
from math_verify import verify as math_verify

from vlaa_min.reward_types import REWARD_TYPES, record_name, resolve_type  # noqa: F401 (part of the API)


class _DeadlineEnforcedHere(logging.Filter):
    """math_verify warns once that its own timeout is off; ours (_call_with_deadline) is on, so drop that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _logger in ("math_verify.grader", "math_verify.parser"):
    logging.getLogger(_logger).addFilter(_DeadlineEnforcedHere())

IOU_CORRECT = 0.5  # an iou answer is correct from this IoU on
SIMILARITY_CORRECT = 0.5  # an open answer scored by a similarity (relative=False, e.g. F1) is correct from here on

def _meta(record: dict) -> dict:
    meta = record.get("meta")
    return meta if isinstance(meta, dict) else {}


class SampleError(ValueError):
    """A sample no response can be scored against: "record 'id': field 'gt' <problem>"."""

    def __init__(self, sample: dict, field: str, problem: str):
        super().__init__(f"{record_name(sample)}: field '{field}' {problem}")
        self.field, self.problem = field, problem


# --- configuration and scorers ------------------------------------------------------------------------------------


class OpenScorer(Protocol):
    """Scores an open-ended answer; relative=True: a reward model (higher is better, compared with S(gt)),
    relative=False: a similarity with gt in [0, 1]."""

    relative: bool

    def score(self, answer: str, sample: dict) -> float: ...


def load_scorer(path: str) -> OpenScorer:
    """Import "module:attr"; a class is instantiated without arguments, anything else is used as it is."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"open_scorer {path!r}: expected an import path 'module:attr'")
    try:
        scorer = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"open_scorer {path!r}: cannot import it ({error})") from error
    if isinstance(scorer, type):
        scorer = scorer()
    if not callable(getattr(scorer, "score", None)) or not isinstance(getattr(scorer, "relative", None), bool):
        raise ValueError(f"open_scorer {path!r}: needs a method score(answer, sample) and a bool attribute relative")
    return scorer


@dataclass
class RewardConfig:
    """Everything the reward depends on besides the response and the sample; a str open_scorer is imported once."""

    require_think: bool = False  # also demand one <think>...</think> before the answer (the paper: no)
    open_beta: float = 1.0  # beta of the open-ended reward; not reported by the paper
    open_scorer: OpenScorer | str | None = None  # object or "module:attr"; None: toy scorer if meta.scene, else F1
    math_timeout_s: float = 1.0  # hard wall-clock limit of one math check
    iou_box_format: str = "normalized"  # "normalized" (0..1) or "pixel"; meta["box_format"] overrides it

    def __post_init__(self):
        if isinstance(self.open_scorer, str):
            self.open_scorer = load_scorer(self.open_scorer)
        if not self.open_beta > 0:
            raise ValueError(f"RewardConfig.open_beta must be > 0, got {self.open_beta}")
        if not 0 < self.math_timeout_s < math.inf:
            raise ValueError(f"RewardConfig.math_timeout_s must be > 0 and finite, got {self.math_timeout_s}")
        if self.iou_box_format not in ("normalized", "pixel"):
            raise ValueError(f"RewardConfig.iou_box_format must be 'normalized' or 'pixel', "
                             f"got {self.iou_box_format!r}")


# --- the answer block ----------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<(/?)answer>", re.IGNORECASE)
_THINK_TAG = re.compile(r"<(/?)think>", re.IGNORECASE)


def _single_block(tags: list[re.Match]) -> tuple[re.Match, re.Match] | None:
    """(opening, closing) if the tags are exactly one opening followed by one closing tag."""
    if len(tags) != 2 or tags[0].group(1) or not tags[1].group(1):
        return None
    return tags[0], tags[1]


def extract_answer(response: str, require_think: bool = False) -> tuple[str | None, str]:
    """(answer text, "ok") for exactly one non-empty <answer> block, else (None, "format" | "empty")."""
    if not isinstance(response, str):
        return None, "format"
    answer_block = _single_block(list(_ANSWER_TAG.finditer(response)))
    if answer_block is None:
        return None, "format"
    opening, closing = answer_block
    if require_think:
        think_block = _single_block(list(_THINK_TAG.finditer(response)))
        if think_block is None or think_block[1].end() > opening.start():
            return None, "format"
    answer = response[opening.end():closing.start()].strip()
    if not answer:
        return None, "empty"
    return answer, "ok"


# --- digit ---------------------------------------------------------------------------------------------------------
# Numbers of a single value must equal gt; different numbers give "ambiguous", and so does arithmetic. Any Unicode
# decimal digit counts ("３", "٣"), "1,000" is one thousand, and there is no scientific notation.

# A number: optional sign (not glued to a preceding word/number), digits with optional thousands groups and decimals.
_NUMBER = re.compile(r"(?:(?<![\w.])[-+\u2212])?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_NUMBER_WORDS = {word: index for index, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.IGNORECASE)
_EXPRESSION = re.compile(r"\d\s*(?:[*/^=\u00d7\u00f7]|x\s*\d)")  # "3*3", "6/2", "3 x 3": arithmetic, not a number


def _to_decimal(number: str) -> Decimal:
    """'−1,234.50' (any Unicode decimal digits) -> Decimal('-1234.50')."""
    if not number.isascii():
        number = "".join(str(unicodedata.decimal(char)) if char.isdecimal() else char for char in number)
    return Decimal(number.replace(",", "").replace("\u2212", "-"))


def _numbers_in(text: str) -> set[Decimal]:
    numbers = {_to_decimal(match.group()) for match in _NUMBER.finditer(text)}
    if not numbers:
        numbers = {Decimal(_NUMBER_WORDS[match.group(1).lower()]) for match in _NUMBER_WORD.finditer(text)}
    return numbers


def _digit_gt(sample: dict) -> Decimal:
    numbers = _numbers_in(str(sample["gt"]))
    if len(numbers) != 1:
        raise SampleError(sample, "gt", f"= {sample['gt']!r} is not a single number (digit type)")
    return numbers.pop()


def _digit_reward(answer: str, expected: Decimal) -> tuple[float, str]:
    if _EXPRESSION.search(answer):
        return 0.0, "ambiguous"
    numbers = _numbers_in(answer)
    if not numbers:
        return 0.0, "unparsable"
    if len(numbers) > 1:
        return 0.0, "ambiguous"
    return (1.0, "ok") if numbers.pop() == expected else (0.0, "wrong")


# --- mcq -----------------------------------------------------------------------------------------------------------

# An option letter is a capital A-H standing alone ("B", "(B)", "B.", "option B", "the answer is B") ...
_CAPITAL_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-H])(?![A-Za-z0-9'])")
# ... except the article in "A triangle" ("A or B", "A is ...", "A and C" still name the letter) ...
_ARTICLE_A = re.compile(r"A\s+(?!(?:and|nor|then|plus|also|both|versus|through|seems|looks|fits|matches|would"
                        r"|should|could|must|might|will|can)\b)[a-z]{3,}")
# ... or any case when it comes first: "b", "(b)", "b.", "B) 45°" ...
_LEADING_LETTER = re.compile(r"[(\[]?([A-Ha-h])(?:[)\].:]+(?:\s|$)|$)")
# ... or is marked anywhere: "(b)", "[b]", "option b", "choice b".
_MARKED_LETTER = re.compile(r"[(\[]([A-Ha-h])[)\]]|\b(?:option|choice)\s*[(\[]?([A-Ha-h])\b", re.IGNORECASE)
# The options listed in a question: "A: 30°", "(B) 45°", "C. 60°", at the start of a line or after a space.
_OPTION_MARKER = re.compile(r"(?:^|(?<=\s))[(\[]?([A-H])[)\].:\uff1a]\s*", re.MULTILINE)
_LATEX_WRAPPER = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{")


def _plain(text: str) -> str:
    """NFKC (fullwidth -> ASCII), LaTeX text wrappers and markdown emphasis removed."""
    text = _LATEX_WRAPPER.sub(" ", unicodedata.normalize("NFKC", text))
    return re.sub(r"[{}*`$]", " ", text).strip()


def _letters_named(answer: str) -> set[str]:
    """Every option letter the answer names (see the rules above the regexes)."""
    text = _plain(answer)
    letters = {match.group(1) for match in _CAPITAL_LETTER.finditer(text)
               if not (match.group(1) == "A" and _ARTICLE_A.match(text, match.start()))}
    leading = _LEADING_LETTER.match(text)
    if leading:
        letters.add(leading.group(1).upper())
    letters |= {(match.group(1) or match.group(2)).upper() for match in _MARKED_LETTER.finditer(text)}
    return letters


def _option_key(text: str) -> str:
    """Option text compared without case, spaces, "$" and a final full stop."""
    return re.sub(r"[\s$]+", "", _plain(text).lower()).rstrip(".")


def _question_options(question: str) -> dict[str, str]:
    """{"A": text, "B": text, ...} from the last run of consecutive option markers A, B, ... in the question."""
    markers = list(_OPTION_MARKER.finditer(question))
    options, found = {}, {}
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(question)
        letter, text = marker.group(1), question[marker.end():end].split("\n")[0].strip()
        if letter == "A":
            options = {"A": text}
        elif options and ord(letter) == ord(max(options)) + 1:
            options[letter] = text
        else:
            continue
        if len(options) >= 2:
            found = dict(options)
    return found


def _letter_of_text(text: str, options: dict[str, str]) -> str | None:
    """The letter of the one option whose text `text` is, else None."""
    key = _option_key(text)
    matches = [letter for letter, option in options.items() if key and _option_key(option) == key]
    return matches[0] if len(matches) == 1 else None


def _mcq_reward(answer: str, gt: str, sample: dict) -> tuple[float, str]:
    options = _question_options(str(sample.get("question") or ""))
    gt_leading = _LEADING_LETTER.match(_plain(gt))
    gt_letter = gt_leading.group(1).upper() if gt_leading else _letter_of_text(gt, options)
    if gt_letter is None:  # gt is text that is not one of the listed options: compare the texts
        return (1.0, "ok") if _option_key(answer) == _option_key(gt) else (0.0, "wrong")
    letters = _letters_named(answer)
    if not letters:  # no letter named: maybe the answer is one option's text
        letters = {_letter_of_text(answer, options)} - {None}
    if not letters:
        return 0.0, "unparsable"
    if len(letters) > 1:
        return 0.0, "ambiguous"
    return (1.0, "ok") if letters.pop() == gt_letter else (0.0, "wrong")


# --- math ----------------------------------------------------------------------------------------------------------
# Math-Verify's own timeout counts whole seconds and cannot tell a timeout from a wrong answer, so the deadline is
# ours. In the main thread a SIGALRM interval timer interrupts sympy (an outer timer is paused, then resumed);
# signals reach only the main thread, so in any other thread the check runs in a forked child that is killed at
# the deadline (Unix only). compute_rewards gives each math answer a first try of MATH_QUICK_FRACTION of the
# limit, then checks the ones that ran out again with the whole limit, MATH_WORKERS at a time: k slow answers in a
# batch cost about k/10 + ceil(k/MATH_WORKERS) limits, not k.

_MATH_MAX_CHARS = 1000
MATH_QUICK_FRACTION = 0.1  # compute_rewards' first try of a math answer: this share of math_timeout_s
MATH_WORKERS = 8  # math answers compute_rewards checks at once after their first try ran out
_ALARM_REPEAT_S = 0.05  # the alarm fires again at this interval in case some library code swallowed the first one
_LATEX_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so math_verify's `except Exception` cannot swallow it."""


def _raise_deadline(signum, frame):
    raise _Deadline


def _parse_math(text: str) -> list:
    """math_verify.parse with its own (whole-second, signal) timeout off: our caller enforces the deadline."""
    if not any(delimiter in text for delimiter in _LATEX_DELIMITERS):
        text = f"${text}$"
    return math_parse(text, parsing_timeout=None)


def _math_check(answer: str, gt: str) -> str:
    """'ok' | 'wrong' | 'unparsable' | 'bad_gt', with no time limit (see _call_with_deadline)."""
    gold = _parse_math(gt)
    if not gold:
        return "bad_gt"
    predicted = _parse_math(answer)
    if not predicted:
        return "unparsable"
    return "ok" if math_verify(gold, predicted, timeout_seconds=None) else "wrong"


def _call_with_alarm(check: Callable[[], str], timeout_s: float) -> str:
    """Main thread: an interval timer raises _Deadline inside sympy; any outer SIGALRM timer is paused and resumed."""
    started = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)
    outer_handler = signal.signal(signal.SIGALRM, _raise_deadline)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s, _ALARM_REPEAT_S)
        try:
            return check()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        return "timeout"
    finally:
        signal.signal(signal.SIGALRM, signal.SIG_DFL if outer_handler is None else outer_handler)
        if outer_delay > 0:
            remaining = max(outer_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, outer_interval)


def _send_result(check: Callable[[], str], sender) -> None:
    sender.send(check())


def _call_in_child_process(check: Callable[[], str], timeout_s: float) -> str:
    """Other threads (signals only reach the main thread): fork, wait for the answer, kill the child at the deadline."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(check, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            return "timeout"
        return receiver.recv()
    except (EOFError, OSError):  # the child died without answering
        return "error"
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()


def _call_with_deadline(check: Callable[[], str], timeout_s: float) -> str:
    if threading.current_thread() is threading.main_thread():
        return _call_with_alarm(check, timeout_s)
    return _call_in_child_process(check, timeout_s)


def _unparsable_math_gt(sample: dict, gt: str) -> SampleError:
    return SampleError(sample, "gt", f"= {gt!r} is not parsable by math_verify (math type)")


def _check_math_gt(sample: dict, gt: str, config: RewardConfig) -> None:
    parses = _call_with_deadline(lambda: "ok" if _parse_math(gt) else "bad_gt", config.math_timeout_s)
    if parses != "ok":
        raise _unparsable_math_gt(sample, gt)


def _math_reward(answer: str, gt: str, sample: dict, config: RewardConfig) -> tuple[float, str]:
    if len(answer) > _MATH_MAX_CHARS:
        return 0.0, "too_long"
    reason = _call_with_deadline(lambda: _math_check(answer, gt), config.math_timeout_s)
    if reason == "bad_gt":
        raise _unparsable_math_gt(sample, gt)
    return (1.0 if reason == "ok" else 0.0), reason


# --- iou -----------------------------------------------------------------------------------------------------------
# One box "[x1, y1, x2, y2]", "(x1, y1, x2, y2)" or a bare "x1, y1, x2, y2", normalised 0..1 unless
# meta["box_format"] (or config.iou_box_format) is "pixel", with meta["image_size"] = [W, H]. Several boxes
# ("ambiguous"), NaN/inf ("invalid_box"), outside the image ("out_of_range"), x2 < x1 or y2 < y1 ("inverted") and
# zero area ("degenerate") give 0.

_COORD = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|nan|[-+]?inf(?:inity)?"
_FOUR_COORDS = rf"\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*,\s*({_COORD})\s*"
_BRACKETED_BOX = re.compile(rf"[\[(]{_FOUR_COORDS}[\])]", re.IGNORECASE)
_BARE_BOX = re.compile(_FOUR_COORDS, re.IGNORECASE)


def _parse_box(text: str) -> tuple[list[float] | None, str]:
    boxes = list(_BRACKETED_BOX.finditer(text))
    if not boxes:
        bare = _BARE_BOX.fullmatch(text)
        boxes = [bare] if bare else []
    if not boxes:
        return None, "unparsable"
    if len(boxes) > 1:
        return None, "ambiguous"
    return [float(value) for value in boxes[0].groups()], "ok"


def _check_box(box: list[float], width: float, height: float) -> str:
    x1, y1, x2, y2 = box
    if not all(math.isfinite(value) for value in box):
        return "invalid_box"
    if min(x1, x2, y1, y2) < 0 or max(x1, x2) > width or max(y1, y2) > height:
        return "out_of_range"
    if x2 < x1 or y2 < y1:
        return "inverted"
    if x2 == x1 or y2 == y1:
        return "degenerate"
    return "ok"


def _box_frame(sample: dict, config: RewardConfig) -> tuple[float, float]:
    """(width, height) the coordinates live in: (1, 1) for normalised boxes, the image size for pixel boxes."""
    meta = _meta(sample)
    if meta.get("box_format", config.iou_box_format) != "pixel":
        return 1.0, 1.0
    size = meta.get("image_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(value, (int, float)) and 0 < value < math.inf for value in size)):
        raise SampleError(sample, "meta.image_size", f"must be [W, H] (positive, finite) for pixel boxes, got {size!r}")
    return float(size[0]), float(size[1])


def box_iou(box_a: list[float], box_b: list[float]) -> float:
    """Intersection over union of two valid [x1, y1, x2, y2] boxes."""
    inter_w = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
    inter_h = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
    intersection = inter_w * inter_h
    area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
    area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
    union = area_a + area_b - intersection
    return intersection / union if union > 0 else 0.0  # two degenerate boxes overlap in nothing


def _iou_gt(sample: dict, config: RewardConfig) -> tuple[list[float], float, float]:
    """(gt box, width, height of the frame the boxes live in)."""
    width, height = _box_frame(sample, config)
    gt = sample["gt"]
    if isinstance(gt, (list, tuple)):  # a JSON list instead of a string
        gt = str(list(gt))
    gt_box, _ = _parse_box(str(gt))
    if gt_box is None or _check_box(gt_box, width, height) != "ok":
        raise SampleError(sample, "gt", f"= {gt!r} is not one valid box [x1, y1, x2, y2] (x1 < x2, y1 < y2) inside "
                                        f"{width:g} x {height:g} (iou type)")
    return gt_box, width, height


def _iou_reward(answer: str, gt_box: list[float], width: float, height: float) -> tuple[float, str]:
    box, reason = _parse_box(answer)
    if box is None:
        return 0.0, reason
    reason = _check_box(box, width, height)
    if reason != "ok":
        return 0.0, reason
    iou = box_iou(box, gt_box)
    return iou, ("ok" if iou > 0 else "wrong")


# --- open-ended ----------------------------------------------------------------------------------------------------
# For a similarity scorer (relative=False) the paper's formula is identically 0 (the reference matches itself
# best), so the reward is the similarity itself, clipped to [0, 1] [deviation]; it counts as correct from
# SIMILARITY_CORRECT on (with F1, one shared word would count otherwise). Scorer exceptions are not caught: they
# are bugs or infrastructure failures, not model output.

_COLORS = ("red", "green", "blue", "yellow")
_SIZES = ("small", "large")
_SHAPES = ("circle", "square", "triangle")
_COUNT_WORDS = {word: value for word, value in _NUMBER_WORDS.items() if 1 <= value <= 10}  # one..ten
_CLAIM = re.compile(
    r"\b(\d{1,3}|" + "|".join(_COUNT_WORDS) + r")\s+"
    r"((?:(?:" + "|".join(_SIZES + _COLORS) + r")\s+){0,2})"
    r"(" + "|".join(_SHAPES + ("shape", "object")) + r")s?\b", re.IGNORECASE)


class ToySceneScorer:
    """S = (#distinct true counting claims) - (#false ones) about meta["scene"], e.g. "2 red circles", "one blue
    square", "3 shapes", "2 large shapes". Claims of zero are ignored, so listing every absent colour/shape pair
    earns nothing. Relative: the reward is the gain over S(gt)."""

    relative = True

    def score(self, answer: str, sample: dict) -> float:
        objects = _scene_objects(sample)
        claims = set()
        for match in _CLAIM.finditer(answer):
            count_text, adjectives, noun = match.group(1).lower(), match.group(2).lower().split(), match.group(3)
            count = _COUNT_WORDS[count_text] if count_text in _COUNT_WORDS else int(count_text)
            colors = [word for word in adjectives if word in _COLORS]
            sizes = [word for word in adjectives if word in _SIZES]
            if count == 0 or len(colors) > 1 or len(sizes) > 1:
                continue
            shape = noun.lower() if noun.lower() in _SHAPES else None
            claims.add((count, shape, colors[0] if colors else None, sizes[0] if sizes else None))
        score = 0
        for count, shape, color, size in claims:
            matching = sum(1 for item in objects if (shape is None or item["shape"] == shape)
                           and (color is None or item["color"] == color) and (size is None or item["size"] == size))
            score += 1 if matching == count else -1
        return float(score)


def _scene_objects(sample: dict) -> list[dict]:
    scene = _meta(sample).get("scene")
    objects = scene.get("objects") if isinstance(scene, dict) else None
    if not isinstance(objects, list) or not all(
            isinstance(item, dict) and {"shape", "color", "size"} <= item.keys() for item in objects):
        raise SampleError(sample, "meta.scene", "must be {'objects': [{'shape', 'color', "
                         f"'size', ...}}, ...]}} for ToySceneScorer")
    return objects


class TokenF1Scorer:
    """SQuAD-style token F1 between the answer and gt (lower-case, no punctuation, no articles). Not relative."""

    relative = False

    @staticmethod
    def tokens(text: str) -> list[str]:
        text = "".join(char for char in text.lower() if char not in string.punctuation)
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    def score(self, answer: str, sample: dict) -> float:
        predicted, reference = self.tokens(answer), self.tokens(str(sample["gt"]))
        if not predicted or not reference:
            return float(predicted == reference)
        overlap = sum((Counter(predicted) & Counter(reference)).values())
        if overlap == 0:
            return 0.0
        precision, recall = overlap / len(predicted), overlap / len(reference)
        return 2 * precision * recall / (precision + recall)


_TOY_SCORER = ToySceneScorer()
_F1_SCORER = TokenF1Scorer()


def _open_scorer(sample: dict, config: RewardConfig) -> OpenScorer:
    if config.open_scorer is not None:
        return config.open_scorer
    return _TOY_SCORER if "scene" in _meta(sample) else _F1_SCORER


def _open_reward(answer: str, sample: dict, config: RewardConfig,
                 reference_scores: dict[int, float]) -> tuple[float, str, dict]:
    scorer = _open_scorer(sample, config)
    score = float(scorer.score(answer, sample))
    if not scorer.relative:
        if not math.isfinite(score):
            return 0.0, "bad_score", {"score": score}
        reward = min(max(score, 0.0), 1.0)
        return reward, ("ok" if reward > 0 else "wrong"), {"score": score}
    if id(sample) not in reference_scores:
        reference_scores[id(sample)] = float(scorer.score(str(sample["gt"]), sample))
    reference = reference_scores[id(sample)]
    info = {"score": score, "ref_score": reference}
    if not (math.isfinite(score) and math.isfinite(reference)):
        return 0.0, "bad_score", info
    if score <= reference:
        return 0.0, "wrong", info
    return 1.0 - math.exp(-(score - reference) * config.open_beta), "ok", info


# --- the mixed reward ----------------------------------------------------------------------------------------------


def _checked_gt(sample: dict, reward_type: str, config: RewardConfig):
    """The sample's gt, parsed for its type; raises ValueError on a bad sample whatever the response."""
    if sample.get("gt") is None:
        raise SampleError(sample, "gt", "is missing")
    if reward_type == "digit":
        return _digit_gt(sample)
    if reward_type == "iou":
        return _iou_gt(sample, config)
    gt = str(sample["gt"]).strip()
    if reward_type in ("mcq", "math") and not gt:
        raise SampleError(sample, "gt", f"is empty ({reward_type} type)")
    return gt


def _require_dict(sample) -> None:
    if not isinstance(sample, dict):
        raise ValueError(f"a sample must be a dict (a JSON object), got {type(sample).__name__}: {sample!r:.80}")


def check_sample(sample, config: RewardConfig | None = None) -> str:
    """The sample's reward type, once every check that does not need a response has passed: the gt parses for its
    type (a number, a box in its frame, a math expression, a toy scene); raises SampleError (a ValueError) naming
    the field. Loaders call it, so that a sample no response could be scored against fails before training."""
    _require_dict(sample)
    config = config or RewardConfig()
    reward_type = resolve_type(sample)
    gt = _checked_gt(sample, reward_type, config)
    if reward_type == "math":
        _check_math_gt(sample, gt, config)
    if reward_type == "open" and config.open_scorer is None and "scene" in _meta(sample):
        _scene_objects(sample)
    return reward_type


def _reward(response: str, sample: dict, config: RewardConfig, reference_scores: dict[int, float]) -> dict:
    _require_dict(sample)
    reward_type = resolve_type(sample)
    gt = _checked_gt(sample, reward_type, config)
    answer, reason = extract_answer(response, config.require_think)
    result = {"reward": 0.0, "type": reward_type, "reason": reason, "answer": answer, "correct": False, "info": {}}
    if answer is None:
        return result
    if reward_type == "digit":
        reward, reason = _digit_reward(answer, gt)
    elif reward_type == "mcq":
        reward, reason = _mcq_reward(answer, gt, sample)
    elif reward_type == "math":
        reward, reason = _math_reward(answer, gt, sample, config)
    elif reward_type == "iou":
        reward, reason = _iou_reward(answer, *gt)
        result["info"] = {"iou": reward}
    else:
        reward, reason, result["info"] = _open_reward(answer, sample, config, reference_scores)
    result.update(reward=float(reward), reason=reason, correct=_is_correct(reward, reward_type, sample, config))
    return result


def _is_correct(reward: float, reward_type: str, sample: dict, config: RewardConfig) -> bool:
    """Whether the reward counts as a correct answer (the accuracy of eval.py and the GRPO logs)."""
    if reward_type == "iou":
        return reward >= IOU_CORRECT
    if reward_type == "open":
        return reward > 0 if _open_scorer(sample, config).relative else reward >= SIMILARITY_CORRECT
    return reward == 1.0


def compute_reward(response: str, sample: dict, *, config: RewardConfig | None = None) -> dict:
    """{"reward": float in [0, 1], "type", "reason", "answer" (text or None), "correct": bool, "info": dict}."""
    return _reward(response, sample, config or RewardConfig(), {})


def compute_rewards(responses: list[str], samples: list[dict], *, config: RewardConfig | None = None) -> list[dict]:
    """compute_reward over a batch; samples may repeat (G responses per prompt): S(gt) is scored once per sample.

    Math answers that outlast a quick first try are checked again together, so that a few math bombs in a group
    cost about one math_timeout_s, not one each."""
    if len(responses) != len(samples):
        raise ValueError(f"compute_rewards: {len(responses)} responses but {len(samples)} samples")
    config = config or RewardConfig()
    quick = replace(config, math_timeout_s=config.math_timeout_s * MATH_QUICK_FRACTION)
    reference_scores: dict[int, float] = {}
    results = [_reward(response, sample, quick, reference_scores) for response, sample in zip(responses, samples)]
    slow = [index for index, result in enumerate(results) if result["reason"] == "timeout"]
    # Off the main thread each check runs in its own child process, so the slow ones overlap.
    with ThreadPoolExecutor(max_workers=MATH_WORKERS, thread_name_prefix="math") as pool:
        rescored = pool.map(lambda index: _reward(responses[index], samples[index], config, reference_scores), slow)
        for index, result in zip(slow, rescored):
            results[index] = result
    return results
