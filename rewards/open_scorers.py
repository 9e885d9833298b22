"""The scorers S of the open-ended reward: what a scorer is, loading one by import path, and token F1.

rewards/ turns a scorer's scores into the reward: for a relative scorer (a reward model, as in the paper) the
gain of the answer over the reference, R = 1 - exp(-(S(pred) - S(gt)) * beta); for a similarity scorer the
similarity itself. The paper's reward model (InternLM-XComposer2.5-Reward) is not included: TokenF1Scorer is the
default for real data, toyworld.ToySceneScorer for toy records. Any object with the two members below plugs in:

    python train_grpo.py ... --open-scorer my_module:MyRewardModel
"""

import importlib
import re
import string
from collections import Counter
from typing import Protocol


class ScorerError(RuntimeError):
    """The open scorer's score() raised: the message names the scorer, the record and its error. A run stops on
    it with that line (train_grpo.py, evaluate.py), as on bad input: a scorer is the user's code or service."""


class OpenScorer(Protocol):
    """Scores an open-ended answer; relative=True: a reward model (higher is better, compared with S(gt)),
    relative=False: a similarity with gt in [0, 1]. An optional check(sample) raises a ValueError for a sample it
    cannot score; rewards.check_sample calls it, so that such a sample fails when the data is loaded."""

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
