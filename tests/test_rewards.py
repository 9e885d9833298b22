"""Tests for rewards/: a hand-derived table of cases over every reward type (reward-hacking attempts included),
real symbolic equivalence and the hard math time limit (main thread and worker threads), a seeded fuzzer over 10,000
random and mutated responses, type resolution, the open-ended scorers and the batched API."""

import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

import rewards
from rewards import (RewardConfig, TokenF1Scorer, compute_reward, compute_rewards, extract_answer, load_scorer,
                     math_check, resolve_type)
from tests.helpers import running
from toyworld import ToySceneScorer


@pytest.fixture(autouse=True, scope="module")
def warm_math():
    """Math-Verify is warmed up once per process, before its first child (rewards/math_check.py): the timed
    tests below measure checks, not that."""
    math_check.warm_up()


def wrap(answer: str) -> str:
    return f"<think>Let me look at the image.</think><answer>{answer}</answer>"


# --- samples -------------------------------------------------------------------------------------------------------

DIGIT = {"id": "digit-1", "verifier_type": "digit", "gt": "3"}
MCQ = {"id": "mcq-1", "verifier_type": "mcq", "gt": "(B)",
       "question": "Find the angle.\nChoices:\nA: 30°\nB: 45°\nC: 60°\nD: 90°"}
MCQ_TEXT_GT = {**MCQ, "id": "mcq-2", "gt": "45°"}
MCQ_TEXT_GT_NO_OPTIONS = {"id": "mcq-3", "verifier_type": "mcq", "gt": "45°", "question": "Find the angle."}
MATH = {"id": "math-1", "verifier_type": "math", "gt": "\\frac{1}{2}"}
MATH_POLY = {"id": "math-2", "verifier_type": "math", "gt": "x+1"}
MATH_SET = {"id": "math-3", "verifier_type": "math", "gt": "\\{1, 2\\}"}
MATH_INTERVAL = {"id": "math-4", "verifier_type": "math", "gt": "[0, 1)"}
IOU = {"id": "iou-1", "verifier_type": "iou", "gt": "[0.2, 0.2, 0.6, 0.6]"}
IOU_PIXEL = {"id": "iou-2", "verifier_type": "iou", "gt": "[40, 20, 120, 60]",
             "meta": {"box_format": "pixel", "image_size": [200, 100]}}
SCENE = {"size": [112, 112], "objects": [
    {"shape": "circle", "color": "red", "size": "small", "box": [0.0, 0.0, 0.2, 0.2]},
    {"shape": "circle", "color": "red", "size": "large", "box": [0.5, 0.0, 0.9, 0.4]},
    {"shape": "square", "color": "blue", "size": "small", "box": [0.0, 0.5, 0.2, 0.7]},
    {"shape": "triangle", "color": "yellow", "size": "large", "box": [0.5, 0.5, 0.9, 0.9]},
]}
OPEN_TOY = {"id": "open-1", "verifier_type": "open", "gt": "There are 4 shapes.", "meta": {"scene": SCENE}}
OPEN_F1 = {"id": "open-2", "verifier_type": "open", "gt": "a red truck"}
THINK = RewardConfig(require_think=True)
TOY = RewardConfig(open_scorer="toyworld:ToySceneScorer")  # the toy recipe's open-ended scorer


def gain_reward(gain: float, beta: float = 1.0) -> float:
    """The paper's open-ended reward for a score gain S(pred) - S(ref)."""
    return 1 - math.exp(-gain * beta) if gain > 0 else 0.0


# IoU of the table's boxes, from the geometry: gt [0.2, 0.2, 0.6, 0.6] is 0.4 x 0.4.
IOU_SHIFTED = (0.2 * 0.2) / (0.4 * 0.4 + 0.4 * 0.4 - 0.2 * 0.2)  # pred [0.4, 0.4, 0.8, 0.8]: overlap 0.2 x 0.2
IOU_INSIDE = (0.2 * 0.2) / (0.4 * 0.4)  # pred [0.3, 0.3, 0.5, 0.5] lies inside gt
IOU_HALF = (0.4 * 0.2) / (0.4 * 0.4)  # pred [0.2, 0.2, 0.6, 0.4]: the top half of gt
IOU_WIDE = (0.4 * 0.4) / (0.8 * 0.8)  # pred [0.0, 0.0, 0.8, 0.8] contains gt

LONG = 100_000

