"""Multiple-choice evaluation (MMLU) and held-out loss.

Two protocols score a model on ``Question`` s:

- ``loglik`` (default, deterministic): ``letter`` mode reads the log-probability of each answer letter at the
  end of the prompt, as lm-evaluation-harness scores MMLU; ``option`` mode ranks the options by the mean
  log-probability of their text (for questions whose letters carry no signal, such as the built-in set).
- ``generate``: the paper's protocol, sampling 32 tokens (temperature 0.2, top-p 0.6, top-k 30) and counting a
  hit when "X." or the answer text appears in them. Noisy; kept to compare with published numbers.

Accuracy is macro-averaged over subjects (the paper's number) and reported micro-averaged beside it.

    >>> questions = load_questions("../shared/data/mmlu/mmlu_1444.json")
    >>> result = evaluate(model, tokenizer, questions, mode="letter")
    >>> result.accuracy, result.per_subject["anatomy"]

``questions`` reads and checks question sets and writes their prompt, ``scoring`` holds the log-likelihood modes,
``generation`` the sampled protocol, ``accuracy`` the results, ``heldout`` the held-out loss, and ``batching`` what
their forward passes share.
"""

from __future__ import annotations

from .accuracy import EvalResult, Mode, Protocol, evaluate, summarize, weighted_mean
from .batching import check_lengths, context_limit
from .generation import Sampling, generate_answers, is_generated_hit
from .heldout import heldout_loss
from .questions import (
    ANSWER_PREFIX,
    LETTERS,
    MMLU_INSTRUCTION,
    EvalDataError,
    Question,
    load_questions,
    mmlu_prompt,
    questions_from_records,
)
from .scoring import letter_log_probs, letter_token_ids, option_log_probs

__all__ = [
    "ANSWER_PREFIX",
    "LETTERS",
    "MMLU_INSTRUCTION",
    "EvalDataError",
    "EvalResult",
    "Mode",
    "Protocol",
    "Question",
    "Sampling",
    "check_lengths",
    "context_limit",
    "evaluate",
    "generate_answers",
    "heldout_loss",
    "is_generated_hit",
    "letter_log_probs",
    "letter_token_ids",
    "load_questions",
    "mmlu_prompt",
    "option_log_probs",
    "questions_from_records",
    "summarize",
    "weighted_mean",
]
