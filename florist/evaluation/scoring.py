"""Log-likelihood scoring of multiple-choice questions: the answer letter after the prompt (``letter`` mode), or
the mean log-probability of each option's text (``option`` and ``answer`` modes)."""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data.instructions import build_prompt
from .batching import (
    check_lengths,
    context_limit,
    encode,
    inference,
    length_batches,
    log_softmax_rows,
    model_device,
    pad,
    padding_id,
    run_batches,
)
from .questions import ANSWER_PREFIX, LETTERS, Question, mmlu_prompt, question_names


def _scoring_context(question: Question) -> str:
    # Log-likelihood scoring ends the prompt at "is:" and scores " X" / " text": BPE and SentencePiece
    # tokenizers both turn a trailing space into a token of its own, which a model rarely sees before a word,
    # while " C" after "is:" is exactly how "The answer is: C." tokenizes in text.
    return mmlu_prompt(question).rstrip(" ")


def letter_token_ids(tokenizer: Any, n_options: int) -> list[int]:
    """The single token each of " A", " B", ... becomes after "The answer is:"; raises if one splits in two."""
    context = ANSWER_PREFIX.rstrip(" ")
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in LETTERS[:n_options]:
        full = tokenizer(f"{context} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(context_ids)] != context_ids or len(full) != len(context_ids) + 1:
            raise ValueError(f"the tokenizer does not make ' {letter}' one token after {context!r}; use option mode")
        ids.append(full[-1])
    return ids


def _cache_name(model: Any) -> str:
    """The keyword a model's forward takes its key/value cache under, and the output field that returns it."""
    return _cache_name_of(type(model.get_base_model() if hasattr(model, "get_base_model") else model))


@functools.cache
def _cache_name_of(model_class: type) -> str:
    # transformers renamed past_key_values to cache (the old name still works, with a warning on every call); the
    # releases before the rename know only past_key_values, and would silently ignore cache= among their **kwargs.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def letter_log_probs(
    model: Any, tokenizer: Any, questions: Sequence[Question], *, batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per question, the log-probability of each option's letter as the token after "The answer is:"."""
    letter_ids = letter_token_ids(tokenizer, max(len(q.options) for q in questions))
    seqs = [encode(tokenizer, _scoring_context(q)) for q in questions]
    check_lengths("the prompt", [len(s) for s in seqs], context_limit(model, tokenizer), question_names(questions))
    pad_id, out = padding_id(tokenizer), [[] for _ in questions]
    # Every prompt opens with the same template and instruction (a third of MMLU's tokens): run that prefix once
    # and give each batch a copy of its key/value cache, so only the questions' own tokens are computed per batch.
    shared = _shared_prefix_length(seqs)
    with inference(model):
        prefix = (
            getattr(
                model(
                    input_ids=torch.as_tensor([seqs[0][:shared]], device=model_device(model)),
                    use_cache=True,
                    logits_to_keep=1,
                ),
                _cache_name(model),
            )
            if shared
            else None
        )
        for batch in run_batches(
            "scoring answer letters", length_batches([len(s) for s in seqs], batch_size), progress
        ):
            rows = _last_log_probs(model, [seqs[i][shared:] for i in batch], prefix, shared, pad_id)
            for row, i in enumerate(batch):
                out[i] = rows[row, letter_ids[: len(questions[i].options)]].tolist()
    return out


def _shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one of its own to each (whose logits are read)."""
    n = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        n = next(k for k in range(n, -1, -1) if s[:k] == seqs[0][:k])
    return max(n, 0)


def _last_log_probs(
    model: Any, suffixes: Sequence[Sequence[int]], prefix: Any, shared: int, pad_id: int
) -> torch.Tensor:
    """Log-softmax of the next-token logits after each row's last token; the rows continue ``prefix`` (``shared``
    tokens of key/value cache, or None) and are right-padded, positions counted on from the prefix."""
    device = model_device(model)
    ids, mask = pad(suffixes, pad_id, "right", device)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    keep[torch.arange(len(suffixes)), torch.as_tensor([len(s) - 1 for s in suffixes], device=device)] = True
    if prefix is None:
        return log_softmax_rows(model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits)
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(len(suffixes))
    return log_softmax_rows(
        model(
            input_ids=ids,
            attention_mask=torch.cat(
                [torch.ones((len(suffixes), shared), dtype=mask.dtype, device=device), mask], dim=1
            ),
            position_ids=shared + torch.arange(ids.shape[1], device=device).expand_as(ids),
            logits_to_keep=keep,
            **{_cache_name(model): cache},
        ).logits
    )


@dataclass(frozen=True)
class _OptionPlan:
    """One question's option scoring: a context shared by its options, then per option the tokens fed after it
    and how many of those (at their end) are the option's scored tokens."""

    context: list[int]
    feeds: list[list[int]]
    scored: list[int]


