"""Stacking client pairs (FLoRA's construction, FLoRIST's first step)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .base import ClientUpdate, LoraFactors, fold_scaling

# The most a batch of same-shape stacks holds (B and A together, in the inputs' dtype). Batching amortises each
# call's fixed costs; small batches keep the float64 copies and Grams near the caches. On bench/aggregation.py's
# Llama-7B factors (8 clients, r = 16), in-process on a 2-core EPYC, best of 7: 0.95 s at 8 MiB (2 modules a batch),
# 1.27 s at 128 MiB (32).
BATCH_BYTES = 8 * 2**20


def stack(factors: Sequence[LoraFactors], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """B_st = [s_1 B_1 ... s_K B_K] (m x sum r_k) and A_st = [w_1 A_1; ...; w_K A_K] (sum r_k x n).

    B_st @ A_st = sum_k w_k s_k B_k A_k exactly. Each client appears once, with its own weight.
    """
    B_st = torch.cat([fold_scaling(f) for f in factors], dim=1)
    A_st = torch.cat([w * f.A for f, w in zip(factors, weights, strict=True)], dim=0)
    return B_st, A_st


def same_shape_batches(updates: Sequence[ClientUpdate], max_bytes: int = BATCH_BYTES) -> Iterator[list[str]]:
    """The modules in groups whose stacks have one shape (the same m, n and every client's rank), in module order
    within a group, each group cut to at most ``max_bytes`` of stacks (at least one module)."""
    groups: dict[tuple, list[str]] = {}
    for name in updates[0].modules:
        pairs = [u.modules[name] for u in updates]
        groups.setdefault((pairs[0].shape, tuple(f.rank for f in pairs)), []).append(name)
    for ((m, n), ranks), names in groups.items():
        per_module = (m + n) * sum(ranks) * updates[0].modules[names[0]].A.element_size()
        size = max(1, max_bytes // per_module)
        for start in range(0, len(names), size):
            yield names[start : start + size]


def stack_batch(
    updates: Sequence[ClientUpdate], weights: Sequence[float], names: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """The stacks of modules ``names`` (one stack shape) as batches B (L x m x R) and A (L x R x n), each factor
    scaled straight into its place: one write per entry, no intermediate copies."""
    first = updates[0].modules[names[0]]
    (m, n), R = first.shape, sum(u.modules[names[0]].rank for u in updates)
    B = first.B.new_empty(len(names), m, R)
    A = first.A.new_empty(len(names), R, n)
    for i, name in enumerate(names):
        col = 0
        for u, w in zip(updates, weights, strict=True):
            f = u.modules[name]
            torch.mul(f.B, f.scaling, out=B[i, :, col : col + f.rank])
            torch.mul(f.A, w, out=A[i, col : col + f.rank])
            col += f.rank
    return B, A
