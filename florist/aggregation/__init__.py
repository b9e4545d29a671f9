"""The aggregation math of federated LoRA: pure functions over per-module factors, no models, no files, no engine.

``base`` holds the vocabulary (``LoraFactors``, ``ClientUpdate``, ``ModuleAggregate``, ``AggregationResult``),
``stacking`` and ``svd`` the exact stacked SVD and thresholding, ``validate`` the checks every update and result
passes, and one file per rule the rule itself. Which rule a method uses, and what its clients train, is declared
in ``florist.methods``; ``florist.methods.aggregate("florist", updates, value=0.9)`` runs one by name.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import (
    Adapter,
    AggregationError,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ModuleAggregate,
)
from .svd import energy_rank, stacked_svd, truncation
from .validate import (
    as_dtype,
    asked_scalings,
    check_result,
    check_update,
    check_updates,
    compute_dtype,
    gradient_problem,
    normalized_weights,
    screen_updates,
)


def prepare(
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | None = None,
    max_rank: int | None = None,
    max_norm: float = 0.0,
) -> tuple[list[ClientUpdate], list[float]]:
    """Validate, normalise weights and cast to the compute dtype: the common front of every rule.

    ``max_rank`` bounds every pair's rank and ``max_norm`` every module's ``||s B A||_F`` (0: no bound).
    """
    check_updates(updates, max_rank=max_rank, max_norm=max_norm)
    w = normalized_weights(updates, weights)
    return as_dtype(updates, compute_dtype(updates)), w


__all__ = [
    "Adapter",
    "AggregationError",
    "AggregationResult",
    "ClientUpdate",
    "LoraFactors",
    "ModuleAggregate",
    "prepare",
    "energy_rank",
    "stacked_svd",
    "truncation",
    "check_update",
    "check_updates",
    "screen_updates",
    "check_result",
    "asked_scalings",
    "gradient_problem",
]
