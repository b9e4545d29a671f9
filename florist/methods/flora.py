"""FLoRA: the server stacks the clients' pairs and sends the whole stack down. Exact; its rank is Σ r_k."""

from __future__ import annotations

from ..aggregation import AggregationResult
from ..aggregation.flora import stacked_update
from .base import Method, Style


class FLoRA(Method):
    name = "flora"
    display = "FLoRA"
    order = 1
    summary = "Stacks the clients' pairs: exact, at the rank of all clients' ranks together."
    exact = True
    style = Style(marker="D", colour="#8c564b")

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        return AggregationResult(self.name, stacked_update(updates, weights), weights=list(weights))
