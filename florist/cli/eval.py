"""``florist eval``: multiple-choice accuracy (MMLU) of a model, optionally with a LoRA adapter."""

from __future__ import annotations

import enum
import random
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from ..adapters import AdapterError, check_finite, read_adapter
from ..tables import TableColumn, fitted_table
from .app import app
from .errors import UserError, user_errors

if TYPE_CHECKING:
    from ..aggregation import LoraFactors
    from ..evaluation import EvalResult, Question

# Where the 1,444-question MMLU subset sits beside a checkout of this project.
DEFAULT_MMLU = Path("../shared/data/mmlu/mmlu_1444.json")

console = Console()


class Mode(enum.StrEnum):
    letter = "letter"
    option = "option"
    answer = "answer"


class Protocol(enum.StrEnum):
    loglik = "loglik"
    generate = "generate"


@app.command("eval")
def eval_command(
    model: str | None = typer.Option(
        None, "--model", help="model alias, hub id or directory (default: the embedded SmolLM2-135M-Instruct)"
    ),
    adapter: Path | None = typer.Option(None, "--adapter", help="PEFT LoRA adapter directory to apply (safetensors)"),
    mmlu: str | None = typer.Option(
        None, "--mmlu", help="questions: the MMLU JSON file, a local cais/mmlu copy, or cais/mmlu"
    ),
    builtin: bool = typer.Option(False, "--builtin", help="use the built-in held-out question set instead"),
    mode: Mode | None = typer.Option(
        None,
        "--mode",
        help="loglik scoring: letter (default), option (option text after the lettered prompt) or answer "
        "(option text as the answer to the bare question; the default for --builtin)",
    ),
    protocol: Protocol = typer.Option(
        Protocol.loglik, "--protocol", help="loglik (deterministic) or generate (the paper's sampling)"
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="evaluate a seeded random sample of N questions"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="questions per batch"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    device: str = typer.Option("cpu", "--device"),
    seed: int = typer.Option(0, "--seed", help="picks the --limit sample and seeds the generate protocol"),
    per_subject: bool = typer.Option(False, "--per-subject", help="also print a table of per-subject accuracy"),
) -> None:
    """Accuracy macro-averaged over subjects (the paper's number), micro accuracy, question count and time."""
    from .. import evaluation  # here, not at the top: it imports transformers, which `florist --help` need not wait for
    from ..progress import library_bars

    with user_errors(evaluation.EvalDataError, AdapterError), library_bars(True):
        questions = _questions(mmlu, builtin, seed)
        if limit is not None and limit < len(questions):
            keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
            questions = [questions[i] for i in keep]
        modules = _read_adapter(adapter) if adapter is not None else None
        _check_device(device)
        chosen_mode = mode.value if mode else ("answer" if builtin else "letter")
        lm, tokenizer = _load(model, adapter, modules, dtype, device)
        if protocol is Protocol.loglik and chosen_mode == "letter":
            try:
                evaluation.letter_token_ids(tokenizer, max(len(q.options) for q in questions))
            except ValueError as e:
                raise UserError(f"--mode letter: {e}") from None
        # questions longer than the model's context are refused here, before the first forward pass
        result = evaluation.evaluate(
            lm, tokenizer, questions, mode=chosen_mode, protocol=protocol.value, batch_size=batch_size, seed=seed
        )
    _print_result(result, per_subject)


def _questions(mmlu: str | None, builtin: bool, seed: int) -> list[Question]:
    from .. import evaluation

    if builtin and mmlu is not None:
        raise UserError("--mmlu and --builtin exclude each other; pass one")
    if builtin:
        from ..data.builtin import builtin_heldout

        return evaluation.questions_from_records(builtin_heldout(seed=seed), "the built-in question set")
    if mmlu is None:
        if not DEFAULT_MMLU.is_file():
            raise UserError(f"no questions: {DEFAULT_MMLU} not found from here; pass --mmlu FILE (or --builtin)")
        mmlu = str(DEFAULT_MMLU)
    return evaluation.load_questions(mmlu)


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: no MPS device is available here")


def _read_adapter(path: Path) -> dict[str, LoraFactors]:
    """The adapter through florist's checked reader, before any model is loaded: plain LoRA in safetensors (never a
    pickle), consistent shapes and ranks, and no NaN or Inf, which would turn every score into noise."""
    modules, _ = read_adapter(path, client_id=f"--adapter {path}")
    check_finite(modules, f"--adapter {path}")
    return modules


def _load(model: str | None, adapter: Path | None, modules: dict[str, LoraFactors] | None, dtype: str, device: str):
    from ..models import ModelLoadError, load_model, peft_wrapping

    try:
        lm, tokenizer = load_model(model, dtype=dtype, device=device)
    except ModelLoadError as e:
        raise UserError(str(e)) from None
    if adapter is not None and modules is not None:
        from peft import PeftModel

        _check_fits(lm, modules, adapter)
        try:
            with peft_wrapping():
                lm = PeftModel.from_pretrained(lm, str(adapter), is_trainable=False)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:  # PEFT's own checks, in its words
            raise UserError(f"--adapter {adapter}: {_first_line(e)}") from None
        # PEFT puts LoRA layers where target_modules says and drops (with a warning) weights it has no layer for
        unplaced = [name for name in modules if not hasattr(lm.base_model.model.get_submodule(name), "lora_A")]
        if unplaced:
            raise UserError(
                f"--adapter {adapter}, module {unplaced[0]}: not among the config's target_modules, so "
                "PEFT would ignore its weights"
            )
    return lm, tokenizer


def _check_fits(lm, modules: dict[str, LoraFactors], adapter: Path) -> None:
    """Every adapted module exists in the model with the weight shape its factors update. PEFT would drop the weights
    of a module the model lacks with a warning (the score would then be the base model's), and a shape mismatch
    ends in a many-line state-dict error."""
    present = dict(lm.named_modules())
    for name, f in modules.items():
        weight = getattr(present.get(name), "weight", None)
        if weight is None:
            raise UserError(f"--adapter {adapter}, module {name}: not in the model (an adapter of another model?)")
        if tuple(weight.shape) != f.shape:
            raise UserError(
                f"--adapter {adapter}, module {name}: updates a {f.shape[0]}x{f.shape[1]} weight, "
                f"the model's is {weight.shape[0]}x{weight.shape[1]} (an adapter of another model?)"
            )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _print_result(result: EvalResult, per_subject: bool) -> None:
    subjects = len(result.per_subject)
    # Two lines short enough for 80 columns, printed as they are: a narrower terminal wraps them itself, and a log
    # file keeps each whole.
    for line in (
        f"accuracy {result.accuracy:.4f} (macro over {subjects} subjects), micro {result.micro_accuracy:.4f}, "
        f"scored by {result.method}",
        f"{result.n_questions} questions in {result.seconds:.1f} s ({result.questions_per_second:.2f} questions/s)",
    ):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    if per_subject:
        columns = [TableColumn("subject", justify="left"), TableColumn("questions"), TableColumn("accuracy")]
        rows = [
            [subject, str(result.subject_counts[subject]), f"{accuracy:.4f}"]
            for subject, accuracy in result.per_subject.items()
        ]
        console.print(fitted_table(columns, rows, console.width))
