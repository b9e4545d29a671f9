"""Instruction data: load Dolly, Alpaca or WizardLM shaped rows into one schema, prompt them, tokenize them.

The schema is four string columns, ``instruction``, ``input``, ``output``, ``category`` (``""`` when absent):

| source columns                                   | instruction   | input   | output          | category |
|--------------------------------------------------|---------------|---------|-----------------|----------|
| Dolly: instruction, context, response, category  | instruction   | context | response        | category |
| Alpaca: instruction, input, output               | instruction   | input   | output          | ""       |
| WizardLM 70k: instruction, output                | instruction   | ""      | output          | ""       |
| ShareGPT style (WizardLM V2): conversations      | 1st user turn | ""      | the reply to it | ""       |
| MMLU style: instruction, input, output, class    | instruction   | input   | output          | class    |

Only the first exchange of a conversation is kept: the Alpaca template is single-turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from ..progress import Counter, Steps, datasets_bars
from ..reading import TABLE_FORMATS, parse_json, parse_json_lines, path_kind, read_table_file, read_text_file, reason
from .builtin import builtin_train
from .schema import COLUMNS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASET_ALIASES: dict[str, str] = {
    "dolly": "databricks/databricks-dolly-15k",
    "alpaca": "tatsu-lab/alpaca",
    "wizard": "WizardLM/WizardLM_evol_instruct_70k",
}

BUILTIN = "builtin"

# Client files as /work/shared/data/dolly lays them out (client_K.json) and as the FLoRA/FLoRIST code does
# (local_training_K.json); K counts from 0.
CLIENT_FILE = re.compile(r"^(client|local_training)_(\d+)\.json$")

KNOWN_SHAPES = "instruction+output, instruction+response (Dolly) or conversations"

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


class DataError(ValueError):
    """Data that cannot be loaded, prompted or split; the message names the file, row or client."""


# ---------------------------------------------------------------------------------------------------------------------
# One row into the schema


def _text(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(f"{where}: {key!r} is a {type(value).__name__}, expected text")


def _first_exchange(conversations: Any, where: str) -> tuple[str, str]:
    if not isinstance(conversations, list):
        raise DataError(f"{where}: 'conversations' is not a list of turns")
    user, reply = None, None
    for turn in conversations:
        if not isinstance(turn, Mapping):
            raise DataError(f"{where}: a turn in 'conversations' is not an object")
        role = turn.get("from", turn.get("role"))
        text = _text(turn, "value" if "value" in turn else "content", where)
        if user is None and role in ("human", "user"):
            user = text
        elif user is not None and role in ("gpt", "assistant"):
            reply = text
            break
    if user is None or reply is None:
        raise DataError(f"{where}: 'conversations' has no user turn followed by an assistant turn")
    return user, reply


def normalize_row(row: Mapping[str, Any], where: str = "row") -> dict[str, str]:
    """One source row in the schema; ``where`` names the row in the error."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected an object, found {type(row).__name__}")
    if "conversations" in row and "instruction" not in row:
        instruction, output = _first_exchange(row["conversations"], where)
        return {"instruction": instruction, "input": "", "output": output, "category": _text(row, "category", where)}
    output_key = "output" if "output" in row else "response" if "response" in row else None
    if "instruction" not in row or output_key is None:
        found = ", ".join(sorted(map(str, row))) or "nothing"
        raise DataError(f"{where}: none of the known columns ({KNOWN_SHAPES}); it has {found}")
    return {
        "instruction": _text(row, "instruction", where),
        "input": _text(row, "input" if "input" in row else "context", where),
        "output": _text(row, output_key, where),
        "category": _text(row, "category" if "category" in row else "class", where),
    }


def from_rows(rows: Iterable[Mapping[str, Any]], where: str) -> datasets.Dataset:
    """A schema Dataset from source rows (errors name ``where`` and the row number)."""
    columns: dict[str, list[str]] = {c: [] for c in COLUMNS}
    for i, row in enumerate(rows):
        for column, value in normalize_row(row, f"{where}: row {i}").items():
            columns[column].append(value)
    if not columns["instruction"]:
        raise DataError(f"{where}: no rows")
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------------------------------------------------------
# Files, folders, the hub


