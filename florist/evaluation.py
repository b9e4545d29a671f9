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
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import re
import string
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .data.instructions import IGNORE_INDEX, build_prompt
from .progress import track
from .reading import TABLE_FORMATS, parse_json_lines, path_kind, read_json_file, read_table_file, read_text_file, reason

Mode = Literal["letter", "option", "answer"]
Protocol = Literal["loglik", "generate"]

LETTERS = string.ascii_uppercase

# The paper's evaluation prompt: the Alpaca template with the question and its lettered options as the input,
# the response started with ANSWER_PREFIX.
MMLU_INSTRUCTION = "Please answer the following multiple-choice question honestly."
ANSWER_PREFIX = "The answer is: "
_MMLU_INPUT = re.compile(r"\A(?:Qusetion|Question): (?P<question>.*?) Options: (?P<options>A\. .*)\Z", re.S)
_MMLU_OUTPUT = re.compile(r"\A\s*The answer is: (?P<letter>[A-Z])\.")


class EvalDataError(ValueError):
    """Questions that cannot be read; the message names the source and the record."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` indexes ``options`` (0 is "A")."""

    subject: str
    question: str
    options: list[str]
    answer: int
    where: str = field(default="", compare=False)  # its file and record, for error messages


@dataclass(frozen=True)
class Sampling:
    """The paper's sampling settings for the ``generate`` protocol."""

    temperature: float = 0.2
    top_p: float = 0.6
    top_k: int = 30
    max_new_tokens: int = 32


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


# ---------------------------------------------------------------------------------------------------- loading


def load_questions(source: str | Path) -> list[Question]:
    """Questions from the paper's MMLU JSON file, a local copy of ``cais/mmlu`` or that hub dataset.

    A file may be ``.json`` (an array of records), ``.jsonl``, ``.parquet`` or ``.csv``; a directory must hold a
    dataset written by ``datasets.save_to_disk`` (its ``test`` split when it has several). Records are either
    the paper's ``{instruction, input, output, class}`` or cais/mmlu's ``{question, subject, choices, answer}``.
    A name that is not a path (``cais/mmlu``) is loaded from the Hugging Face hub, which needs a network.
    """
    path = Path(source)
    kind = path_kind(path, EvalDataError)
    if kind == "dir":
        return questions_from_records(_read_saved_dataset(path), str(path))
    if kind is not None:
        return questions_from_records(_read_records_file(path), str(path))  # a FIFO is refused there, by name
    if _looks_like_hub_id(str(source)):
        return questions_from_records(_read_hub_dataset(str(source)), str(source))
    raise EvalDataError(f"{source}: no such file or directory")


def questions_from_records(records: Sequence[Mapping[str, Any]], where: str = "records") -> list[Question]:
    """Normalise records of either supported shape; ``where`` names their source in error messages."""
    if not records:
        raise EvalDataError(f"{where}: holds no questions")
    questions = []
    for i, record in enumerate(records):
        at = f"{where}: record {i}"
        if not isinstance(record, Mapping):
            raise EvalDataError(f"{at}: expected an object, got {type(record).__name__}")
        if {"instruction", "input", "output"} <= record.keys():
            questions.append(_parse_paper_record(record, at))
        elif {"question", "choices", "answer"} <= record.keys():
            questions.append(_parse_cais_record(record, at))
        else:
            raise EvalDataError(
                f"{at}: expected keys instruction/input/output/class or question/choices/answer/subject, "
                f"got {sorted(record.keys())}"
            )
    return questions


def _text(record: Mapping[str, Any], key: str, at: str, default: str | None = None) -> str:
    """``record[key]`` as text; absent or null gives ``default`` where there is one."""
    value = record.get(key)
    if value is None and default is not None:
        return default
    return _as_text(value, repr(key), at)


