"""Checks every update before any math runs, so a bad client is named instead of corrupting the result.

Two entry points. ``check_updates`` is the front of ``aggregate``/``prepare``: all updates must agree with the
first one, and the first bad update stops the aggregation. ``screen_updates`` is the server's: each update is
checked on its own against the shapes the server knows (the base model's modules) and the rank it asked that
client for, so one bad client is left out and cannot set the reference the others are held to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .base import AggregationError, ClientUpdate, LoraFactors
from .metrics import factored_frobenius

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# far beyond any trained adapter (norms of order 1), far below float32's largest value (3.4e38)
MAX_FACTOR_SCALE = 1e30


def _who(update: ClientUpdate, k: int) -> str:
    name = getattr(update, "client_id", "")
    return (name if isinstance(name, str) else "") or f"client {k}"


def check_updates(updates: Sequence[ClientUpdate], max_rank: int | None = None, max_norm: float = 0.0) -> None:
    """Same module names and weight shapes on every client as on the first; well-formed, finite factors."""
    if len(updates) == 0:
        raise AggregationError("no client updates to aggregate")
    reference, first = updates[0], _who(updates[0], 0)
    check_update(reference, None, first, max_rank=max_rank, max_norm=max_norm)
    shapes = {name: f.shape for name, f in reference.modules.items()}
    for k, update in enumerate(updates[1:], start=1):
        check_update(update, shapes, _who(update, k), max_rank=max_rank, max_norm=max_norm, reference=first)


def screen_updates(
    updates: Sequence[ClientUpdate],
    expected_shapes: Mapping[str, tuple[int, int]] | None,
    *,
    max_ranks: Sequence[int | None] | None = None,
    max_norm: float = 0.0,
) -> tuple[list[int], dict[int, str]]:
    """Check each update on its own; returns the positions of the accepted ones and ``{position: reason}``.

    ``expected_shapes``: the (out, in) shape of every module the updates must adapt, and no other (None: each
    update is only checked to be well formed; whether they agree with each other is ``check_updates``' job).
    ``max_ranks``: per update, the rank that client was asked for (it may return less, never more).
    ``max_norm``: a bound on ``||s B A||_F`` per module (0: none).
    """
    if max_ranks is not None and len(max_ranks) != len(updates):
        raise ValueError(f"{len(max_ranks)} rank bounds given for {len(updates)} updates")
    accepted, rejected = [], {}
    for k, update in enumerate(updates):
        try:
            check_update(update, expected_shapes, _who(update, k), max_rank=None if max_ranks is None else max_ranks[k],
                         max_norm=max_norm, reference="the base model")
        except AggregationError as e:
            rejected[k] = str(e)
        else:
            accepted.append(k)
    return accepted, rejected


def check_update(
    update: ClientUpdate,
    expected_shapes: Mapping[str, tuple[int, int]] | None,
    who: str,
    *,
    max_rank: int | None = None,
    max_norm: float = 0.0,
    reference: str = "the other clients",
) -> None:
    """One update: its example count, its module names (those of ``expected_shapes`` when given), every pair."""
    if not isinstance(update, ClientUpdate):
        raise AggregationError(f"{who}: not a client update (got {type(update).__name__})")
    if not (positive_finite(update.num_examples) or _is_zero(update.num_examples)):
        raise AggregationError(f"{who}: num_examples {update.num_examples!r} is not a non-negative finite number")
    modules = update.modules
    if not isinstance(modules, Mapping) or not modules:
        raise AggregationError(f"{who}: the update has no modules")
    if expected_shapes is not None:
        missing = sorted(set(expected_shapes) - set(modules))
        extra = sorted(set(modules) - set(expected_shapes), key=str)
        if missing or extra:
            name = (missing or extra)[0]
            what = "lacks" if missing else "has an extra"
            raise AggregationError(
                f"{who}, module {name}: {what} module compared with {reference} ({len(missing)} missing, {len(extra)} extra)"
            )
    for name, f in modules.items():
        expected = None if expected_shapes is None else expected_shapes[name]
        check_factors(f, f"{who}, module {name}", expected, max_rank, max_norm, reference)


def check_factors(
    f: LoraFactors,
    where: str,
    expected_shape: tuple[int, int] | None,
    max_rank: int | None,
    max_norm: float = 0.0,
    reference: str = "the other clients",
) -> None:
    if not isinstance(f, LoraFactors):
        raise AggregationError(f"{where}: not a LoRA pair (got {type(f).__name__})")
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
    if min(f.shape) < 1:
        raise AggregationError(f"{where}: adapts an empty {f.shape[0]}x{f.shape[1]} weight")
    if expected_shape is not None and f.shape != tuple(expected_shape):
        raise AggregationError(
            f"{where}: adapts a {f.shape[0]}x{f.shape[1]} weight, {reference} {expected_shape[0]}x{expected_shape[1]}"
        )
    if not positive_finite(f.scaling):
        raise AggregationError(f"{where}: scaling {f.scaling!r} is not a positive finite number")
    for label, t in (("A", f.A), ("B", f.B)):
        # the max of |t| is NaN or Inf exactly when some entry is; one reduction instead of a boolean tensor
        if not torch.isfinite(t.abs().amax()):
            raise AggregationError(f"{where}: {label} contains NaN or Inf")
    # s ||B|| ||A|| bounds every product the methods form from this pair (R_B R_A^T in the stacked SVD), so
    # below MAX_FACTOR_SCALE nothing overflows single precision, even summed over millions of clients
    scale = float(f.scaling) * float(torch.linalg.matrix_norm(f.B.double())) * float(torch.linalg.matrix_norm(f.A.double()))
    if not scale <= MAX_FACTOR_SCALE:
        raise AggregationError(f"{where}: s*||B||*||A|| is {scale:.4g}, too large to aggregate (over {MAX_FACTOR_SCALE:g})")
    if max_norm:
        norm = update_norm(f)
        if norm > max_norm:
            raise AggregationError(f"{where}: update norm ||s B A|| = {norm:.4g} exceeds the bound {max_norm:g}")


def positive_finite(x: object) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x) and x > 0
    except OverflowError:  # an int beyond float range
        return False


def _is_zero(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x == 0


def update_norm(f: LoraFactors) -> float:
    """||s B A||_F from the factors, in double precision (O((m+n) r^2), the product is never formed)."""
    return float(f.scaling) * factored_frobenius(f.B.double(), f.A.double())


def normalized_weights(updates: Sequence[ClientUpdate], weights: Sequence[float] | None) -> list[float]:
    """w_k = n_k / N from the example counts, or the given weights normalised to sum 1."""
    source = "example counts" if weights is None else "weights"
    try:
        given = [u.num_examples for u in updates] if weights is None else list(weights)
    except TypeError:
        raise AggregationError(f"weights must be a sequence of numbers; got {type(weights).__name__}") from None
    if len(given) != len(updates):
        raise AggregationError(f"{len(given)} weights given for {len(updates)} clients")
    raw = []
    for k, w in enumerate(given):
        try:
            value = float(w)
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if isinstance(w, bool) or not math.isfinite(value) or value < 0:
            raise AggregationError(f"{_who(updates[k], k)}: weight {w!r} is not a non-negative finite number")
        raw.append(value)
    total = sum(raw)
    if total <= 0:
        raise AggregationError(f"the clients' {source} sum to zero; nothing to weigh the updates by")
    if not math.isfinite(total):
        raise AggregationError(f"the clients' {source} sum to {total}; too large to weigh the updates by")
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