def read_json_rows(path: str | Path) -> list[Any]:
    """The rows of a JSON array file, a JSON Lines file, or a Parquet or CSV table."""
    path = Path(path)
    if path.suffix.lower() in TABLE_FORMATS:
        return read_table_file(path, DataError)
    text = read_text_file(path, DataError)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":  # anything but "several documents" is a broken file
            parse_json(text, str(path), DataError)  # raises, naming the file and the place
        rows = [row for _, row in parse_json_lines(text, str(path), DataError)]
    except (ValueError, RecursionError):
        rows = parse_json(text, str(path), DataError)  # raises, naming the file
    if isinstance(rows, Mapping):
        rows = [rows]  # a JSON Lines file of one line
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows or JSON Lines, found a {type(rows).__name__}")
    return rows


def client_files(path: str | Path) -> list[Path]:
    """``client_K.json`` (or ``local_training_K.json``) files of a folder, ordered by K; [] when there are none."""
    path = Path(path).expanduser()
    if path_kind(path, DataError) != "dir":
        return []
    found: dict[str, dict[int, Path]] = {}
    try:
        names = sorted(f.name for f in path.iterdir())
    except OSError as e:
        raise DataError(f"{path}: cannot read the folder ({reason(e)})") from None
    for name in names:
        match = CLIENT_FILE.match(name)
        if match:
            if path_kind(path / name, DataError) != "file":
                raise DataError(f"{path / name}: not a file")
            by_index, k = found.setdefault(match.group(1), {}), int(match.group(2))
            if k in by_index:  # client_0.json and client_00.json: one would silently replace the other
                raise DataError(f"{path}: {by_index[k].name} and {name} are both client {k}; keep one")
            by_index[k] = path / name
    if not found:
        return []
    if len(found) > 1:
        raise DataError(f"{path}: mixes client_K.json and local_training_K.json files; keep one layout")
    ((prefix, by_index),) = found.items()
    missing = [k for k in range(max(by_index) + 1) if k not in by_index]
    if missing:
        raise DataError(f"{path}: {prefix}_{missing[0]}.json is missing (clients are numbered from 0)")
    return [by_index[k] for k in sorted(by_index)]


def is_client_folder(path: str | Path) -> bool:
    """True for a folder holding pre-split client files."""
    return bool(client_files(path))


def load_client_folder(path: str | Path) -> list[datasets.Dataset]:
    """One schema Dataset per client file of a pre-split folder, in client order."""
    files = client_files(path)
    if not files:
        raise DataError(f"{path}: no client_K.json or local_training_K.json files")
    return [from_rows(read_json_rows(f), str(f)) for f in files]


def load_file(path: str | Path) -> datasets.Dataset:
    """A schema Dataset from a JSON, JSON Lines, Parquet or CSV file."""
    return from_rows(read_json_rows(path), str(path))


def load_hub(name: str, split: str = "train") -> datasets.Dataset:
    """A schema Dataset from a Hugging Face hub dataset (or its local cache when offline)."""
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, offline); all mean "can't have it"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot load dataset {name!r} from the Hugging Face hub: {first_line}") from None
    if len(ds) == 0:
        raise DataError(f"{name}: no rows")
    normalize_row(ds[0], f"{name}: row 0")  # a clear error for an unknown shape before mapping every row
    with datasets_bars(False):  # a quick step: a bar would only flash, and fill a log file
        return ds.map(
            lambda row, i: normalize_row(row, f"{name}: row {i}"), with_indices=True, remove_columns=ds.column_names
        )


def _looks_like_path(spec: str) -> bool:
    suffixes = (".json", ".jsonl", *TABLE_FORMATS)
    return spec.endswith(suffixes) or spec.startswith((".", "/", "~")) or spec.count("/") != 1