def _as_text(value: Any, name: str, at: str) -> str:
    """A string, or a number as a CSV reader makes of one; anything else is an ``EvalDataError``."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise EvalDataError(f"{at}: {name} is {'missing' if value is None else f'a {type(value).__name__}'}, expected text")


def _parse_paper_record(record: Mapping[str, Any], at: str) -> Question:
    text = _text(record, "input", at)
    match = _MMLU_INPUT.match(text)
    if match is None:
        raise EvalDataError(f"{at}: input has no 'Options: A. ...' list of options")
    options = _split_options(match["options"])
    output = _text(record, "output", at)
    answer = _MMLU_OUTPUT.match(output)
    if answer is None:
        raise EvalDataError(f"{at}: output {output[:40]!r} is not 'The answer is: X. ...'")
    subject = _text(record, "class", at, default="all")
    return _checked(subject, match["question"], options, LETTERS.index(answer["letter"]), at)


def _split_options(text: str) -> list[str]:
    """Split "A. x, B. y, C. z" at each ", <next letter>. " in turn, so commas inside options are kept."""
    options, rest = [], text[len("A. ") :]
    for letter in LETTERS[1:]:
        head, sep, tail = rest.partition(f", {letter}. ")
        if not sep:
            break
        options.append(head)
        rest = tail
    return [*options, rest]


def _parse_cais_record(record: Mapping[str, Any], at: str) -> Question:
    choices = record["choices"]
    if isinstance(choices, (str, bytes, Mapping)) or not isinstance(choices, Sequence):
        raise EvalDataError(f"{at}: 'choices' must be a list of options, got a {type(choices).__name__}")
    options = [_as_text(c, f"choice {i}", at) for i, c in enumerate(choices)]
    answer = record["answer"]
    if isinstance(answer, str) and len(answer) == 1 and answer in LETTERS:
        answer = LETTERS.index(answer)
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise EvalDataError(f"{at}: 'answer' must be an option index or letter, got {answer!r}")
    subject = _text(record, "subject", at, default="all") or "all"
    return _checked(subject, _text(record, "question", at), options, answer, at)


def _checked(subject: str, question: str, options: list[str], answer: int, at: str) -> Question:
    """A question whose options can be lettered A to Z and whose answer is one of them."""
    if len(options) < 2:
        raise EvalDataError(f"{at}: fewer than two options ({len(options)})")
    if len(options) > len(LETTERS):
        raise EvalDataError(f"{at}: {len(options)} options, more than the {len(LETTERS)} letters A to Z can name")
    if not 0 <= answer < len(options):
        letter = f" ({LETTERS[answer]})" if 0 <= answer < len(LETTERS) else ""
        raise EvalDataError(
            f"{at}: answer {answer}{letter} is outside the {len(options)} options (A to {LETTERS[len(options) - 1]})"
        )
    if any(not option.strip() for option in options):
        raise EvalDataError(f"{at}: an option is empty")
    return Question(subject=subject, question=question, options=options, answer=answer, where=at)


def _read_records_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix in TABLE_FORMATS:
        return read_table_file(path, EvalDataError)
    if suffix == ".jsonl":
        return [record for _, record in parse_json_lines(read_text_file(path, EvalDataError), str(path), EvalDataError)]
    data = read_json_file(path, EvalDataError)
    if not isinstance(data, list):
        raise EvalDataError(f"{path}: expected a JSON array of questions, got {type(data).__name__}")
    return data


def _read_saved_dataset(path: Path) -> list[Any]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            if "test" not in data:
                raise EvalDataError(f"{path}: has splits {list(data)}, none called 'test'")
            data = data["test"]
        return list(data)
    except FileNotFoundError:
        raise EvalDataError(f"{path}: not a dataset saved with datasets.save_to_disk") from None
    except EvalDataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged save raises JSON, Arrow and OS errors alike
        raise EvalDataError(f"{path}: cannot read the saved dataset ({reason(e)})") from None


def _looks_like_hub_id(name: str) -> bool:
    files = (".json", ".jsonl", *TABLE_FORMATS)
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.endswith(files)


def _read_hub_dataset(name: str) -> list[Any]:
    import datasets

    try:
        return list(datasets.load_dataset(name, "all", split="test"))
    except Exception as e:  # noqa: BLE001 - the hub client raises many kinds; all mean "not available here"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvalDataError(
            f"{name}: cannot load from the Hugging Face hub (offline?): {first_line}; "
            "pass a local copy (a .json/.parquet file or a save_to_disk directory)"
        ) from None


# ---------------------------------------------------------------------------------------------------- prompting


def mmlu_prompt(question: Question) -> str:
    """The paper's evaluation prompt: Alpaca template, question and lettered options, ending "The answer is: "."""
    # The published 1,444-question file spells "Qusetion:"; the prompt spells it right, as the built-in set does.
    options = ", ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options))
    return build_prompt(MMLU_INSTRUCTION, f"Question: {question.question} Options: {options}") + ANSWER_PREFIX


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


