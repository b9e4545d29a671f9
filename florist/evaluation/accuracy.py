"""Accuracy on a question set: either protocol's hits, summarised per subject, and the data-weighted mean of
several models' results."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from .generation import generate_answers, is_generated_hit
from .questions import Question
from .scoring import letter_log_probs, option_log_probs

Mode = Literal["letter", "option", "answer"]
Protocol = Literal["loglik", "generate"]


@dataclass
class EvalResult:
    """Accuracy of one model on a question set. ``accuracy`` is the macro average over subjects."""

    accuracy: float
    micro_accuracy: float
    per_subject: dict[str, float]
    subject_counts: dict[str, int]
    n_questions: int
    seconds: float
    method: str  # "letter", "option" or "generate"

    @property
    def questions_per_second(self) -> float:
        return self.n_questions / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(questions: Sequence[Question], hits: Sequence[bool], seconds: float, method: str) -> EvalResult:
    """Accuracy per subject, its mean over subjects (macro) and over questions (micro)."""
    if len(questions) != len(hits) or not questions:
        raise ValueError(f"need one hit per question, got {len(hits)} for {len(questions)} questions")
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for q, hit in zip(questions, hits, strict=True):
        total[q.subject] += 1
        right[q.subject] += bool(hit)
    per_subject = {s: right[s] / total[s] for s in sorted(total)}
    return EvalResult(
        accuracy=sum(per_subject.values()) / len(per_subject),
        micro_accuracy=sum(right.values()) / len(questions),
        per_subject=per_subject,
        subject_counts={s: total[s] for s in sorted(total)},
        n_questions=len(questions),
        seconds=seconds,
        method=method,
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    mode: Mode = "letter",
    protocol: Protocol = "loglik",
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Accuracy of ``model`` on ``questions``; ``seed`` matters only to the ``generate`` protocol."""
    if not questions:
        raise ValueError("no questions to evaluate")
    start = time.perf_counter()
    if protocol == "generate":
        answers = generate_answers(model, tokenizer, questions, batch_size=batch_size, seed=seed, progress=progress)
        hits = [is_generated_hit(q, a) for q, a in zip(questions, answers, strict=True)]
        method = "generate"
    elif protocol == "loglik":
        if mode == "letter":
            scores = letter_log_probs(model, tokenizer, questions, batch_size=batch_size, progress=progress)
        elif mode in ("option", "answer"):
            scores = option_log_probs(
                model, tokenizer, questions, batch_size=batch_size, progress=progress, bare=mode == "answer"
            )
        else:
            raise ValueError(f"unknown mode {mode!r}; choose letter, option or answer")
        hits = [_argmax(s) == q.answer for q, s in zip(questions, scores, strict=True)]
        method = mode
    else:
        raise ValueError(f"unknown protocol {protocol!r}; choose loglik or generate")
    return summarize(questions, hits, time.perf_counter() - start, method)


def _argmax(scores: Sequence[float]) -> int:
    """The first best option: ties go to the earlier letter, deterministically."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def weighted_mean(results: Sequence[EvalResult], weights: Sequence[float]) -> EvalResult:
    """The data-weighted mean of several models' results on one question set (heterogeneous FlexLoRA's number)."""
    if not results or len(results) != len(weights):
        raise ValueError(f"need one weight per result, got {len(weights)} weights for {len(results)} results")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    first = results[0]
    if any(r.subject_counts != first.subject_counts for r in results):
        raise ValueError("results must come from the same questions to be averaged")
    w = [x / sum(weights) for x in weights]

    def mean(values: Sequence[float]) -> float:
        return sum(wi * v for wi, v in zip(w, values, strict=True))

    return EvalResult(
        accuracy=mean([r.accuracy for r in results]),
        micro_accuracy=mean([r.micro_accuracy for r in results]),
        per_subject={s: mean([r.per_subject[s] for r in results]) for s in first.per_subject},
        subject_counts=dict(first.subject_counts),
        n_questions=first.n_questions,
        seconds=sum(r.seconds for r in results),
        method=first.method,
    )
