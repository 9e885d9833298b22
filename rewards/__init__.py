"""The mixed reward of VLAA-Thinking: one reward in [0, 1] per (response, sample), picked by the sample's type.

A sample is a data record (data.py) with "gt", a reward type ("verifier_type", or the source it is inferred from:
rewards/types.py) and optional "question" and "meta". The answer is the text of exactly one
<answer>...</answer> block; a missing, repeated or empty block gives 0 (the paper's implicit format reward).

    digit  the answer's numbers must all equal gt (Decimal: "3", "3.0", "03"); arithmetic ("3*3", "3+3", "3²") gives 0
    mcq    the answer must name exactly one option letter A-H ("B", "(b)", "option B", "\\boxed{B}") or be one
           option's text; a gt written as option text is mapped to its letter through the question's options
    math   symbolic equivalence with gt by Math-Verify, within the hard time limit math_timeout_s
    iou    the IoU of the answer's one box [x1, y1, x2, y2] with gt's; correct from IOU_CORRECT = 0.5
    open   the paper's R = 1 - exp(-(S(pred) - S(gt)) * beta) if S(pred) > S(gt) else 0 for a relative scorer S
           (a reward model); a similarity scorer (token F1) gives the similarity, correct from SIMILARITY_CORRECT

Choices the paper leaves open: tags match case-insensitively; require_think (off) also demands a <think> block
first; number words zero..twenty count when the answer has no digits; a math answer over 1,000 characters gives
0; beta = 1.0. The paper's reward model (InternLM-XComposer2.5-Reward) is replaced by token F1 with gt, or by any scorer
named by its import path (the toy recipe's: toyworld:ToySceneScorer, the toy world's scene facts).
Nothing here raises on model output; a bad sample raises SampleError naming the record and the field, a failing
open scorer ScorerError. GRPO sees a reward only through differences within a group (a constant or a scale
cancels): docs/rewards.md.

    from rewards import compute_reward
    compute_reward("<think>...</think><answer>(B)</answer>", {"verifier_type": "mcq", "gt": "B"})
    # {'reward': 1.0, 'type': 'mcq', 'reason': 'ok', 'answer': '(B)', 'correct': True, 'info': {}}
"""

from __future__ import annotations

import math
import re
import unicodedata
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal

from rewards.math_check import check_math
from rewards.open_scorers import OpenScorer, ScorerError, TokenF1Scorer, load_scorer  # noqa: F401 (the API)
from rewards.types import NUMBER_WORDS, REWARD_TYPES, SampleError, record_meta, resolve_type  # noqa: F401

IOU_CORRECT = 0.5  # an iou answer is correct from this IoU on
SIMILARITY_CORRECT = 0.5  # an open answer scored by a similarity (relative=False, e.g. F1) is correct from here on


@dataclass
class RewardConfig:
    """Everything the reward depends on besides the response and the sample; a str open_scorer is imported once."""

    require_think: bool = False  # also demand one <think>...</think> before the answer (the paper: no)
    open_beta: float = 1.0  # beta of the open-ended reward; not reported by the paper
    open_scorer: OpenScorer | str | None = None  # object or "module:attr"; None: token F1 with gt
    math_timeout_s: float = 1.0  # hard wall-clock limit of one math check
    iou_box_format: str = "normalized"  # "normalized" (0..1) or "pixel"; meta["box_format"] overrides it

    def __post_init__(self):
        if isinstance(self.open_scorer, str):
            self.open_scorer = load_scorer(self.open_scorer)
        elif self.open_scorer is None:
            self.open_scorer = TokenF1Scorer()
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
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
# Arithmetic, not a number: "3*3", "6/2", "3=3", "3!", "3²" (a superscript after a digit); "3+3", "3 - 3", "3 x 3",
# "3 times 3" (an operator between two digits, so that "-3" and "3 x" stay numbers).
_EXPRESSION = re.compile(r"\d\s*(?:[*/^=!\u00d7\u00f7\u00b2\u00b3\u00b9\u2070\u2074-\u2079]"
                         r"|(?:[x+\-\u2212]|times|plus|minus|divided by|multiplied by)\s*\d)")


def _to_decimal(number: str) -> Decimal:
    """'−1,234.50' (any Unicode decimal digits) -> Decimal('-1234.50')."""
    if not number.isascii():
        number = "".join(str(unicodedata.decimal(char)) if char.isdecimal() else char for char in number)
    return Decimal(number.replace(",", "").replace("\u2212", "-"))


def _numbers_in(text: str) -> set[Decimal]:
    numbers = {_to_decimal(match.group()) for match in _NUMBER.finditer(text)}
    if not numbers:
        numbers = {Decimal(NUMBER_WORDS[match.group(1).lower()]) for match in _NUMBER_WORD.finditer(text)}
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
# The answer names a letter A-H in one of two ways: a capital standing alone ("B", "The answer is B.", "A or B"),
# unless it is the article of "A right angle"; or, in either case, a letter marked as a choice. Text is compared
# after _plain, so "\\boxed{B}", "**B**" and a fullwidth "Ｂ" read as "B".