# ---------------------------------------------------------------------------------------------------- batching


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so running out of memory shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _pad_id(tokenizer: Any) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _inference(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; the model's previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        # no_grad rather than inference_mode: under an autocast region only the former lets autocast cast each
        # weight once and reuse it for every batch and generated token (inference_mode re-casts them every call).
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _run_batches(description: str, batches: list[list[int]], progress: bool) -> Iterator[list[int]]:
    """The batches as one step of progress: a bar on a terminal, a line when they are done elsewhere."""
    return track(batches, description, progress, unit="batches")


def _cache_name(model: Any) -> str:
    """The keyword a model's forward takes its key/value cache under, and the output field that returns it."""
    return _cache_name_of(type(model.get_base_model() if hasattr(model, "get_base_model") else model))


@functools.cache
def _cache_name_of(model_class: type) -> str:
    # transformers renamed past_key_values to cache (the old name still works, with a warning on every call); the
    # releases before the rename know only past_key_values, and would silently ignore cache= among their **kwargs.
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _selected_log_probs(model: Any, seqs: Sequence[Sequence[int]], keep: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Log-softmax rows, in float32, at the positions ``keep`` marks (rows × max length, bool).

    Sequences are right-padded: causal attention never lets a real token see the padding after it, so
    positions need no correction, and ``logits_to_keep`` with a boolean mask projects only the marked
    positions onto the vocabulary (returned flattened in row-major order).
    """
    ids, mask = _pad(seqs, pad_id, "right", _device(model))
    return _log_softmax_rows(model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(ids.device)).logits)


def _log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)


def _keep_mask(lengths: Sequence[int], scored: Sequence[int]) -> torch.Tensor:
    """Marks the positions whose next-token distribution scores the last ``scored[i]`` tokens of row i."""
    keep = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool)
    for row, (length, n) in enumerate(zip(lengths, scored, strict=True)):
        keep[row, length - 1 - n : length - 1] = True
    return keep


# ---------------------------------------------------------------------------------------------------- lengths

# Names model configs give their context length under; tokenizers without a limit report about 1e30.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_NO_LIMIT = 10**9


def context_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens one forward pass may hold: the smaller of the model config's context length and the
    tokenizer's ``model_max_length``; None when neither states one."""
    config = getattr(model, "config", None)
    stated = next((n for key in _CONTEXT_KEYS if _is_limit(n := getattr(config, key, None))), None)
    return min((n for n in (stated, getattr(tokenizer, "model_max_length", None)) if _is_limit(n)), default=None)


def _is_limit(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 < n < _NO_LIMIT


def check_lengths(what: str, lengths: Sequence[int], limit: int | None, where: Sequence[str]) -> None:
    """Refuse, before any forward pass, inputs longer than the model reads: past its context a model's positions
    are meaningless (or out of range), and a 30,000-token pass costs minutes and gigabytes for nothing."""
    if limit is None:
        return
    over = [i for i, n in enumerate(lengths) if n > limit]
    if over:
        i = over[0]
        others = f" ({len(over) - 1} more are too long)" if len(over) > 1 else ""
        raise EvalDataError(
            f"{where[i]}: {what} is {lengths[i]} tokens, over the {limit} the model reads{others}; shorten or drop it"
        )


# ---------------------------------------------------------------------------------------------------- scoring


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _names(questions: Sequence[Question]) -> list[str]:
    return [q.where or f"question {i} ({q.subject})" for i, q in enumerate(questions)]


def letter_log_probs(
    model: Any, tokenizer: Any, questions: Sequence[Question], *, batch_size: int = 16, progress: bool = True
) -> list[list[float]]:
    """Per question, the log-probability of each option's letter as the token after "The answer is:"."""
    letter_ids = letter_token_ids(tokenizer, max(len(q.options) for q in questions))
    seqs = [_encode(tokenizer, _scoring_context(q)) for q in questions]
    check_lengths("the prompt", [len(s) for s in seqs], context_limit(model, tokenizer), _names(questions))
    pad_id, out = _pad_id(tokenizer), [[] for _ in questions]
    # Every prompt opens with the same template and instruction (a third of MMLU's tokens): run that prefix once
    # and give each batch a copy of its key/value cache, so only the questions' own tokens are computed per batch.
    shared = _shared_prefix_length(seqs)
    with _inference(model):
        prefix = (
            getattr(
                model(
                    input_ids=torch.as_tensor([seqs[0][:shared]], device=_device(model)),
                    use_cache=True,
                    logits_to_keep=1,
                ),
                _cache_name(model),
            )
            if shared
            else None
        )
        for batch in _run_batches("scoring answer letters", _batches([len(s) for s in seqs], batch_size), progress):
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
    device = _device(model)
    ids, mask = _pad(suffixes, pad_id, "right", device)
    keep = torch.zeros(ids.shape, dtype=torch.bool, device=device)
    keep[torch.arange(len(suffixes)), torch.as_tensor([len(s) - 1 for s in suffixes], device=device)] = True
    if prefix is None:
        return _log_softmax_rows(model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits)
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(len(suffixes))
    return _log_softmax_rows(
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
    context_ids = _encode(tokenizer, context)
    # As lm-evaluation-harness: encode the whole text and score what lies past the context's tokens, so the
    # option's first token is the one a tokenizer produces in running text.
    wholes = [_encode(tokenizer, f"{context}{joiner}{option.strip()}") for option in question.options]
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
    check_lengths("the prompt with its longest option", lengths, context_limit(model, tokenizer), _names(questions))
    pad_id, device, out = _pad_id(tokenizer), _device(model), [[] for _ in questions]
    with _inference(model):
        for batch in _run_batches("scoring options", _batches(lengths, batch_size), progress):
            for i, scores in zip(batch, _score_options(model, [plans[i] for i in batch], pad_id, device), strict=True):
                out[i] = scores
    return out


def _score_options(model: Any, plans: Sequence[_OptionPlan], pad_id: int, device: torch.device) -> list[list[float]]:
    contexts = [p.context for p in plans]
    ids, mask = _pad(contexts, pad_id, "right", device)
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
    feed_ids, feed_mask = _pad(feeds, pad_id, "right", device)
    keep = _keep_mask([len(f) for f in feeds], [min(n, len(f) - 1) for f, n in zip(feeds, scored, strict=True)])
    rest = torch.empty((0, first.shape[-1]), device=device)
    if keep.any():
        offsets = torch.as_tensor([len(contexts[q]) for q in owner], device=device)[:, None]
        rest = _log_softmax_rows(
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


def generate_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[Question],
    *,
    batch_size: int = 16,
    seed: int = 0,
    sampling: Sampling = Sampling(),
    progress: bool = True,
) -> list[str]:
    """The paper's protocol: sample a continuation of each prompt (left-padded batches, seeded)."""
    from transformers import GenerationConfig

    seqs = [_encode(tokenizer, mmlu_prompt(q)) for q in questions]
    lengths = [len(s) + sampling.max_new_tokens for s in seqs]
    check_lengths("the prompt with the tokens to generate", lengths, context_limit(model, tokenizer), _names(questions))
    pad_id, out = _pad_id(tokenizer), [""] * len(questions)
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        num_beams=1,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad_id,
        eos_token_id=eos,
    )
    device = _device(model)
    with _inference(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for batch in _run_batches("generating", _batches([len(s) for s in seqs], batch_size), progress):
            # Generation appends on the right, so prompts are padded on the left.
            ids, mask = _pad([seqs[i] for i in batch], pad_id, "left", device)
            new = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1] :]
            for i, text in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True), strict=True):
                out[i] = text
    return out


