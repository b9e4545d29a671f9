"""FedIT: FedAvg on the LoRA factors, A and B averaged separately. Not exact: mean(B)·mean(A) ≠ mean(B·A)."""

from __future__ import annotations

from ..aggregation import AggregationResult
from ..aggregation.fedit import average_factors
from .base import Method, Style


class FedIT(Method):
    name = "fedit"
    display = "FedIT"
    order = 0
    summary = "Averages A and B separately (FedAvg on the factors); ranks that differ are zero-padded."
    style = Style(marker="s", colour="#1f77b4")

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        return AggregationResult(self.name, average_factors(updates, weights), weights=list(weights))