def _option_plan(tokenizer: Any, question: Question, bare: bool = False) -> _OptionPlan:
    # bare: each option is the response to the question alone (Alpaca prompt, no lettered list), the way
    # facts are taught; otherwise it follows the multiple-choice prompt's "The answer is:".
    context = build_prompt(question.question) if bare else _scoring_context(question)
    joiner = "" if bare else " "
    context_ids = encode(tokenizer, context)
    # As lm-evaluation-harness: encode the whole text and score what lies past the context's tokens, so the
    # option's first token is the one a tokenizer produces in running text.
    wholes = [encode(tokenizer, f"{context}{joiner}{option.strip()}") for option in question.options]
    scored = [max(1, len(w) - len(context_ids)) for w in wholes]
    # The shared part: the context's tokens, cut back should a tokenizer merge across the boundary.
    shared = min(len(w) - n for w, n in zip(wholes, scored, strict=True))
    for w in wholes:
        shared = next(k for k in range(shared, -1, -1) if w[:k] == context_ids[:k])
    if shared == 0:
        raise ValueError(f"options of {question.question[:40]!r} share no prompt tokens; is the tokenizer odd?")
    return _OptionPlan(context_ids[:shared], [w[shared:] for w in wholes], scored)


def option_log_probs(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    progress: bool = True,
    bare: bool = False,
) -> list[list[float]]:
    """Per question, the mean per-token log-probability of each option's text after the prompt.

    The prompt runs once per question (``batch_size`` questions at a time) and its key/value cache is shared by
    the question's options, which then cost only their own few tokens.
    """
    plans = [_option_plan(tokenizer, q, bare) for q in questions]
    lengths = [len(p.context) + max(len(f) for f in p.feeds) for p in plans]
    check_lengths(
        "the prompt with its longest option", lengths, context_limit(model, tokenizer), question_names(questions)
    )
    pad_id, device, out = padding_id(tokenizer), model_device(model), [[] for _ in questions]
    with inference(model):
        for batch in run_batches("scoring options", length_batches(lengths, batch_size), progress):
            for i, scores in zip(batch, _score_options(model, [plans[i] for i in batch], pad_id, device), strict=True):
                out[i] = scores
    return out


def _keep_mask(lengths: Sequence[int], scored: Sequence[int]) -> torch.Tensor:
    """Marks the positions whose next-token distribution scores the last ``scored[i]`` tokens of row i."""
    keep = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool)
    for row, (length, n) in enumerate(zip(lengths, scored, strict=True)):
        keep[row, length - 1 - n : length - 1] = True
    return keep


def _score_options(model: Any, plans: Sequence[_OptionPlan], pad_id: int, device: torch.device) -> list[list[float]]:
    contexts = [p.context for p in plans]
    ids, mask = pad(contexts, pad_id, "right", device)
    last = torch.as_tensor([len(c) - 1 for c in contexts], device=device)[:, None]
    prompt = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=last)
    first = torch.log_softmax(prompt.logits[:, 0].float(), dim=-1)  # predicts each option's first fed token

    owner = [q for q, p in enumerate(plans) for _ in p.feeds]
    feeds = [f for p in plans for f in p.feeds]
    scored = [n for p in plans for n in p.scored]
    # Right-padded contexts leave padding between a context and its option: the mask hides it and the option's
    # positions continue from the context's real length.
    cache = getattr(prompt, _cache_name(model))
    cache.batch_select_indices(torch.as_tensor(owner, device=device))
    feed_ids, feed_mask = pad(feeds, pad_id, "right", device)
    keep = _keep_mask([len(f) for f in feeds], [min(n, len(f) - 1) for f, n in zip(feeds, scored, strict=True)])
    rest = torch.empty((0, first.shape[-1]), device=device)
    if keep.any():
        offsets = torch.as_tensor([len(contexts[q]) for q in owner], device=device)[:, None]
        rest = log_softmax_rows(
            model(
                input_ids=feed_ids,
                attention_mask=torch.cat([mask[owner], feed_mask], dim=1),
                position_ids=offsets + torch.arange(feed_ids.shape[1], device=device),
                logits_to_keep=keep.to(device),
                **{_cache_name(model): cache},
            ).logits
        )
    totals, used = [], 0
    for q, feed, n in zip(owner, feeds, scored, strict=True):
        from_rest = min(n, len(feed) - 1)
        targets = torch.as_tensor(feed[len(feed) - from_rest :], device=device)
        total = rest[used : used + from_rest].gather(1, targets[:, None]).sum()
        if n > from_rest:  # the first fed token is scored too: its distribution came from the prompt pass
            total = total + first[q, feed[0]]
        totals.append(total.item() / n)
        used += from_rest
    out, k = [], 0
    for p in plans:
        out.append(totals[k : k + len(p.feeds)])
        k += len(p.feeds)
    return out
