"""What every evaluation pass shares: batches of similar length, padding, inference mode, and the model's context
limit, checked before any forward pass."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..progress import track
from .questions import EvalDataError


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so running out of memory shows at once)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def padding_id(tokenizer: Any) -> int:
    """The tokenizer's padding token, else its end-of-sequence token, else 0 (the mask hides padding anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of the sequences padded to the longest, on the ``"right"`` or the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, cols] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def inference(model: Any) -> Iterator[None]:
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


def run_batches(description: str, batches: list[list[int]], progress: bool) -> Iterator[list[int]]:
    """The batches as one step of progress: a bar on a terminal, a line when they are done elsewhere."""
    return track(batches, description, progress, unit="batches")


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in float32 of logits flattened to one row per position."""
    return torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)


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
