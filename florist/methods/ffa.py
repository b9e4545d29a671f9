"""FFA-LoRA: A frozen at one draw shared by every client, only B trains and travels; averaging B is then exact."""

from __future__ import annotations

from ..aggregation import AggregationResult
from ..aggregation.ffa import average_b
from ..jobs import ClientMode
from .base import Method, Style

FROZEN_A = ClientMode(trains={"B"}, shared={"A"})


class FFALoRA(Method):
    name = "ffa"
    display = "FFA-LoRA"
    order = 3
    summary = "Trains B only under a shared frozen A (a new draw each round); exact, half the traffic."
    exact = True
    style = Style(marker="v", colour="#9467bd")

    def mode(self, round_number: int) -> ClientMode:
        return FROZEN_A

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        return AggregationResult(self.name, average_b(updates, weights), weights=list(weights))
