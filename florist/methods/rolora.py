"""RoLoRA: train and average B alone in odd rounds, A alone in even rounds; the other factor is common, so it is exact.

Chen, Guo, Ju, Dalal, Khisti, "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA", 2025
(arXiv 2502.01755; workshop version arXiv 2409.02346). Round 1 trains B (B starts at zero, so an A round first would
learn nothing) under an A every client holds at one shared draw; each later round starts from the global pair and
trains the factor whose turn it is, with the other frozen at its global value. The server averages the trained factor
with data weights (the authors' code; the paper writes 1/N over equal splits) and keeps the other:

    B rounds: B ← Σ w_k s B_k,  A unchanged;     A rounds: A ← Σ w_k A_k,  B unchanged.

One factor travels each way a round. Heterogeneous ranks (the paper has one): a client of rank r_k holds the leading
r_k rows of A (columns of B) and its trained factor is zero-padded, which keeps each round's mean exact over what the
clients sent; but it starts each round from the global pair cut to its rank, so the components beyond its rank are
averaged with its zeros and shrink: across rounds RoLoRA is exact with equal ranks only. Without a run's round
(``florist aggregate``) the factor that trained is the one that differs: clients that all hold one A sent a B round.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..aggregation import AggregationError, AggregationResult, ClientUpdate, LoraFactors, ModuleAggregate
from ..aggregation.base import Adapter, fold_scaling, zero_pad
from ..aggregation.ffa import average_b
from ..jobs import ClientMode
from .base import Method, RoundContext, Style

FIRST_B = ClientMode(trains={"B"}, shared={"A"})  # round 1: B under one shared draw of A, as FFA-LoRA's round
B_ROUND = ClientMode(trains={"B"})  # A frozen at the global A the round starts from
A_ROUND = ClientMode(trains={"A"})  # B frozen at the global B


def average_a(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Adapter:
    """Per module, the weighted mean of the clients' A (zero-padded) under the B they all hold (the largest rank's)."""
    modules = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        widest = max(factors, key=lambda f: f.rank)
        for u, f in zip(updates, factors):
            if not holds_common(f, widest, "B"):
                raise AggregationError(
                    f"rolora, module {name}: {u.client_id or 'a client'} holds another B than the global one"
                )
        A = sum(w * zero_pad(f.A, widest.rank, dim=0) for f, w in zip(factors, weights))
        modules[name] = ModuleAggregate(A=A, B=fold_scaling(widest))
    return modules


def holds_common(pair: LoraFactors, widest: LoraFactors, factor: str) -> bool:
    """Whether ``pair`` holds the widest client's ``factor`` cut to its rank: A's leading rows, exactly (one draw or
    the global A), or B's leading columns with the scaling folded in (equal up to the round-off of each client's
    division by its own scaling)."""
    if factor == "A":
        return torch.equal(pair.A, widest.A[: pair.rank])
    return fold_scaling(pair).allclose(fold_scaling(widest)[:, : pair.rank], rtol=1e-5, atol=1e-7)


class RoLoRA(Method):
    name = "rolora"
    display = "RoLoRA"
    order = 5
    summary = "Alternates: trains and averages B in odd rounds, A in even rounds; exact, one factor a round."
    exact = True
    scheme = "reinit"  # each round starts from the global pair
    style = Style(marker="h", colour="#bcbd22")
    paper = "Chen, Guo, Ju, Dalal, Khisti, 2025 (arXiv 2502.01755)"
    uses_context = True

    def mode(self, round_number: int) -> ClientMode:
        if round_number == 1:
            return FIRST_B
        return B_ROUND if round_number % 2 else A_ROUND

    def aggregate(self, updates, weights, value=None, context: RoundContext | None = None) -> AggregationResult:
        trained = self.mode(context.round_number).trains if context is not None else trained_factor(updates)
        modules = average_b(updates, weights) if trained == {"B"} else average_a(updates, weights)
        return AggregationResult(self.name, modules, weights=list(weights))


def trained_factor(updates: Sequence[ClientUpdate]) -> set[str]:
    """Which factor a round trained, from its updates alone: the one that is not common to every client."""
    if all(common(updates, "A")):
        return {"B"}
    if all(common(updates, "B")):
        return {"A"}
    raise AggregationError(
        "rolora: neither A nor B is the same on every client, but a RoLoRA round trains one factor under the other"
    )


def common(updates: Sequence[ClientUpdate], factor: str) -> list[bool]:
    """Per module, whether every client holds the widest client's ``factor`` (its leading rows of A, columns of B)."""
    out = []
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        widest = max(factors, key=lambda f: f.rank)
        out.append(all(holds_common(f, widest, factor) for f in factors))
    return out