# (case id, response, sample, expected reward, expected reason, config or None)
CASES = [
    # -- format: exactly one <answer> block ---------------------------------------------------------------------------
    ("format-ok", wrap("3"), DIGIT, 1.0, "ok", None),
    ("format-no-think-needed", "<answer>3</answer>", DIGIT, 1.0, "ok", None),
    ("format-outside-tags-only", "The answer is 3", DIGIT, 0.0, "format", None),
    ("format-answer-after-block", "<answer>4</answer> oh wait, the answer is 3", DIGIT, 0.0, "wrong", None),
    ("format-two-blocks", "<answer>3</answer><answer>3</answer>", DIGIT, 0.0, "format", None),
    ("format-two-blocks-different", "<answer>2</answer> or <answer>3</answer>", DIGIT, 0.0, "format", None),
    ("format-nested", "<answer><answer>3</answer></answer>", DIGIT, 0.0, "format", None),
    ("format-unclosed", "<think>x</think><answer>3", DIGIT, 0.0, "format", None),
    ("format-unopened", "3</answer>", DIGIT, 0.0, "format", None),
    ("format-reversed", "</answer>3<answer>", DIGIT, 0.0, "format", None),
    ("format-stray-close", "<answer>3</answer></answer>", DIGIT, 0.0, "format", None),
    ("format-tag-in-think", "<think>I will write <answer> later</think><answer>3</answer>", DIGIT, 0.0, "format",
     None),
    ("format-mixed-case-second-block", "<answer>3</answer><ANSWER>3</ANSWER>", DIGIT, 0.0, "format", None),
    ("format-upper-case", "<ANSWER>3</ANSWER>", DIGIT, 1.0, "ok", None),
    ("format-empty", "<answer></answer>", DIGIT, 0.0, "empty", None),
    ("format-blank", "<think>x</think><answer>  \n </answer>", DIGIT, 0.0, "empty", None),
    ("format-empty-string", "", DIGIT, 0.0, "format", None),
    ("format-100kb-think", "<think>" + "x" * LONG + "</think><answer>3</answer>", DIGIT, 1.0, "ok", None),
    ("format-100kb-no-tags", "3 " * (LONG // 2), DIGIT, 0.0, "format", None),
    ("think-required-ok", wrap("3"), DIGIT, 1.0, "ok", THINK),
    ("think-required-missing", "<answer>3</answer>", DIGIT, 0.0, "format", THINK),
    ("think-required-after", "<answer>3</answer><think>x</think>", DIGIT, 0.0, "format", THINK),
    ("think-required-two", "<think>a</think><think>b</think><answer>3</answer>", DIGIT, 0.0, "format", THINK),
    ("think-required-unclosed", "<think>a<answer>3</answer>", DIGIT, 0.0, "format", THINK),
    ("think-required-inside-answer", "<answer><think>a</think>3</answer>", DIGIT, 0.0, "format", THINK),
    # -- digit --------------------------------------------------------------------------------------------------------
    ("digit-plain", wrap("3"), DIGIT, 1.0, "ok", None),
    ("digit-float", wrap("3.0"), DIGIT, 1.0, "ok", None),
    ("digit-leading-zero", wrap("03"), DIGIT, 1.0, "ok", None),
    ("digit-spaces", wrap(" 3 "), DIGIT, 1.0, "ok", None),
    ("digit-sentence", wrap("There are 3 objects left."), DIGIT, 1.0, "ok", None),
    ("digit-repeated-same", wrap("3, so 3"), DIGIT, 1.0, "ok", None),
    ("digit-boxed", wrap("\\boxed{3}"), DIGIT, 1.0, "ok", None),
    ("digit-plus-sign", wrap("+3"), DIGIT, 1.0, "ok", None),
    ("digit-fullwidth", wrap("\uff13"), DIGIT, 1.0, "ok", None),
    ("digit-arabic-indic", wrap("\u0663"), DIGIT, 1.0, "ok", None),
    ("digit-devanagari", wrap("\u0969"), DIGIT, 1.0, "ok", None),
    ("digit-superscript-not-a-digit", wrap("\u00b3"), DIGIT, 0.0, "unparsable", None),
    ("digit-word", wrap("three"), DIGIT, 1.0, "ok", None),
    ("digit-word-capital", wrap("Three."), DIGIT, 1.0, "ok", None),
    ("digit-word-and-digit", wrap("3 (three)"), DIGIT, 1.0, "ok", None),
    ("digit-words-two", wrap("three or four"), DIGIT, 0.0, "ambiguous", None),
    ("digit-wrong", wrap("4"), DIGIT, 0.0, "wrong", None),
    ("digit-negative", wrap("-3"), DIGIT, 0.0, "wrong", None),
    ("digit-close-float", wrap("3.0000001"), DIGIT, 0.0, "wrong", None),
    ("digit-list-hack", wrap("1, 2, 3, 4, 5"), DIGIT, 0.0, "ambiguous", None),
    ("digit-range-hack", wrap("3-4"), DIGIT, 0.0, "ambiguous", None),
    ("digit-or-hack", wrap("3 or 4"), DIGIT, 0.0, "ambiguous", None),
    ("digit-sum-hack", wrap("3+3"), DIGIT, 0.0, "ambiguous", None),  # arithmetic whose every number is gt
    ("digit-difference-hack", wrap("3 - 3"), DIGIT, 0.0, "ambiguous", None),
    ("digit-times-hack", wrap("3 times 3"), DIGIT, 0.0, "ambiguous", None),
    ("digit-square-hack", wrap("3\u00b2"), DIGIT, 0.0, "ambiguous", None),
    ("digit-factorial-hack", wrap("3!"), DIGIT, 0.0, "ambiguous", None),
    ("digit-count-then-dash", wrap("3 - three shapes"), DIGIT, 1.0, "ok", None),  # no digit after the dash
    ("digit-no-number", wrap("many"), DIGIT, 0.0, "unparsable", None),
    ("digit-thousands", wrap("1,000"), {**DIGIT, "gt": "1000"}, 1.0, "ok", None),
    ("digit-huge-wrong", wrap("9" * 10_000), DIGIT, 0.0, "wrong", None),
    ("digit-huge-exact", wrap("3." + "0" * 10_000), DIGIT, 1.0, "ok", None),
    ("digit-huge-gt", wrap("1" + "0" * 5_000), {**DIGIT, "gt": "1" + "0" * 5_000}, 1.0, "ok", None),
    ("digit-100kb-answer", "<answer>" + "1 2 " * (LONG // 4) + "</answer>", DIGIT, 0.0, "ambiguous", None),
    # -- mcq ----------------------------------------------------------------------------------------------------------
    ("mcq-letter", wrap("B"), MCQ, 1.0, "ok", None),
    ("mcq-paren-close", wrap("B)"), MCQ, 1.0, "ok", None),
    ("mcq-paren-lower", wrap("(b)"), MCQ, 1.0, "ok", None),
    ("mcq-lower", wrap("b"), MCQ, 1.0, "ok", None),
    ("mcq-dot-text", wrap("B. 45°"), MCQ, 1.0, "ok", None),
    ("mcq-option", wrap("option B"), MCQ, 1.0, "ok", None),
    ("mcq-option-lower", wrap("Option b"), MCQ, 1.0, "ok", None),
    ("mcq-the-answer-is", wrap("The answer is B."), MCQ, 1.0, "ok", None),
    ("mcq-answer-colon", wrap("Answer: (B)"), MCQ, 1.0, "ok", None),
    ("mcq-boxed", wrap("\\boxed{B}"), MCQ, 1.0, "ok", None),
    ("mcq-bold", wrap("**B**"), MCQ, 1.0, "ok", None),
    ("mcq-fullwidth", wrap("\uff22"), MCQ, 1.0, "ok", None),
    ("mcq-i-think", wrap("I think B"), MCQ, 1.0, "ok", None),
    ("mcq-article-a", wrap("A right angle is not it, so B"), MCQ, 1.0, "ok", None),
    ("mcq-option-text", wrap("45°"), MCQ, 1.0, "ok", None),
    ("mcq-option-text-wrong", wrap("60°"), MCQ, 0.0, "wrong", None),
    ("mcq-wrong", wrap("C"), MCQ, 0.0, "wrong", None),
    ("mcq-out-of-options", wrap("E"), MCQ, 0.0, "wrong", None),
    ("mcq-all-listed", wrap("A, B, C, D"), MCQ, 0.0, "ambiguous", None),
    ("mcq-all-parens", wrap("(A)(B)(C)(D)"), MCQ, 0.0, "ambiguous", None),
    ("mcq-all-markers", wrap("A) B) C) D)"), MCQ, 0.0, "ambiguous", None),
    ("mcq-a-or-b", wrap("A or B"), MCQ, 0.0, "ambiguous", None),
    ("mcq-b-and-c", wrap("B and C"), MCQ, 0.0, "ambiguous", None),
    ("mcq-letter-then-other", wrap("B. Or maybe (C)"), MCQ, 0.0, "ambiguous", None),
    ("mcq-no-letter", wrap("none of them"), MCQ, 0.0, "unparsable", None),
    ("mcq-100kb", wrap("B " + "x " * (LONG // 2)), MCQ, 1.0, "ok", None),
    ("mcq-100kb-all-options", wrap("A B C D " * (LONG // 8)), MCQ, 0.0, "ambiguous", None),
    ("mcq-gt-plain-letter", wrap("(B)"), {**MCQ, "gt": "B"}, 1.0, "ok", None),
    ("mcq-gt-lower-letter", wrap("B"), {**MCQ, "gt": "b"}, 1.0, "ok", None),
    ("mcq-gt-letter-with-text", wrap("B"), {**MCQ, "gt": "B. 45°"}, 1.0, "ok", None),
    ("mcq-gt-text-letter", wrap("B"), MCQ_TEXT_GT, 1.0, "ok", None),
    ("mcq-gt-text-text", wrap("45°"), MCQ_TEXT_GT, 1.0, "ok", None),
    ("mcq-gt-text-wrong-letter", wrap("(C)"), MCQ_TEXT_GT, 0.0, "wrong", None),
    ("mcq-gt-text-no-options", wrap("45 °"), MCQ_TEXT_GT_NO_OPTIONS, 1.0, "ok", None),
    ("mcq-gt-text-no-options-letter", wrap("B"), MCQ_TEXT_GT_NO_OPTIONS, 0.0, "wrong", None),
    ("mcq-gt-text-no-options-list", wrap("30° or 45°"), MCQ_TEXT_GT_NO_OPTIONS, 0.0, "wrong", None),
    # -- math ---------------------------------------------------------------------------------------------------------
    ("math-decimal", wrap("0.5"), MATH, 1.0, "ok", None),
    ("math-slash", wrap("1/2"), MATH, 1.0, "ok", None),
    ("math-frac", wrap("\\frac{1}{2}"), MATH, 1.0, "ok", None),
    ("math-frac-short", wrap("$\\frac12$"), MATH, 1.0, "ok", None),
    ("math-boxed", wrap("\\boxed{\\frac{1}{2}}"), MATH, 1.0, "ok", None),
    ("math-boxed-in-sentence", wrap("So the ratio is $\\boxed{0.5}$."), MATH, 1.0, "ok", None),
    ("math-wrong", wrap("0.6"), MATH, 0.0, "wrong", None),
    ("math-two-boxed-hack", wrap("\\boxed{0.5} \\boxed{0.6}"), MATH, 0.0, "wrong", None),
    ("math-list-hack", wrap("0.5, 0.6, 0.7"), MATH, 0.0, "wrong", None),
    ("math-empty-boxed", wrap("\\boxed{}"), MATH, 0.0, "unparsable", None),
    ("math-empty-dollars", wrap("$$"), MATH, 0.0, "unparsable", None),
    ("math-too-long", wrap("1/2 + " * 200 + "0"), MATH, 0.0, "too_long", None),
    ("math-100kb", wrap("x" * LONG), MATH, 0.0, "too_long", None),
    ("math-commuted", wrap("1+x"), MATH_POLY, 1.0, "ok", None),
    ("math-expanded", wrap("\\frac{2x+2}{2}"), MATH_POLY, 1.0, "ok", None),
    ("math-poly-wrong", wrap("x+2"), MATH_POLY, 0.0, "wrong", None),
    ("math-set-reordered", wrap("\\{2, 1\\}"), MATH_SET, 1.0, "ok", None),
    ("math-set-wrong", wrap("\\{1, 3\\}"), MATH_SET, 0.0, "wrong", None),
    ("math-interval", wrap("[0,1)"), MATH_INTERVAL, 1.0, "ok", None),
    ("math-interval-flipped", wrap("(0, 1]"), MATH_INTERVAL, 0.0, "wrong", None),
    ("math-sqrt", wrap("2^{1/2}"), {**MATH, "gt": "\\sqrt{2}"}, 1.0, "ok", None),
    # -- iou ----------------------------------------------------------------------------------------------------------
    ("iou-exact", wrap("[0.2, 0.2, 0.6, 0.6]"), IOU, 1.0, "ok", None),
    ("iou-parens", wrap("(0.2, 0.2, 0.6, 0.6)"), IOU, 1.0, "ok", None),
    ("iou-bare", wrap("0.2, 0.2, 0.6, 0.6"), IOU, 1.0, "ok", None),
    ("iou-in-sentence", wrap("The cat is at [0.2,0.2,0.6,0.6]."), IOU, 1.0, "ok", None),
    ("iou-shifted", wrap("[0.4, 0.4, 0.8, 0.8]"), IOU, IOU_SHIFTED, "ok", None),
    ("iou-inside", wrap("[0.3, 0.3, 0.5, 0.5]"), IOU, IOU_INSIDE, "ok", None),
    ("iou-half", wrap("[0.2, 0.2, 0.6, 0.4]"), IOU, IOU_HALF, "ok", None),
    ("iou-wide", wrap("[0, 0, 0.8, 0.8]"), IOU, IOU_WIDE, "ok", None),
    ("iou-whole-image-hack", wrap("[0, 0, 1, 1]"), IOU, (0.4 * 0.4) / 1.0, "ok", None),
    ("iou-disjoint", wrap("[0.7, 0.7, 0.9, 0.9]"), IOU, 0.0, "wrong", None),
    ("iou-touching", wrap("[0.6, 0.2, 0.9, 0.6]"), IOU, 0.0, "wrong", None),
    ("iou-inverted-x", wrap("[0.6, 0.2, 0.2, 0.6]"), IOU, 0.0, "inverted", None),
    ("iou-inverted-y", wrap("[0.2, 0.6, 0.6, 0.2]"), IOU, 0.0, "inverted", None),
    ("iou-degenerate", wrap("[0.2, 0.2, 0.2, 0.6]"), IOU, 0.0, "degenerate", None),
    ("iou-out-of-range-high", wrap("[0.2, 0.2, 1.2, 0.6]"), IOU, 0.0, "out_of_range", None),
    ("iou-out-of-range-negative", wrap("[-0.1, 0.2, 0.6, 0.6]"), IOU, 0.0, "out_of_range", None),
    ("iou-pixels-when-normalised", wrap("[40, 20, 120, 60]"), IOU, 0.0, "out_of_range", None),
    ("iou-nan", wrap("[nan, 0.2, 0.6, 0.6]"), IOU, 0.0, "invalid_box", None),
    ("iou-inf", wrap("[0.2, 0.2, inf, 0.6]"), IOU, 0.0, "invalid_box", None),
    ("iou-two-boxes-hack", wrap("[0.2, 0.2, 0.6, 0.6] [0, 0, 1, 1]"), IOU, 0.0, "ambiguous", None),
    ("iou-same-box-twice", wrap("[0.2, 0.2, 0.6, 0.6], [0.2, 0.2, 0.6, 0.6]"), IOU, 0.0, "ambiguous", None),
    ("iou-five-numbers", wrap("[0.2, 0.2, 0.6, 0.6, 0.9]"), IOU, 0.0, "unparsable", None),
    ("iou-three-numbers", wrap("[0.2, 0.2, 0.6]"), IOU, 0.0, "unparsable", None),
    ("iou-words", wrap("top left"), IOU, 0.0, "unparsable", None),
    ("iou-100kb", wrap("[" * LONG), IOU, 0.0, "unparsable", None),
    ("iou-pixel-exact", wrap("[40, 20, 120, 60]"), IOU_PIXEL, 1.0, "ok", None),
    # gt is [0.2, 0.2, 0.6, 0.6] once divided by (200, 100); pred [80, 40, 160, 80] is [0.4, 0.4, 0.8, 0.8].
    ("iou-pixel-shifted", wrap("[80, 40, 160, 80]"), IOU_PIXEL, IOU_SHIFTED, "ok", None),
    ("iou-pixel-out-of-range", wrap("[0, 0, 250, 50]"), IOU_PIXEL, 0.0, "out_of_range", None),
    ("iou-pixel-given-normalised", wrap("[0.2, 0.2, 0.6, 0.6]"), IOU_PIXEL, 0.0, "wrong", None),
    # -- open, toy scene: S = #distinct true claims - #false claims; S(gt "There are 4 shapes.") = 1 -----------------
    ("open-toy-same-as-gt", wrap("There are 4 shapes."), OPEN_TOY, 0.0, "wrong", TOY),
    ("open-toy-full", wrap("4 shapes: 2 red circles, one blue square and one yellow triangle."), OPEN_TOY,
     gain_reward(4 - 1), "ok", TOY),
    ("open-toy-two-true", wrap("2 circles and 2 large shapes"), OPEN_TOY, gain_reward(2 - 1), "ok", TOY),
    ("open-toy-sizes", wrap("1 small red circle and 1 large red circle"), OPEN_TOY, gain_reward(2 - 1), "ok", TOY),
    ("open-toy-words", wrap("Two red circles, one small blue square."), OPEN_TOY, gain_reward(2 - 1), "ok", TOY),
    ("open-toy-repeat-hack", wrap("4 shapes. 4 shapes. 4 shapes. Four shapes."), OPEN_TOY, 0.0, "wrong", TOY),
    ("open-toy-false", wrap("5 shapes"), OPEN_TOY, 0.0, "wrong", TOY),
    ("open-toy-contradiction", wrap("2 red circles and 3 red circles"), OPEN_TOY, 0.0, "wrong", TOY),
    ("open-toy-enumerate-hack", wrap(" ".join(f"{n} red circles" for n in range(1, 11))), OPEN_TOY, 0.0, "wrong",
     TOY),
    ("open-toy-zero-claims-ignored", wrap("0 green squares, 0 green circles"), OPEN_TOY, 0.0, "wrong", TOY),
    ("open-toy-mixed", wrap("4 shapes, 2 red circles, 2 blue squares"), OPEN_TOY, gain_reward(1 - 1), "wrong",
     TOY),
    ("open-toy-no-claims", wrap("a nice picture"), OPEN_TOY, 0.0, "wrong", TOY),
    # -- open, token F1 with gt "a red truck" -> tokens [red, truck] -------------------------------------------------
    ("open-f1-exact", wrap("Red truck."), OPEN_F1, 1.0, "ok", None),
    ("open-f1-half", wrap("the red car"), OPEN_F1, 2 * 0.5 * 0.5 / (0.5 + 0.5), "ok", None),
    ("open-f1-repeated", wrap("red truck red truck"), OPEN_F1, 2 * 0.5 * 1.0 / (0.5 + 1.0), "ok", None),
    ("open-f1-one-word-of-six", wrap("a red car parked near the big house"), OPEN_F1,
     2 * (1 / 6) * (1 / 2) / (1 / 6 + 1 / 2), "ok", None),  # some reward, not correct: F1 0.25 < 0.5
    ("open-f1-none", wrap("blue"), OPEN_F1, 0.0, "wrong", None),
    ("open-f1-only-articles", wrap("the a an"), OPEN_F1, 0.0, "wrong", None),
]


@pytest.mark.parametrize("response,sample,expected_reward,expected_reason,config",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_reward_table(response, sample, expected_reward, expected_reason, config):
    result = compute_reward(response, sample, config=config)
    assert result["reward"] == pytest.approx(expected_reward, abs=1e-12)
    assert result["reason"] == expected_reason
    assert result["type"] == sample["verifier_type"]
    assert (result["answer"] is None) == (expected_reason in ("format", "empty"))
    open_correct = expected_reward > 0 if sample is OPEN_TOY else expected_reward >= 0.5  # relative or F1
    expected_correct = {"iou": expected_reward >= 0.5, "open": open_correct}.get(
        sample["verifier_type"], expected_reward == 1.0)
    assert result["correct"] == expected_correct


def test_table_is_large_and_covers_every_type():
    assert len(CASES) >= 100
    assert {case[2]["verifier_type"] for case in CASES} == set(rewards.REWARD_TYPES)
    assert len({case[0] for case in CASES}) == len(CASES)


def test_extract_answer_returns_stripped_text():
    assert extract_answer("<think>a</think> <answer>  (B) </answer>") == ("(B)", "ok")
    assert extract_answer("<answer>x</answer>", require_think=True) == (None, "format")
    assert extract_answer("<answer>x</answer><answer>y</answer>") == (None, "format")


# --- iou against a rasterised reference -----------------------------------------------------------------------------


def raster_iou(box_a, box_b, cells: int) -> Fraction:
    """IoU by counting the unit cells of a cells x cells grid covered by each box (coordinates are multiples of
    1/cells), so it shares no formula with rewards.box_iou."""
    def covered(box):
        x1, y1, x2, y2 = (round(value * cells) for value in box)
        return {(x, y) for x in range(x1, x2) for y in range(y1, y2)}
    a, b = covered(box_a), covered(box_b)
    return Fraction(len(a & b), len(a | b))


def test_iou_matches_rasterised_reference():
    rng = random.Random(0)
    cells = 20
    for _ in range(200):
        boxes = []
        for _ in range(2):
            x1, x2 = sorted(rng.sample(range(cells + 1), 2))
            y1, y2 = sorted(rng.sample(range(cells + 1), 2))
            boxes.append([x1 / cells, y1 / cells, x2 / cells, y2 / cells])
        predicted, reference = boxes
        sample = {"id": "iou-raster", "verifier_type": "iou", "gt": str(reference)}
        result = compute_reward(wrap(str(predicted)), sample)
        assert result["reward"] == pytest.approx(float(raster_iou(predicted, reference, cells)), abs=1e-9)


# --- math: equivalence and the hard time limit ----------------------------------------------------------------------

SLOW_MATH = ["9^{9^{9}}", "999999999!", "\\binom{10^{9}}{5 \\cdot 10^{8}}"]


@pytest.mark.parametrize("answer", SLOW_MATH)
def test_slow_math_times_out_in_main_thread(answer):
    config = RewardConfig(math_timeout_s=0.3)
    started = time.monotonic()
    result = compute_reward(wrap(answer), {"id": "slow", "verifier_type": "math", "gt": "1"}, config=config)
    elapsed = time.monotonic() - started
    assert (result["reward"], result["reason"]) == (0.0, "timeout")
    assert elapsed < config.math_timeout_s + 0.3


def run_in_thread(function):
    box = {}
    worker = threading.Thread(target=lambda: box.update(value=function()))
    worker.start()
    worker.join()
    return box["value"]


def test_math_in_worker_thread_is_correct_and_bounded():
    config = RewardConfig(math_timeout_s=0.5)
    good = run_in_thread(lambda: compute_reward(wrap("0.5"), MATH, config=config))
    assert (good["reward"], good["reason"]) == (1.0, "ok")
    wrong = run_in_thread(lambda: compute_reward(wrap("0.6"), MATH, config=config))
    assert (wrong["reward"], wrong["reason"]) == (0.0, "wrong")
    started = time.monotonic()
    slow = run_in_thread(lambda: compute_reward(wrap(SLOW_MATH[0]), {"id": "slow", "verifier_type": "math",
                                                                     "gt": "1"}, config=config))
    assert (slow["reward"], slow["reason"]) == (0.0, "timeout")
    assert time.monotonic() - started < config.math_timeout_s + 0.5


def test_math_bombs_in_one_batch_cost_about_one_time_limit(monkeypatch):
    real_check = math_check._math_check
    delays = {"bomb": 60.0, "slow": 0.3}  # a bomb never ends; "slow" takes a while but stays within the limit

    def check(answer, gt):
        time.sleep(delays.get(answer, 0.0))
        return "ok" if answer == "slow" else real_check(answer, gt)

    monkeypatch.setattr(math_check, "_math_check", check)
    monkeypatch.setattr(math_check, "_idle", [])  # the children forked from now on run the patched check
    config = RewardConfig(math_timeout_s=1.0)
    answers = ["bomb", "0.5", "slow", "bomb", "0.6", "bomb"]
    started = time.monotonic()
    results = compute_rewards([wrap(answer) for answer in answers], [MATH] * len(answers), config=config)
    elapsed = time.monotonic() - started
    assert [result["reason"] for result in results] == ["timeout", "ok", "ok", "timeout", "wrong", "timeout"]
    assert elapsed < 2 * config.math_timeout_s  # one after the other: 3 limits


def test_a_check_after_a_timeout_or_a_crash_gets_a_fresh_child(monkeypatch):
    slow = {"id": "slow", "verifier_type": "math", "gt": "1"}
    assert compute_reward(wrap(SLOW_MATH[0]), slow, config=RewardConfig(math_timeout_s=0.3))["reason"] == "timeout"
    assert compute_reward(wrap("0.5"), MATH)["reason"] == "ok"  # the killed child was replaced
    real_check = math_check._math_check
    monkeypatch.setattr(math_check, "_math_check",
                        lambda answer, gt: os._exit(1) if answer == "crash" else real_check(answer, gt))
    monkeypatch.setattr(math_check, "_idle", [])  # the children forked from now on run the patched check
    crashed = compute_reward(wrap("crash"), MATH)
    assert (crashed["reward"], crashed["reason"], crashed["correct"]) == (0.0, "error", False)
    assert compute_reward(wrap("0.5"), MATH)["reason"] == "ok"


def test_math_workers_outlive_the_thread_pool_that_forked_them():
    """The kernel's parent-death signal follows the forking thread: the workers must survive the end of
    compute_rewards' pool, else every batch would find them dead and score its math answers "error"."""
    first = compute_rewards([wrap("0.5")] * 4, [MATH] * 4)
    workers = list(math_check._idle)
    time.sleep(0.3)  # the pool's threads have ended
    assert workers and all(worker.process.is_alive() for worker in workers)
    assert [r["reason"] for r in first + compute_rewards([wrap("0.5")] * 4, [MATH] * 4)] == ["ok"] * 8


def test_a_math_worker_leaves_ctrl_c_to_its_parent():
    """Ctrl-C reaches the terminal's whole process group; the worker ignores it (no traceback of its own) and
    ends when the parent does."""
    compute_reward(wrap("0.5"), MATH)
    worker = math_check._idle[-1]
    os.kill(worker.process.pid, signal.SIGINT)
    time.sleep(0.3)
    assert worker.process.is_alive() and compute_reward(wrap("0.5"), MATH)["reason"] == "ok"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_math_workers_die_with_a_parent_killed_by_sigkill():
    """kill -9 runs no clean-up: the kernel ends the workers (prctl's parent-death signal), however busy they are."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom rewards import compute_rewards, math_check\n"
         f"compute_rewards([{wrap('0.5')!r}] * 4, [{MATH!r}] * 4)\n"
         "print(*[worker.process.pid for worker in math_check._idle], flush=True)\ntime.sleep(300)"],
        cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    workers = [int(pid) for pid in parent.stdout.readline().split()]
    try:
        assert workers and all(running(pid) for pid in workers)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while any(running(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(pid) for pid in workers)
    finally:
        for pid in filter(running, workers):  # only if the test failed: leave no process behind
            os.kill(pid, signal.SIGKILL)


def test_math_time_limit_leaves_an_outer_sigalrm_handler_and_timer_alone():
    fired = []

    def outer_handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, outer_handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        compute_reward(wrap("0.5"), MATH)
        compute_reward(wrap(SLOW_MATH[0]), {"id": "slow", "verifier_type": "math", "gt": "1"},
                       config=RewardConfig(math_timeout_s=0.2))
        assert signal.getsignal(signal.SIGALRM) is outer_handler
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


# --- fuzzing: no exception, reward in [0, 1], each call fast --------------------------------------------------------

FUZZ_SAMPLES = [DIGIT, MCQ, MCQ_TEXT_GT, MATH, MATH_POLY, IOU, IOU_PIXEL, OPEN_TOY, OPEN_F1]
FUZZ_TAGS = ["<answer>", "</answer>", "<think>", "</think>", "<ANSWER>", "<answer", "answer>", "<", ">", "/"]
FUZZ_PIECES = [
    "3", "03", "3.0", "-", "+", ",", ".", " ", "\n", "\t", "1,000", "9" * 60, "0" * 40, "\uff13", "\u0663", "\u00b3",
    "three", "One", "A", "B", "(b)", "C)", "D.", "option", "The answer is", "A or B", "I", "a",
    "\\boxed{", "}", "{", "\\frac{1}{2}", "\\frac{", "1/2", "x+1", "^", "_", "$", "\\{", "\\}", "[", "]", "(", ")",
    "!", "\\sqrt{", "\\infty", "\\text{", "\\left(", "\\right)", "=", "\\in", "\\cup",
    "[0.2, 0.2, 0.6, 0.6]", "(0.1, 0.1, 0.5, 0.5)", "nan", "inf", "-0.1", "1e5", "0.", ".5",
    "2 red circles", "one blue square", "4 shapes", "yellow", "triangles", "large", "red truck", "the",
    "\u0000", "\ufffd", "\U0001f914", "\u202e", "\u0130", "\u00df", "\\", "\\\\", "%", "#", "'", '"',
]
# Well-formed templates are listed several times so that most responses get past the tags to a verifier.
FUZZ_TEMPLATES = 4 * ["<think>{x}</think><answer>{y}</answer>", "<answer>{y}</answer>"] + [
    "{x}<answer>{y}</answer>{x}", "<think>{x}</think>{y}", "<answer>{y}", "<think>{x}<answer>{y}</answer></think>",
    "{x}{y}",
]


def random_text(rng: random.Random, max_pieces: int) -> str:
    parts = []
    for _ in range(rng.randint(0, max_pieces)):
        kind = rng.random()
        if kind < 0.75:
            parts.append(rng.choice(FUZZ_PIECES))
        elif kind < 0.9:
            parts.append(chr(rng.randint(32, 0x2FFF)))
        else:
            parts.append(str(rng.randint(-10**6, 10**6) / rng.choice([1, 10, 1000])))
    return "".join(parts)


def mutate(text: str, rng: random.Random) -> str:
    """1-4 random edits: delete, duplicate or replace a slice, or insert a tag or fuzz piece."""
    for _ in range(rng.randint(1, 4)):
        start = rng.randint(0, len(text))
        end = min(len(text), start + rng.randint(0, 12))
        operation = rng.randrange(4)
        if operation == 0:
            text = text[:start] + text[end:]
        elif operation == 1:
            text = text[:end] + text[start:end] + text[end:]
        elif operation == 2:
            text = text[:start] + rng.choice(FUZZ_TAGS if rng.random() < 0.3 else FUZZ_PIECES) + text[end:]
        else:
            text = text[:start] + chr(rng.randint(0, 0x10FFFF) if rng.random() < 0.3 else rng.randint(32, 126)) + \
                text[end:]
    return text


def fuzz_response(rng: random.Random) -> str:
    template = rng.choice(FUZZ_TEMPLATES)
    response = template.format(x=random_text(rng, 6), y=random_text(rng, 8))
    return mutate(response, rng) if rng.random() < 0.5 else response


FUZZ_CONFIG = RewardConfig(math_timeout_s=0.5)
FUZZ_TOY = RewardConfig(math_timeout_s=0.5, open_scorer="toyworld:ToySceneScorer")
FUZZ_CHUNKS = 5
FUZZ_PER_CHUNK = 2_000  # 5 x 2,000 = 10,000 responses in the default suite


def check_many(responses, rng):
    for response in responses:
        sample = rng.choice(FUZZ_SAMPLES)
        config = THINK if rng.random() < 0.1 else FUZZ_TOY if sample is OPEN_TOY else FUZZ_CONFIG
        started = time.monotonic()
        result = compute_reward(response, sample, config=config)
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, (response, sample["id"], elapsed)
        assert 0.0 <= result["reward"] <= 1.0 and math.isfinite(result["reward"]), (response, result)
        assert isinstance(result["reason"], str) and isinstance(result["correct"], bool)
        assert result["type"] == sample["verifier_type"]


@pytest.mark.parametrize("chunk", range(FUZZ_CHUNKS))
def test_fuzzed_responses_never_raise_and_stay_in_range(chunk):
    rng = random.Random(1000 + chunk)
    check_many([fuzz_response(rng) for _ in range(FUZZ_PER_CHUNK)], rng)


def test_fuzz_reaches_every_outcome():
    """The fuzzer is only useful if it produces rewarded, refused and malformed responses alike."""
    rng = random.Random(7)
    reasons = set()
    for _ in range(1_500):
        sample = rng.choice(FUZZ_SAMPLES)
        config = FUZZ_TOY if sample is OPEN_TOY else FUZZ_CONFIG
        reasons.add(compute_reward(fuzz_response(rng), sample, config=config)["reason"])
    assert {"ok", "wrong", "format", "unparsable", "ambiguous"} <= reasons


# --- type resolution ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,expected", [
    ({"verifier_type": "digit"}, "digit"),
    ({"verifier_type": " MCQ "}, "mcq"),
    ({"verifier_type": "multiple_choice"}, "mcq"),
    ({"verifier_type": "Multiple-Choice"}, "mcq"),
    ({"verifier_type": "number"}, "digit"),
    ({"verifier_type": "open-ended"}, "open"),
    ({"verifier_type": "bbox"}, "iou"),
    ({"verifier_type": "math", "image": "coco/x.jpg"}, "math"),
    ({"meta": {"source": "CLEVR-Math"}}, "digit"),
    ({"source": "GeoQA170K"}, "mcq"),
    ({"image": "geoqa170k/images/1.png"}, "mcq"),
    ({"image": "arxivqa/images/2.jpg"}, "mcq"),
    ({"image": "clevr_math/CLEVR_train_027977.png"}, "digit"),
    ({"image": "/data/images/math_puma/x.png"}, "math"),
    ({"image": "coco/train2017/000000000009.jpg"}, "iou"),
    ({"image": "vg/VG_100K/1.jpg"}, "iou"),
    ({"source": "LLaVA-CoT-COCO"}, "iou"),
    ({"image": ["docvqa/a.png", "docvqa/b.png"]}, "open"),
    ({"meta": {"source": "vizwiz"}, "image": "unknown/x.png"}, "open"),
    ({"source": "ALLaVA"}, "open"),
])
def test_resolve_type(record, expected):
    assert resolve_type(record) == expected


@pytest.mark.parametrize("record,field", [
    ({"id": "rec-7", "verifier_type": "essay"}, "verifier_type"),
    ({"id": "rec-8", "image": "imagenet/x.png"}, "image"),
    ({"id": "rec-9"}, "source"),
])
def test_resolve_type_unknown_names_the_record(record, field):
    with pytest.raises(ValueError, match=record["id"]) as error:
        resolve_type(record)
    assert field in str(error.value)


# --- bad samples raise (model output never does) --------------------------------------------------------------------


@pytest.mark.parametrize("sample,field", [
    ({"id": "bad-1", "verifier_type": "digit"}, "gt"),
    ({"id": "bad-2", "verifier_type": "digit", "gt": "many"}, "gt"),
    ({"id": "bad-3", "verifier_type": "mcq", "gt": " "}, "gt"),
    ({"id": "bad-4", "verifier_type": "math", "gt": ""}, "gt"),
    ({"id": "bad-5", "verifier_type": "iou", "gt": "[0.5, 0.5, 0.1, 0.1]"}, "gt"),
    ({"id": "bad-6", "verifier_type": "iou", "gt": "[1, 2, 3, 4]", "meta": {"box_format": "pixel"}}, "image_size"),
    ({"id": "bad-7", "verifier_type": "open", "gt": "x", "meta": {"scene": {"objects": [{"shape": "circle"}]}}},
     "meta.scene"),
])
def test_bad_samples_raise_with_record_and_field(sample, field):
    config = TOY if "scene" in sample.get("meta", {}) else None  # a scene is checked by the toy scorer
    with pytest.raises(ValueError, match=sample["id"]) as error:
        compute_reward(wrap("[0.1, 0.1, 0.2, 0.2] 1"), sample, config=config)
    assert field in str(error.value)


def test_bad_samples_raise_whatever_the_response():
    for response in ["no tags", "<answer></answer>", wrap("3")]:
        with pytest.raises(ValueError, match="bad-2"):
            compute_reward(response, {"id": "bad-2", "verifier_type": "digit", "gt": "many"})


# --- scorers, config, batching --------------------------------------------------------------------------------------


class CountingScorer:
    """Relative scorer: S = number of words; counts calls."""

    relative = True

    def __init__(self):
        self.calls = 0

    def score(self, answer, sample):
        self.calls += 1
        return float(len(answer.split()))


class FixedSimilarity:
    relative = False

    def __init__(self, value):
        self.value = value

    def score(self, answer, sample):
        return self.value


def test_relative_scorer_uses_the_paper_formula_with_beta():
    scorer = CountingScorer()
    config = RewardConfig(open_scorer=scorer, open_beta=0.5)
    sample = {"id": "rm-1", "verifier_type": "open", "gt": "two words"}
    result = compute_reward(wrap("five words in this answer"), sample, config=config)
    assert result["reward"] == pytest.approx(gain_reward(5 - 2, beta=0.5))
    assert result["info"] == {"score": 5.0, "ref_score": 2.0}
    assert compute_reward(wrap("one"), sample, config=config)["reward"] == 0.0


@pytest.mark.parametrize("value,expected,reason,correct", [
    (0.25, 0.25, "ok", False), (0.5, 0.5, "ok", True), (1.7, 1.0, "ok", True), (-0.3, 0.0, "wrong", False),
    (float("nan"), 0.0, "bad_score", False),
])
def test_similarity_scorer_reward_is_the_clipped_score(value, expected, reason, correct):
    config = RewardConfig(open_scorer=FixedSimilarity(value))
    result = compute_reward(wrap("anything"), OPEN_F1, config=config)
    assert (result["reward"], result["reason"], result["correct"]) == (expected, reason, correct)
    assert rewards.SIMILARITY_CORRECT == 0.5


def test_a_relative_scorer_counts_any_gain_as_correct():
    config = RewardConfig(open_scorer=CountingScorer(), open_beta=0.5)
    sample = {"id": "rm-1", "verifier_type": "open", "gt": "two words"}
    result = compute_reward(wrap("three words here"), sample, config=config)  # gain 1: reward 0.39
    assert 0 < result["reward"] < rewards.SIMILARITY_CORRECT and result["correct"]


def test_compute_rewards_scores_the_reference_once_per_sample():
    scorer = CountingScorer()
    config = RewardConfig(open_scorer=scorer)
    group_size = 4
    prompts = [{"id": "p1", "verifier_type": "open", "gt": "a b"}, {"id": "p2", "verifier_type": "open", "gt": "c"}]
    samples = [sample for sample in prompts for _ in range(group_size)]
    responses = [wrap("word " * (index + 1)) for index in range(len(samples))]
    results = compute_rewards(responses, samples, config=config)
    assert scorer.calls == len(samples) + len(prompts)
    for response, sample, result in zip(responses, samples, results):
        assert result == compute_reward(response, sample, config=config)


def test_a_scorer_that_raises_is_named_with_the_record_and_its_error():
    config = RewardConfig(open_scorer="tests.helpers:FailingScorer")
    with pytest.raises(rewards.ScorerError, match="record open-2: the open scorer FailingScorer.score raised "
                                                  "ConnectionError: the reward model at .* refused"):
        compute_rewards([wrap("3")] * 2 + [wrap("red truck")], [DIGIT] * 2 + [OPEN_F1], config=config)


def test_compute_rewards_mixes_types_and_checks_lengths():
    samples = [DIGIT, MCQ, MATH, IOU, OPEN_F1]
    responses = [wrap("3"), wrap("B"), wrap("0.5"), wrap("[0.2, 0.2, 0.6, 0.6]"), wrap("red truck")]
    assert [result["reward"] for result in compute_rewards(responses, samples)] == [1.0] * 5
    with pytest.raises(ValueError, match="2 responses but 5 samples"):
        compute_rewards(responses[:2], samples)


def test_the_default_open_scorer_is_token_f1_and_the_toy_scorer_is_chosen_by_name():
    assert ToySceneScorer().score("There are 4 shapes.", OPEN_TOY) == 1.0
    assert TokenF1Scorer().score("red truck", OPEN_F1) == 1.0
    assert compute_reward(wrap("4 shapes, 2 red circles"), OPEN_TOY, config=TOY)["info"]["ref_score"] == 1.0
    assert "ref_score" not in compute_reward(wrap("red truck"), OPEN_F1)["info"]
    assert isinstance(RewardConfig().open_scorer, TokenF1Scorer)  # a scene in the record changes nothing
    assert "ref_score" not in compute_reward(wrap("4 shapes, 2 red circles"), OPEN_TOY)["info"]
    with pytest.raises(rewards.SampleError, match="ToySceneScorer"):
        rewards.check_sample(OPEN_F1, TOY)  # the toy scorer refuses a record without a scene


def test_load_scorer_from_import_path():
    assert isinstance(load_scorer("rewards:TokenF1Scorer"), TokenF1Scorer)
    assert isinstance(RewardConfig(open_scorer="toyworld:ToySceneScorer").open_scorer, ToySceneScorer)
    for bad in ["rewards", "no_such_module_xyz:Scorer", "rewards:NoSuchScorer", "rewards:REWARD_TYPES"]:
        with pytest.raises(ValueError, match="open_scorer"):
            load_scorer(bad)


@pytest.mark.parametrize("kwargs", [{"open_beta": 0.0}, {"math_timeout_s": -1.0}, {"iou_box_format": "xywh"}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="RewardConfig"):
        RewardConfig(**kwargs)


def test_config_box_format_applies_when_the_sample_has_none():
    pixel = RewardConfig(iou_box_format="pixel")
    sample = {"id": "px", "verifier_type": "iou", "gt": "[40, 20, 120, 60]", "meta": {"image_size": [200, 100]}}
    assert compute_reward(wrap("[40, 20, 120, 60]"), sample, config=pixel)["reward"] == 1.0
    with pytest.raises(ValueError, match="px"):
        compute_reward(wrap("[40, 20, 120, 60]"), sample)  # normalised by default: gt out of range


def test_a_digit_answer_is_a_number_not_arithmetic_that_holds_it():
    for answer in ("3*3", "6/2", "3 x 3", "1 = 3"):
        assert compute_reward(f"<answer>{answer}</answer>", {"verifier_type": "digit", "gt": "3"})["reward"] == 0.0
    assert compute_reward("<answer>3 shapes</answer>", {"verifier_type": "digit", "gt": "3"})["reward"] == 1.0


def test_bad_samples_and_settings_give_a_clear_error_not_a_crash():
    assert rewards.box_iou([0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]) == 0.0  # two degenerate boxes
    with pytest.raises(ValueError, match="a sample must be a dict"):
        rewards.compute_reward("<answer>1</answer>", ["not", "a", "dict"])
    with pytest.raises(ValueError, match="math_timeout_s must be > 0 and finite"):
        rewards.RewardConfig(math_timeout_s=float("inf"))
    sample = {"id": "x", "verifier_type": "iou", "gt": "[1, 1, 9, 9]",
              "meta": {"box_format": "pixel", "image_size": [float("inf"), 10]}}
    with pytest.raises(rewards.SampleError, match="record 'x': field 'meta.image_size'"):
        rewards.check_sample(sample)
