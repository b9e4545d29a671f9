"""Multiple-choice questions: read the paper's MMLU file, a copy of ``cais/mmlu`` or that hub dataset, check every
question, and write the paper's evaluation prompt for one."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.instructions import build_prompt
from ..reading import (
    TABLE_FORMATS,
    parse_json_lines,
    path_kind,
    read_json_file,
    read_table_file,
    read_text_file,
    reason,
)

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


def mmlu_prompt(question: Question) -> str:
    """The paper's evaluation prompt: Alpaca template, question and lettered options, ending "The answer is: "."""
    # The published 1,444-question file spells "Qusetion:"; the prompt spells it right, as the built-in set does.
    options = ", ".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(question.options))
    return build_prompt(MMLU_INSTRUCTION, f"Question: {question.question} Options: {options}") + ANSWER_PREFIX


def question_names(questions: Sequence[Question]) -> list[str]:
    """Each question as error messages name it: its file and record, else its place and subject."""
    return [q.where or f"question {i} ({q.subject})" for i, q in enumerate(questions)]
