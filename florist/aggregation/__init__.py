"""Aggregation rules for federated LoRA: pure functions over per-module factors.

    >>> result = aggregate("florist", updates, threshold=0.9)
    >>> result.modules["model.layers.0.self_attn.q_proj"].rank

To add a method: subclass ``AggregationMethod`` in a new file and add it to ``METHODS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    AggregationError,
    AggregationMethod,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ModuleAggregate,
)
from .fedit import FedIT
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .florist import FLoRIST, sweep
from .svd import energy_rank, stacked_svd
from .validate import (
    as_dtype,
    asked_scalings,
    check_result,
    check_update,
    check_updates,
    compute_dtype,
    normalized_weights,
    screen_updates,
)

METHODS: dict[str, type[AggregationMethod]] = {m.name: m for m in (FLoRIST, FLoRA, FedIT, FlexLoRA, FFALoRA)}


def get_method(name: str, threshold: float = 0.9) -> AggregationMethod:
    """The method called ``name``; ``threshold`` is FLoRIST's tau and ignored by the others."""
    if name not in METHODS:
        raise AggregationError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return FLoRIST(threshold) if name == FLoRIST.name else METHODS[name]()


def prepare(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | None = None,
    max_rank: int | None = None,
    max_norm: float = 0.0,
) -> tuple[list[ClientUpdate], list[float]]:
    """Validate, normalise weights and cast to the compute dtype: the common front of every method.

    ``max_rank`` bounds every pair's rank and ``max_norm`` every module's ``||s B A||_F`` (0: no bound).
    """
    check_updates(updates, max_rank=max_rank, max_norm=max_norm)
    w = normalized_weights(updates, weights)
    return as_dtype(updates, compute_dtype(updates)), w


def aggregate(
    method: str | AggregationMethod,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | None = None,
    threshold: float = 0.9,
) -> AggregationResult:
    """Validate the updates, aggregate them and check the result. ``weights`` default to the example counts n_k / N.

    Ends in a result whose every tensor is finite, or an ``AggregationError`` naming the client (or the method).
    """
    m = get_method(method, threshold) if isinstance(method, str) else method
    prepared, w = prepare(updates, weights)
    names = [u.client_id or f"client {k}" for k, u in enumerate(prepared)]
    return check_result(m.aggregate(prepared, w), clients=names)


__all__ = [
    "METHODS",
    "AggregationError",
    "AggregationMethod",
    "AggregationResult",
    "ClientUpdate",
    "LoraFactors",
    "ModuleAggregate",
    "FLoRIST",
    "FLoRA",
    "FedIT",
    "FlexLoRA",
    "FFALoRA",
    "aggregate",
    "get_method",
    "prepare",
    "sweep",
    "energy_rank",
    "stacked_svd",
    "check_update",
    "check_updates",
    "screen_updates",
    "check_result",
    "asked_scalings",
]
