"""Answer normalisation and matching for LLM-KICK's short-answer QA tasks, as pure functions.

`normalize_answer` is TriviaQA's official one (lower case, punctuation -> space, articles
a/an/the dropped, whitespace collapsed, underscores and the quote marks ‘ ’ ´ ` -> space).
SQuAD v1.1's deletes punctuation instead: "U.S.A." is "usa" there and "u s a" here, so an
answer written "USA" matches the alias "U.S.A." only where the aliases list both (TriviaQA's
do, with their normalized_aliases). EM and token F1 are the official ones; a prediction is
scored against every reference alias and the best score is kept.

`kick_match` is the looser rule LLM-KICK's own scripts use (VITA-Group/llm-kick):
`incontext_qa/main_icrqa.py` counts a prediction right when the normalised reference is a
substring of the normalised prediction or the other way round, and
`factoid_qa/main_freebase.py` when an alias with spaces removed occurs in the lower-cased
output with spaces removed. It is reported beside the strict EM for comparison with
their numbers.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable

_PUNCT = set(string.punctuation) | {"‘", "’", "´", "`"}
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """TriviaQA's normalisation: 'The Eiffel Tower!' -> 'eiffel tower'."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """Token-level F1 of the normalised strings (SQuAD v1.1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def kick_match(prediction: str, reference: str) -> float:
    """LLM-KICK's lenient EM: one normalised string contains the other (empty never matches)."""
    p, r = normalize_answer(prediction), normalize_answer(reference)
    return float(bool(p) and bool(r) and (r in p or p in r))


def best(metric, prediction: str, references: Iterable[str]) -> float:
    """max over the reference aliases (0 when there are none)."""
    return max((metric(prediction, r) for r in references), default=0.0)


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped (LLM-KICK ICR-QA)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def mean_pct(values: list[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else float("nan")


def stderr_pct(values: list[float]) -> float:
    """Standard error of the mean in %, as lm-eval's mean_stderr (sample std / sqrt(n))."""
    n = len(values)
    if n < 2:
        return float("nan")
    m = sum(values) / n
    return 100.0 * math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