def load_instructions(spec: str, seed: int = 0) -> datasets.Dataset:
    """Instruction data in the schema from ``builtin``, a JSON/JSONL/Parquet/CSV file, a client folder (all clients
    together), an alias (``dolly``, ``alpaca``, ``wizard``) or a hub id such as ``databricks/databricks-dolly-15k``.

    ``seed`` only matters for ``builtin``, whose invented facts it draws (``builtin_heldout(seed)`` asks about them).
    """
    if spec == BUILTIN:
        return builtin_train(seed)
    path = Path(spec).expanduser()
    kind = path_kind(path, DataError)
    if kind == "dir":
        return datasets.concatenate_datasets(load_client_folder(path))
    if kind is not None:
        return load_file(path)  # a FIFO or a device is refused there, by name
    if spec in DATASET_ALIASES:
        return load_hub(DATASET_ALIASES[spec])
    if _looks_like_path(spec):
        raise DataError(f"{spec}: no such file or folder (hub datasets are named owner/name)")
    return load_hub(spec)


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and tokens


def build_prompt(
    instruction: str,
    input: str = "",
    template: str = "alpaca",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> str:
    """The text a model sees before its response: the Alpaca template (with or without input, as FLoRA/FLoRIST
    train), or ``template="chat"``: the tokenizer's own chat template with instruction and input as the user turn."""
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("template 'chat' needs a tokenizer with a chat template; use template 'alpaca'")
        user = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )
    raise DataError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")


def tokenize_dataset(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cutoff: int = 512,
    train_on_inputs: bool = True,
    template: str = "alpaca",
    *,
    progress: bool = True,
    description: str = "tokenizing",
) -> datasets.Dataset:
    """``input_ids``, ``attention_mask``, ``labels`` per row, unpadded (the trainer pads labels with -100).

    As alpaca-lora (and so FLoRA/FLoRIST) does: prompt and response are tokenized together and cut at ``cutoff``
    tokens; EOS is appended when the text ends within the cutoff; with ``train_on_inputs=False`` the prompt tokens'
    labels are -100 (``florist.jobs.LOSS_IGNORED``), and rows left with no label to learn (a prompt longer than the
    cutoff) are dropped.

    ``progress``: a bar named ``description`` on a terminal, one line when done elsewhere (florist.progress).
    """
    # Imported here: florist.jobs imports torch, which loading and splitting data need not wait for.
    from ..jobs import LOSS_IGNORED

    if cutoff < 2:
        raise DataError(f"cutoff must be at least 2 tokens, got {cutoff}")
    missing = [c for c in ("instruction", "input", "output") if c not in ds.column_names]
    if missing:
        raise DataError(f"the dataset lacks column {missing[0]!r}; load it with load_instructions()")
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token")
    # A chat template writes its own special tokens; the Alpaca text gets the tokenizer's usual ones (BOS for Llama).
    special = template == "alpaca"

    def encode(batch: dict[str, list[str]], count: Counter) -> dict[str, list[list[int]]]:
        count(len(batch["instruction"]))
        prompts = [
            build_prompt(i, x, template, tokenizer) for i, x in zip(batch["instruction"], batch["input"], strict=True)
        ]
        full = tokenizer(
            [p + o for p, o in zip(prompts, batch["output"], strict=True)],
            truncation=True,
            max_length=cutoff,
            add_special_tokens=special,
        )["input_ids"]
        prompt_lengths = (
            [
                len(ids)
                for ids in tokenizer(prompts, truncation=True, max_length=cutoff, add_special_tokens=special)[
                    "input_ids"
                ]
            ]
            if not train_on_inputs
            else [0] * len(prompts)
        )
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for ids, masked in zip(full, prompt_lengths, strict=True):
            if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff:
                ids = [*ids, tokenizer.eos_token_id]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([LOSS_IGNORED] * masked + ids[masked:])
        return out

    with Steps(progress, transient=True) as steps, datasets_bars(False):  # the step's own bar, not datasets'
        step = steps.add(description, total=len(ds), unit="examples")
        tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, fn_kwargs={"count": Counter(step)})
        if not train_on_inputs:
            tokenized = tokenized.filter(lambda row: any(t != LOSS_IGNORED for t in row["labels"]))
        step.done(completed=len(ds))  # also when datasets found the map in its cache, and counted none
    return tokenized
