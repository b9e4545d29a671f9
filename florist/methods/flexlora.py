"""FlexLoRA: the dense exact update's SVD, truncated to each client's own rank: a per-client adapter."""

from __future__ import annotations

from ..aggregation import AggregationResult
from ..aggregation.flexlora import dense_truncations
from .base import Method, Style


class FlexLoRA(Method):
    name = "flexlora"
    display = "FlexLoRA"
    order = 2
    summary = "SVD of the dense m×n update, truncated to each client's rank; costs O(m n min(m, n)) per module."
    style = Style(marker="^", colour="#2ca02c")

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        modules, per_client = dense_truncations(updates, weights)
        return AggregationResult(self.name, modules, per_client=per_client, weights=list(weights))
