"""Checks every update before any math runs, so a bad client is named instead of corrupting the result."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import AggregationError, ClientUpdate, LoraFactors

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _who(update: ClientUpdate, k: int) -> str:
    return update.client_id or f"client {k}"


def check_updates(updates: Sequence[ClientUpdate], max_rank: int | None = None) -> None:
    """Same module names and weight shapes on every client; well-formed, finite factors."""
    if len(updates) == 0:
        raise AggregationError("no client updates to aggregate")
    reference = updates[0]
    if not reference.modules:
        raise AggregationError(f"{_who(reference, 0)}: the update has no modules")
    for k, update in enumerate(updates):
        who = _who(update, k)
        if update.num_examples < 0:
            raise AggregationError(f"{who}: num_examples is negative ({update.num_examples})")
        missing = sorted(set(reference.modules) - set(update.modules))
        extra = sorted(set(update.modules) - set(reference.modules))
        if missing or extra:
            name = (missing or extra)[0]
            what = "lacks" if missing else "has an extra"
            raise AggregationError(
                f"{who}, module {name}: {what} module compared with {_who(reference, 0)} "
                f"({len(missing)} missing, {len(extra)} extra)"
            )
        for name, f in update.modules.items():
            check_factors(f, f"{who}, module {name}", reference.modules[name].shape, max_rank)


def check_factors(f: LoraFactors, where: str, expected_shape: tuple[int, int], max_rank: int | None) -> None:
    for label, t in (("A", f.A), ("B", f.B)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2:
            raise AggregationError(f"{where}: {label} must be a 2-D tensor")
        if t.dtype not in FLOAT_DTYPES:
            raise AggregationError(f"{where}: {label} has dtype {t.dtype}, expected a floating point type")
    if f.B.shape[1] != f.A.shape[0]:
        raise AggregationError(f"{where}: B is {tuple(f.B.shape)} but A is {tuple(f.A.shape)}; their ranks differ")
    if f.rank < 1:
        raise AggregationError(f"{where}: rank 0")
    if max_rank is not None and f.rank > max_rank:
        raise AggregationError(f"{where}: rank {f.rank} exceeds the bound {max_rank}")
    if f.shape != expected_shape:
        raise AggregationError(f"{where}: adapts a {f.shape[0]}x{f.shape[1]} weight, other clients {expected_shape[0]}x{expected_shape[1]}")
    if not math.isfinite(f.scaling) or f.scaling <= 0:
        raise AggregationError(f"{where}: scaling {f.scaling} is not a positive finite number")
    for label, t in (("A", f.A), ("B", f.B)):
        # the max of |t| is NaN or Inf exactly when some entry is; one reduction instead of a boolean tensor
        if t.numel() and not torch.isfinite(t.abs().amax()):
            raise AggregationError(f"{where}: {label} contains NaN or Inf")


def normalized_weights(updates: Sequence[ClientUpdate], weights: Sequence[float] | None) -> list[float]:
    """w_k = n_k / N from the example counts, or the given weights normalised to sum 1."""
    raw = [float(u.num_examples) for u in updates] if weights is None else [float(w) for w in weights]
    source = "example counts" if weights is None else "weights"
    if len(raw) != len(updates):
        raise AggregationError(f"{len(raw)} weights given for {len(updates)} clients")
    for k, w in enumerate(raw):
        if not math.isfinite(w) or w < 0:
            raise AggregationError(f"{_who(updates[k], k)}: weight {w} is not a non-negative finite number")
    total = sum(raw)
    if total <= 0:
        raise AggregationError(f"the clients' {source} sum to zero; nothing to weigh the updates by")
    return [w / total for w in raw]


def compute_dtype(updates: Sequence[ClientUpdate]) -> torch.dtype:
    """float64 if any input is float64, else float32 (QR and SVD need at least single precision)."""
    dtypes = {t.dtype for u in updates for f in u.modules.values() for t in (f.A, f.B)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def as_dtype(updates: Sequence[ClientUpdate], dtype: torch.dtype) -> list[ClientUpdate]:
    def cast(f: LoraFactors) -> LoraFactors:
        return LoraFactors(A=f.A.to(dtype), B=f.B.to(dtype), scaling=f.scaling)

    return [
        ClientUpdate({n: cast(f) for n, f in u.modules.items()}, u.num_examples, u.client_id) for u in updates
    ]
