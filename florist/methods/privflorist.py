"""Private FLoRIST: FLoRIST's exact thresholded update from two sums over the clients, never one client's pair.

FLoRIST and FLoRA stack every client's factors, so the server holds each client's adapter. The SVD FLoRIST needs can
be had from sums alone (``florist.aggregation.sketched``): with Ω (n × W, W = Σ r_k plus ``oversampling``) drawn from
a seed every client knows, each client sends Y_k = w_k s_k B_k (A_k Ω); the sum Y = ΔW Ω gives the server
Q = orth(Y), sent to every client; each client sends Z_k = (Qᵀ w_k s_k B_k) A_k; the sum Z = Qᵀ ΔW gives
ΔW = Q Z exactly, and FLoRIST's thresholding by τ follows. Through a secure aggregation (SecAgg+), which reveals
only sums, the server learns ΔW and nothing of one client's update beyond it. The price is upload: (m + n)·W
numbers a module and client, in two exchanges, against FLoRIST's (m + n)·r_k, and Q (m × W) down between them.

How it runs here: in-process, the two exchanges are plain sums (the mathematics; the result equals FLoRIST's to
rounding, and the traffic is counted as the protocol sends it). On the Flower engine it is refused: its exchanges
are not yet carried by Flower's SecAgg+, and plain messages would send every client's pair in the clear.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..aggregation import AggregationResult, ClientUpdate, ModuleAggregate
from ..aggregation.sketched import share_sizes, sketch_width, thresholded_from_sums
from ..aggregation.validate import compute_dtype
from .base import Method, Option, Style
from .florist import FLoRIST


class PrivateFLoRIST(Method):
    name = "privflorist"
    display = "FLoRIST-SA"
    order = 11  # beside FLoRIST
    summary = "FLoRIST's exact SVD from two sums over the clients (ΔW·Ω, then Qᵀ·ΔW): the sums alone give the update."
    exact = False  # exact at τ = 1, as FLoRIST
    style = Style(marker="*", colour="#8c564b", colour_map="cividis")
    sweep = FLoRIST.sweep  # the same τ, under the same config key: one τ list serves both
    options = (
        Option(
            "oversampling", 0, "sketch columns beyond Σ r_k: a margin against rounding, not needed for exactness", low=0
        ),
        Option("sketch_seed", 0, "the seed every client draws the sketch Ω from", low=0),
    )

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value: float | None = None):
        return self.aggregate_sweep(updates, weights, [value])[value]

    def aggregate_sweep(self, updates, weights, values) -> dict[float | None, AggregationResult]:
        taus = [self.sweep.default if v is None else v for v in values]
        adapters = thresholded_from_sums(updates, weights, taus, self.sketch_seed, self.oversampling)
        dtype = compute_dtype(updates)  # results in the compute dtype, as FLoRIST's
        return {
            v: AggregationResult(self.name, {n: _cast(m, dtype) for n, m in adapters[t].items()}, weights=list(weights))
            for v, t in zip(values, taus)
        }

    def exchange_traffic(self, updates: Sequence[ClientUpdate]) -> tuple[list[int], list[int]]:
        """Each client sends Y_k (m × W) and Z_k (W × n) a module, and is sent Q (m × W) between them."""
        up = down = 0
        for name, pair in updates[0].modules.items():
            (m, n) = pair.shape
            width = sketch_width([u.modules[name].rank for u in updates], m, n, self.oversampling)
            first, second = share_sizes(m, n, width)
            up, down = up + first + second, down + first  # Q is m × W, as Y_k (W ≤ min(m, n))
        return [up] * len(updates), [down] * len(updates)

    def engine_problem(self, engine: str) -> str:
        if engine == "inprocess":
            return ""
        return (
            "runs on the in-process engine only: over Flower its two exchanges need Flower's secure aggregation "
            "(SecAgg+), which florist does not carry them on yet, and plain messages would send every pair in the "
            'clear; set engine = "inprocess" or leave it out of federation.methods'
        )


def _cast(module: ModuleAggregate, dtype) -> ModuleAggregate:
    return ModuleAggregate(A=module.A.to(dtype), B=module.B.to(dtype), singular_values=module.singular_values.to(dtype))
