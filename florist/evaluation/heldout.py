"""Held-out loss: the mean next-token cross-entropy of a model over labelled examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..jobs import LOSS_IGNORED
from .batching import (
    check_lengths,
    context_limit,
    inference,
    length_batches,
    log_softmax_rows,
    model_device,
    pad,
    padding_id,
    run_batches,
)


def heldout_loss(
    model: Any,
    tokenizer: Any,
    examples_tokenized: Sequence[Mapping[str, Sequence[int]]],
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> float:
    """Mean next-token cross-entropy over all labelled tokens of the examples (each weighs by its tokens).

    Each example has ``input_ids`` and ``labels`` (``LOSS_IGNORED``, -100, where unscored; absent means every token
    scored), as a causal-LM training collator takes them: label ``t`` is predicted from the tokens before ``t``.
    """
    seqs = [list(e["input_ids"]) for e in examples_tokenized]
    labels = [list(e.get("labels", e["input_ids"])) for e in examples_tokenized]
    if any(len(s) != len(lab) for s, lab in zip(seqs, labels, strict=True)):
        raise ValueError("every example needs as many labels as input_ids")
    where = [f"held-out example {i}" for i in range(len(seqs))]
    check_lengths("the example", [len(s) for s in seqs], context_limit(model, tokenizer), where)
    pad_id, total, count = padding_id(tokenizer), 0.0, 0
    with inference(model):
        for batch in run_batches("held-out loss", length_batches([len(s) for s in seqs], batch_size), progress):
            width = max(len(seqs[i]) for i in batch)
            target = torch.full((len(batch), width), LOSS_IGNORED, dtype=torch.long)
            for row, i in enumerate(batch):
                target[row, : len(labels[i])] = torch.as_tensor(labels[i], dtype=torch.long)
            target = target[:, 1:]
            keep = torch.zeros((len(batch), width), dtype=torch.bool)
            keep[:, :-1] = target != LOSS_IGNORED
            if not keep.any():
                continue
            rows = _selected_log_probs(model, [seqs[i] for i in batch], keep, pad_id)
            wanted = target[target != LOSS_IGNORED].to(rows.device)
            total -= rows.gather(1, wanted[:, None]).sum().item()
            count += wanted.numel()
    if count == 0:
        raise ValueError("no labelled tokens to score")
    return total / count


def _selected_log_probs(model: Any, seqs: Sequence[Sequence[int]], keep: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Log-softmax rows, in float32, at the positions ``keep`` marks (rows × max length, bool).

    Sequences are right-padded: causal attention never lets a real token see the padding after it, so
    positions need no correction, and ``logits_to_keep`` with a boolean mask projects only the marked
    positions onto the vocabulary (returned flattened in row-major order).
    """
    ids, mask = pad(seqs, pad_id, "right", model_device(model))
    return log_softmax_rows(model(input_ids=ids, attention_mask=mask, logits_to_keep=keep.to(ids.device)).logits)