# A capital A-H with no letter, digit or apostrophe on either side.
_LONE_CAPITAL = re.compile(r"(?<![A-Za-z0-9'])([A-H])(?![A-Za-z0-9'])")
# "A" before a lower-case word of three or more letters is an article, unless that word joins it to something
# else ("A and C", "A seems right"); two-letter words ("A or B", "A is") never make it an article.
_ARTICLE_A = re.compile(r"A\s+(?!(?:and|nor|then|plus|also|both|versus|through|seems|looks|fits|matches|would"
                        r"|should|could|must|might|will|can)\b)[a-z]{3,}")
# A marked letter, in either case: "(b)" or "[b]" anywhere; "option b" or "choice b"; or the answer's first
# character followed by ")", "." or ":" or by nothing at all ("b", "b.", "B) 45°").
_MARKED_LETTER = re.compile(r"[(\[]([a-h])[)\]]"
                            r"|\b(?:option|choice)\s*[(\[]?([a-h])\b"
                            r"|^[(\[]?([a-h])(?:[)\].:]+(?:\s|$)|$)", re.IGNORECASE)
# An option listed in a question ("A: 30°", "(B) 45°", "C. 60°"): a marker at the start of a line or after a space.
_OPTION_MARKER = re.compile(r"(?:^|(?<=\s))[(\[]?([A-H])[)\].:\uff1a]\s*", re.MULTILINE)
_LATEX_WRAPPER = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{")


def _plain(text: str) -> str:
    """NFKC (fullwidth -> ASCII), LaTeX text wrappers and markdown emphasis removed."""
    text = _LATEX_WRAPPER.sub(" ", unicodedata.normalize("NFKC", text))
    return re.sub(r"[{}*`$]", " ", text).strip()


def _marked(match: re.Match) -> str:
    return (match.group(1) or match.group(2) or match.group(3)).upper()


def _letters_named(answer: str) -> set[str]:
    """Every option letter the answer names (see the rules above the regexes)."""
    text = _plain(answer)
    letters = {match.group(1) for match in _LONE_CAPITAL.finditer(text) if not _ARTICLE_A.match(text, match.start())}
    return letters | {_marked(match) for match in _MARKED_LETTER.finditer(text)}


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
    gt_marked = _MARKED_LETTER.match(_plain(gt))  # gt "B", "(b)", "B. 45°"; else gt is an option's text
    gt_letter = _marked(gt_marked) if gt_marked else _letter_of_text(gt, options)
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
# rewards/math_check.py runs Math-Verify in child processes that are killed at the deadline.

_MATH_MAX_CHARS = 1000
MATH_WORKERS = 8  # math checks compute_rewards runs at once, each in its own child process


def _unparsable_math_gt(sample: dict, gt: str) -> SampleError:
    return SampleError(sample, "gt", f"= {gt!r} is not parsable by math_verify (math type)")


def _math_reward(answer: str, gt: str, sample: dict, config: RewardConfig) -> tuple[float, str]:
    if len(answer) > _MATH_MAX_CHARS:
        return 0.0, "too_long"
    reason = check_math(answer, gt, config.math_timeout_s)
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


def _read_box(text: str, width: float, height: float) -> tuple[list[float] | None, str]:
    """(the one valid box in text, "ok"), else (None, the reason)."""
    boxes = list(_BRACKETED_BOX.finditer(text))
    if not boxes and _BARE_BOX.fullmatch(text):
        boxes = [_BARE_BOX.fullmatch(text)]
    if len(boxes) != 1:
        return None, ("ambiguous" if boxes else "unparsable")
    box = [float(value) for value in boxes[0].groups()]
    x1, y1, x2, y2 = box
    if not all(math.isfinite(value) for value in box):
        return None, "invalid_box"
    if min(box) < 0 or max(x1, x2) > width or max(y1, y2) > height:
        return None, "out_of_range"
    if x2 < x1 or y2 < y1:
        return None, "inverted"
    if x2 == x1 or y2 == y1:
        return None, "degenerate"
    return box, "ok"


def _box_frame(sample: dict, config: RewardConfig) -> tuple[float, float]:
    """(width, height) the coordinates live in: (1, 1) for normalised boxes, the image size for pixel boxes."""
    meta = record_meta(sample)
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
    gt_box, _ = _read_box(str(gt), width, height)
    if gt_box is None:
        raise SampleError(sample, "gt", f"= {gt!r} is not one valid box [x1, y1, x2, y2] (x1 < x2, y1 < y2) inside "
                                        f"{width:g} x {height:g} (iou type)")
    return gt_box, width, height


def _iou_reward(answer: str, gt_box: list[float], width: float, height: float) -> tuple[float, str]:
    box, reason = _read_box(answer, width, height)
    if box is None:
        return 0.0, reason
    iou = box_iou(box, gt_box)
    return iou, ("ok" if iou > 0 else "wrong")


# --- open-ended ----------------------------------------------------------------------------------------------------
# For a similarity scorer (relative=False) the paper's formula is identically 0 (the reference matches itself
# best), so the reward is the similarity itself, clipped to [0, 1] [deviation]; it counts as correct from
# SIMILARITY_CORRECT on (with F1, one shared word would count otherwise). A SampleError from the scorer is a bad
# sample; any other exception is a bug or a failed service, not model output: a ScorerError naming the scorer.


def _score(scorer: OpenScorer, text: str, sample: dict) -> float:
    try:
        return float(scorer.score(text, sample))
    except SampleError:
        raise
    except Exception as error:
        raise ScorerError(f"record {sample.get('id')}: the open scorer {type(scorer).__name__}.score raised "
                          f"{type(error).__name__}: {error}") from error


def _open_reward(answer: str, sample: dict, config: RewardConfig,
                 reference_scores: dict[int, float]) -> tuple[float, str, dict]:
    scorer = config.open_scorer
    score = _score(scorer, answer, sample)
    if not scorer.relative:
        if not math.isfinite(score):
            return 0.0, "bad_score", {"score": score}
        reward = min(max(score, 0.0), 1.0)
        return reward, ("ok" if reward > 0 else "wrong"), {"score": score}
    if id(sample) not in reference_scores:
        reference_scores[id(sample)] = _score(scorer, str(sample["gt"]), sample)
    reference = reference_scores[id(sample)]
    info = {"score": score, "ref_score": reference}
    if not (math.isfinite(score) and math.isfinite(reference)):
        return 0.0, "bad_score", info
    if score <= reference:
        return 0.0, "wrong", info
    return 1.0 - math.exp(-(score - reference) * config.open_beta), "ok", info


# --- the mixed reward ----------------------------------------------------------------------------------------------


def _checked_gt(sample: dict, reward_type: str, config: RewardConfig):
    """The sample's gt, parsed for its type; raises SampleError on a bad sample whatever the response."""
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


def _sample_type(sample) -> str:
    if not isinstance(sample, dict):
        raise ValueError(f"a sample must be a dict (a JSON object), got {type(sample).__name__}: {sample!r:.80}")
    return resolve_type(sample)


def check_sample(sample, config: RewardConfig | None = None) -> str:
    """The sample's reward type, once every check that does not need a response has passed: the gt parses for its
    type (a number, a box in its frame, a math expression) and the open scorer accepts the sample (a toy scene);
    raises SampleError (a ValueError) naming the field. Loaders call it, so that a sample no response could be
    scored against fails before training."""
    config = config or RewardConfig()
    reward_type = _sample_type(sample)
    gt = _checked_gt(sample, reward_type, config)
    if reward_type == "math":
        if check_math(None, gt, config.math_timeout_s) != "ok":
            raise _unparsable_math_gt(sample, gt)
    scorer = config.open_scorer if reward_type == "open" else None
    if hasattr(scorer, "check"):
        scorer.check(sample)  # the toy scorer: meta["scene"] lists the objects
    return reward_type


def _reward(response: str, sample: dict, config: RewardConfig, reference_scores: dict[int, float]) -> dict:
    reward_type = _sample_type(sample)
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
    """Whether the reward counts as a correct answer (the accuracy of evaluate.py and the GRPO logs)."""
    if reward_type == "iou":
        return reward >= IOU_CORRECT
    if reward_type == "open":
        return reward > 0 if config.open_scorer.relative else reward >= SIMILARITY_CORRECT
    return reward == 1.0


def compute_reward(response: str, sample: dict, *, config: RewardConfig | None = None) -> dict:
    """{"reward": float in [0, 1], "type", "reason", "answer" (text or None), "correct": bool, "info": dict}."""
    return _reward(response, sample, config or RewardConfig(), {})


def compute_rewards(responses: list[str], samples: list[dict], *, config: RewardConfig | None = None) -> list[dict]:
    """compute_reward over a batch; samples may repeat (G responses per prompt): S(gt) is scored once per sample.

    The math checks run in a pool of MATH_WORKERS threads, so that a few answers that run into the time limit cost
    about one math_timeout_s together, not one each. Every other sample is scored in the calling thread."""
    if len(responses) != len(samples):
        raise ValueError(f"compute_rewards: {len(responses)} responses but {len(samples)} samples")
    config = config or RewardConfig()
    reference_scores: dict[int, float] = {}
    with ThreadPoolExecutor(max_workers=MATH_WORKERS, thread_name_prefix="math") as pool:
        results = [pool.submit(_reward, response, sample, config, reference_scores) if _sample_type(sample) == "math"
                   else _reward(response, sample, config, reference_scores)
                   for response, sample in zip(responses, samples)]
        return [result.result() if isinstance(result, Future) else result for result in results]