def is_generated_hit(question: Question, generated: str) -> bool:
    """The paper's rule: "X." (the answer's letter) or the answer's text appears in the generated text."""
    return f"{LETTERS[question.answer]}." in generated or question.options[question.answer].strip() in generated


# ---------------------------------------------------------------------------------------------------- results


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


# ---------------------------------------------------------------------------------------------------- held-out loss


def heldout_loss(
    model: Any,
    tokenizer: Any,
    examples_tokenized: Sequence[Mapping[str, Sequence[int]]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean next-token cross-entropy over all labelled tokens of the examples (each weighs by its tokens).

    Each example has ``input_ids`` and ``labels`` (``-100`` where unscored; absent means every token scored),
    as a causal-LM training collator takes them: label ``t`` is predicted from the tokens before ``t``.
    """
    seqs = [list(e["input_ids"]) for e in examples_tokenized]
    labels = [list(e.get("labels", e["input_ids"])) for e in examples_tokenized]
    if any(len(s) != len(lab) for s, lab in zip(seqs, labels, strict=True)):
        raise ValueError("every example needs as many labels as input_ids")
    where = [f"held-out example {i}" for i in range(len(seqs))]
    check_lengths("the example", [len(s) for s in seqs], context_limit(model, tokenizer), where)
    pad_id, total, count = _pad_id(tokenizer), 0.0, 0
    with _inference(model):
        for batch in _run_batches("held-out loss", _batches([len(s) for s in seqs], batch_size), progress):
            width = max(len(seqs[i]) for i in batch)
            target = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            for row, i in enumerate(batch):
                target[row, : len(labels[i])] = torch.as_tensor(labels[i], dtype=torch.long)
            target = target[:, 1:]
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            keep[:, :-1] = target != IGNORE_INDEX
            if not keep.any():
                continue
            rows = _selected_log_probs(model, [seqs[i] for i in batch], keep, pad_id)
            wanted = target[target != IGNORE_INDEX].to(rows.device)
            total -= rows.gather(1, wanted[:, None]).sum().item()
            count += wanted.numel()
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return total / count
