"""Checks every update before any math runs, so a bad client is named instead of corrupting the result.

Two entry points. ``check_updates`` is the front of ``aggregate``/``prepare``: every update is checked on its own,
then all must adapt the modules and shapes most of them agree on; the first bad update stops the aggregation.
``screen_updates`` is the server's: each update is checked on its own against the shapes the server knows (the
base model's modules), the rank and scaling it asked that client for, so one bad client is left out and cannot
set the reference the others are held to. ``check_result`` is the back of every entry point: nothing non-finite
leaves an aggregation.

The numbers are checked as the server will compute with them: the scaling and the factors cast to
``SCREEN_DTYPE``, the scaling folded into B (``s B``, as every method forms it), and the norm bound measured on
those values. ``SCREEN_DTYPE`` is float32 for every client whatever its own dtype: the server computes in float32
unless a float64 client is in the round, and writes and sends every adapter in float32, so float32 is the
narrowest range the numbers ever pass through. Checking each client there makes its verdict its own: a float64
client does not widen the range the others are held to, nor pass factors (1e150 and 1e-150, say) that are fine
as a product but overflow when folded, averaged or written in float32.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from .base import AggregationError, AggregationResult, ClientUpdate, LoraFactors
from .metrics import factored_frobenius

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCREEN_DTYPE = torch.float32
FLOAT32_MAX = torch.finfo(torch.float32).max
# far beyond any trained adapter (norms of order 1), far below float32's largest value (3.4e38): each folded
# factor, weighted factor, stack entry and sum over clients the methods form stays under it
MAX_FACTOR_SCALE = 1e30
# a client's scaling and the server's alpha / r are the same float expression; this only absorbs a transport's
# rounding (a float32 copy of the scaling), never another alpha or rank
SCALING_RTOL = 1e-6
# the float32 rounding an aggregate's norm may carry past the bound its inputs were held to
NORM_RTOL = 1e-4


def _who(update: ClientUpdate, k: int) -> str:
    name = getattr(update, "client_id", "")
    return (name if isinstance(name, str) else "") or f"client {k}"


def check_updates(updates: Sequence[ClientUpdate], max_rank: int | None = None, max_norm: float = 0.0) -> None:
    """Well-formed, representable factors on every client, and the module names and weight shapes most clients have.

    Each update is checked on its own first, so a bad one is named wherever it stands. The modules and shapes
    the others are held to are the most common ones (the first client's among equally common), so one client
    that adapts other modules is named even when it comes first.
    """
    if len(updates) == 0:
        raise AggregationError("no client updates to aggregate")
    for k, update in enumerate(updates):
        check_update(update, None, _who(update, k), max_rank=max_rank, max_norm=max_norm)
    shapes = [{name: f.shape for name, f in u.modules.items()} for u in updates]
    signatures = [frozenset(s.items()) for s in shapes]
    counts = Counter(signatures).most_common()  # equal counts keep first-seen order
    common = signatures.index(counts[0][0])
    shared = len(counts) == 1 or counts[1][1] < counts[0][1]
    reference = "most clients" if shared else _who(updates[common], common)
    for k, update in enumerate(updates):
        if signatures[k] != signatures[common]:
            check_update(update, shapes[common], _who(update, k), max_rank=max_rank, reference=reference)


def screen_updates(
    updates: Sequence[ClientUpdate],
    expected_shapes: Mapping[str, tuple[int, int]] | None,
    *,
    max_ranks: Sequence[int | None] | None = None,
    scalings: Sequence[Sequence[float] | None] | None = None,
    max_norm: float = 0.0,
) -> tuple[list[int], dict[int, str]]:
    """Check each update on its own; returns the positions of the accepted ones and ``{position: reason}``.

    ``expected_shapes``: the (out, in) shape of every module the updates must adapt, and no other (None: each
    update is only checked to be well formed; whether they agree with each other is ``check_updates``' job).
    ``max_ranks``: per update, the rank that client was asked for (it may return less, never more).
    ``scalings``: per update, the scalings the client may train with (``asked_scalings``; None: not known).
    ``max_norm``: a bound on ``||s B A||_F`` per module, as the server computes it (0: none).
    """
    for label, given in (("rank bounds", max_ranks), ("scaling sets", scalings)):
        if given is not None and len(given) != len(updates):
            raise ValueError(f"{len(given)} {label} given for {len(updates)} updates")
    accepted, rejected = [], {}
    for k, update in enumerate(updates):
        try:
            check_update(
                update,
                expected_shapes,
                _who(update, k),
                max_rank=None if max_ranks is None else max_ranks[k],
                scalings=None if scalings is None else scalings[k],
                max_norm=max_norm,
                reference="the base model",
            )
        except AggregationError as e:
            rejected[k] = str(e)
        else:
            accepted.append(k)
    return accepted, rejected


def asked_scalings(alpha: float, rank: int, use_rslora: bool | None) -> tuple[float, ...]:
    """The scalings PEFT gives a pair trained with ``lora_alpha`` ``alpha`` at rank ``rank``: alpha / r, or
    alpha / sqrt(r) under rsLoRA (florist/adapters.py's ``module_scaling``); both when it is not known which."""
    plain, rs = alpha / rank, alpha / math.sqrt(rank)
    return (plain,) if use_rslora is False else (rs,) if use_rslora else tuple(dict.fromkeys((plain, rs)))


def check_result(
    result: AggregationResult, max_norm: float = 0.0, clients: Sequence[str] | None = None
) -> AggregationResult:
    """``result`` unchanged if every tensor in it (each client's adapter too, and the singular values) is finite and
    within float32, the dtype adapters are written and sent in; otherwise an ``AggregationError`` naming the method
    and module, so that nothing of the round is kept. ``clients`` names the per-client adapters, in their order.

    ``max_norm`` (0: none), the bound each client's ``||s B A||_F`` was held to, also bounds every aggregated
    ``||B A||_F``: a weighted mean of updates within it is within it, so only averaging the factors apart (FedIT)
    can exceed it, through the cross terms of one client's rescaled pair (c B, A / c) with the others' factors.
    """
    seen: set[int] = set()
    adapters = [result.modules, *(result.per_client or [])]
    for k, adapter in enumerate(adapters + ([result.residual] if result.residual is not None else [])):
        if id(adapter) in seen:  # a client that gets the global adapter itself
            continue
        seen.add(id(adapter))
        if k == len(adapters):
            whose, bounded = "residual", False  # the residual is exact minus the adapter: the sum is what is bounded
        else:
            bounded = True
            whose = "global adapter" if k == 0 else f"adapter for {clients[k - 1] if clients else f'client {k - 1}'}"
        for name, m in adapter.items():
            for label, t in (("A", m.A), ("B", m.B), ("singular values", m.singular_values)):
                if t is not None and t.numel() and not float(t.abs().amax()) <= FLOAT32_MAX:  # False for NaN too
                    raise AggregationError(
                        f"{result.method}, module {name}: the aggregated {whose} has {label} that are NaN, Inf or "
                        f"beyond float32; nothing of this aggregation is kept"
                    )
            norm = factored_frobenius(m.B.double(), m.A.double()) if max_norm and bounded else 0.0
            if not norm <= max_norm * (1 + NORM_RTOL):
                raise AggregationError(
                    f"{result.method}, module {name}: the aggregated {whose} has norm ||B A|| = {norm:.4g}, over the "
                    f"bound {max_norm:g} every client's update was held to; nothing of this aggregation is kept"
                )
    return result


def check_update(
    update: ClientUpdate,
    expected_shapes: Mapping[str, tuple[int, int]] | None,
    who: str,
    *,
    max_rank: int | None = None,
    scalings: Sequence[float] | None = None,
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
        missing = sorted(set(expected_shapes) - set(modules), key=str)
        extra = sorted(set(modules) - set(expected_shapes), key=str)
        if missing or extra:
            name = (missing or extra)[0]
            what = "lacks" if missing else "has an extra"
            raise AggregationError(
                f"{who}, module {name}: {what} module compared with {reference} "
                f"({len(missing)} missing, {len(extra)} extra)"
            )
    for name, f in modules.items():
        expected = None if expected_shapes is None else expected_shapes[name]
        check_factors(f, f"{who}, module {name}", expected, max_rank, max_norm, reference, scalings)


def check_factors(
    f: LoraFactors,
    where: str,
    expected_shape: tuple[int, int] | None,
    max_rank: int | None,
    max_norm: float = 0.0,
    reference: str = "the other clients",
    scalings: Sequence[float] | None = None,
) -> None:
    """One pair: its structure, then its numbers as the server will compute with them (see the module's docstring)."""
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
    largest = {}
    for label, t in (("A", f.A), ("B", f.B)):
        largest[label] = _largest(t)  # NaN or Inf exactly when some entry is
        if not math.isfinite(largest[label]):
            raise AggregationError(f"{where}: {label} contains NaN or Inf")
    if scalings is not None and not any(math.isclose(f.scaling, s, rel_tol=SCALING_RTOL) for s in scalings):
        asked = " or ".join(f"{s:.6g}" for s in scalings)
        raise AggregationError(
            f"{where}: scaling {f.scaling:.6g} is not the {asked} the job's lora_alpha and rank give"
        )
    s = as_computed_scaling(f.scaling)
    if s is None:
        raise AggregationError(
            f"{where}: scaling {f.scaling:.4g} is outside {_range(SCREEN_DTYPE)}, the range the server computes in"
        )
    # each folded factor and their product under MAX_FACTOR_SCALE bounds every tensor the methods form from this
    # pair: w s B, w A, the stacks, sums over clients, R_B R_A^T in the stacked SVD, and the dense s B A.
    # ||t|| <= max|t| sqrt(numel) settles it without forming s B for any adapter of ordinary size.
    bound_B = s * largest["B"] * math.sqrt(f.B.numel())
    bound_A = largest["A"] * math.sqrt(f.A.numel())
    if not within_scale(bound_B, bound_A):  # under 1e30, s B cannot overflow float32 either
        norm_B, norm_A = _norm(f.B.to(SCREEN_DTYPE) * s), _norm(f.A.to(SCREEN_DTYPE))
        if not within_scale(norm_B, norm_A):
            raise AggregationError(
                f"{where}: ||s B|| = {_size(norm_B)} and ||A|| = {_size(norm_A)} in {_name(SCREEN_DTYPE)}, too large "
                f"to aggregate (each and their product must stay under {MAX_FACTOR_SCALE:g})"
            )
    if max_norm:  # ||s B A||_F from the very values the server will use, measured in double precision
        sB, A = as_computed(f)
        norm = factored_frobenius(sB.double(), A.double())
        if not norm <= max_norm:
            raise AggregationError(f"{where}: update norm ||s B A|| = {norm:.4g} exceeds the bound {max_norm:g}")


def gradient_problem(gradients: Mapping[str, object], shapes: Mapping[str, tuple[int, int]]) -> str:
    """Why a client's summed base-weight gradients ({module: m × n tensor}) are unusable, or "": other modules than
    the base model's, a wrong shape or dtype, a NaN or Inf, or an entry beyond ``MAX_FACTOR_SCALE``."""
    if set(gradients) != set(shapes):
        odd = sorted(set(gradients) ^ set(shapes))[0]
        return f"its gradient's modules are not the base model's (module {odd!r:.80})"
    for name, g in gradients.items():
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(shapes[name]) or g.dtype not in FLOAT_DTYPES:
            return f"module {name}: a gradient must be a float tensor of shape {tuple(shapes[name])}"
        largest = g.abs().amax()  # NaN or Inf exactly when some entry is, in one reduction
        if not (torch.isfinite(largest) and float(largest) <= MAX_FACTOR_SCALE):
            return f"module {name}: its gradient is not finite or beyond 1e30"  # MAX_FACTOR_SCALE
    return ""


def positive_finite(x: object) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x) and x > 0
    except OverflowError:  # an int beyond float range
        return False


def _is_zero(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and x == 0


def within_scale(norm_B: float, norm_A: float) -> bool:
    return norm_B <= MAX_FACTOR_SCALE and norm_A <= MAX_FACTOR_SCALE and norm_B * norm_A <= MAX_FACTOR_SCALE


def _largest(t: torch.Tensor) -> float:
    """max |t| in one pass (no |t| temporary); NaN or Inf exactly when some entry is."""
    low, high = (float(x) for x in torch.aminmax(t))
    return math.nan if math.isnan(low) or math.isnan(high) else max(-low, high)


def as_computed_scaling(scaling: float) -> float | None:
    """The scaling as ``SCREEN_DTYPE`` holds it, or None when it is not representable there (see ``as_computed``)."""
    s = torch.tensor(float(scaling), dtype=SCREEN_DTYPE)
    return float(s) if torch.isfinite(s) and s >= torch.finfo(SCREEN_DTYPE).smallest_normal else None


def as_computed(f: LoraFactors) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(s B, A) as the methods form them, in ``SCREEN_DTYPE``; s B is None when s itself is not representable there.

    An entry beyond the dtype's range becomes Inf here, as it would in the server's arithmetic.
    """
    s = as_computed_scaling(f.scaling)
    if s is None:
        return None, f.A.to(SCREEN_DTYPE)
    return f.B.to(SCREEN_DTYPE) * s, f.A.to(SCREEN_DTYPE)


def _norm(t: torch.Tensor) -> float:
    """||t||_F; in t's own dtype where that cannot overflow or lose the bound's meaning, else in float64."""
    if t.dtype == torch.float32:
        norm = float(torch.linalg.vector_norm(t))
        if math.isfinite(norm) and 1e-15 < norm < 1e15:  # far from float32's range: exact enough for a bound
            return norm
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


def _size(norm: float) -> str:
    return f"{norm:.4g}" if math.isfinite(norm) else "Inf (an entry overflows)"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _range(dtype: torch.dtype) -> str:
    info = torch.finfo(dtype)
    return f"{_name(dtype)} ({info.smallest_normal:.3g} to {info.max:.3g})"


def normalized_weights(updates: Sequence[ClientUpdate], weights: Sequence[float] | None) -> list[float]:
    """w_k = n_k / N from the example counts, or the given weights normalised to sum 1."""
    try:
        given = [u.num_examples for u in updates] if weights is None else list(weights)
    except TypeError:
        raise AggregationError(f"weights must be a sequence of numbers; got {type(weights).__name__}") from None
    if len(given) != len(updates):
        raise AggregationError(f"{len(given)} weights given for {len(updates)} clients")
    names = [_who(u, k) for k, u in enumerate(updates)]
    raw = weight_values(given, names, "example counts" if weights is None else "weights")
    largest = max(raw)
    relative = [w / largest for w in raw]  # in [0, 1]: their sum cannot overflow, however large the counts
    total = math.fsum(relative)
    return [w / total for w in relative]


def weight_values(given: Sequence[object], names: Sequence[str], source: str = "weights") -> list[float]:
    """The clients' weights as floats, each a non-negative finite number and not all zero: the one check of a weight,
    for the server's example counts and for weights a user gives alike. ``names`` name the clients in errors."""
    raw = []
    for name, w in zip(names, given, strict=True):
        try:
            value = float(w)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            value = math.nan
        if isinstance(w, bool) or not math.isfinite(value) or value < 0:
            raise AggregationError(f"{name}: weight {w!r} is not a non-negative finite number")
        raw.append(value)
    if max(raw, default=0.0) <= 0:
        raise AggregationError(f"the clients' {source} sum to zero; nothing to weigh the updates by")
    return raw


def compute_dtype(updates: Sequence[ClientUpdate]) -> torch.dtype:
    """float64 if any input is float64, else float32 (QR and SVD need at least single precision)."""
    dtypes = {t.dtype for u in updates for f in u.modules.values() for t in (f.A, f.B)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def as_dtype(updates: Sequence[ClientUpdate], dtype: torch.dtype) -> list[ClientUpdate]:
    def cast(f: LoraFactors) -> LoraFactors:
        return LoraFactors(A=f.A.to(dtype), B=f.B.to(dtype), scaling=f.scaling)

    return [replace(u, modules={n: cast(f) for n, f in u.modules.items()}) for u in updates]
