"""FedEx-LoRA: average A and B as FedIT does, and add what that misses to the frozen base, so the model is exact.

Singhal, Ponkshe, Vepakomma, "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models",
ACL 2025 (arXiv 2410.09432). Per module, with data weights w_k and each client's scaling s_k folded into its B:

    B̄ = Σ w_k s_k B_k,   Ā = Σ w_k A_k,   residual = Σ w_k s_k B_k A_k − B̄ Ā

The server adds the residual to every client's frozen base weight (W0 ← W0 + residual, eq. 16, kept from round to
round) and the next round starts from (B̄, Ā): base plus adapter is then the exact weighted mean of the updates.

Choices the paper leaves open, made here:
- weights: the paper averages uniformly over its equal splits; florist uses n_k / N in all three means, which keeps
  the sum exact for any weights that sum to 1;
- heterogeneous ranks (the paper has one rank): the factors are zero-padded to the largest rank, so each round's
  base plus adapter is still the exact mean of the updates the clients sent; but a client of a smaller rank starts
  its next round from (B̄, Ā) cut to its rank, as under every florist method that starts from the global adapter, so
  the model it trains from lacks the global's components beyond its rank. Across rounds FedEx-LoRA is exact with
  equal ranks only;
- round 1 starts as every florist method does (each client a fresh PEFT draw), so it shares its training with FedIT,
  FLoRA and FLoRIST; the paper's server sends one draw of A to every client.

What travels down besides (B̄, Ā): the residual, as the authors' code sends it (``residual = "dense"``, m × n numbers a
module) or as its exact factors (``"factors"``): residual = Σ_{k<K} (w_k (s_k B_k − B̄)) (A_k − A_K), rank at most
(K − 1) r, below the paper's bound K r. The model is the same either way; the option says which the accounting
counts, and the record names it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..aggregation import AggregationResult, ClientUpdate, ModuleAggregate
from ..aggregation.base import Adapter, fold_scaling, zero_pad
from ..aggregation.fedit import average_factors
from .base import Method, Option, Style


def exact_residual(updates: Sequence[ClientUpdate], weights: Sequence[float], average: Adapter) -> Adapter | None:
    """Per module, Σ w_k s_k B_k A_k − B̄ Ā as factors: B = [w_k (s_k B_k − B̄)], A = [A_k − A_K] over k < K.

    Exact since Ā = Σ w_k A_k and Σ w_k = 1: Σ_k w_k (s_k B_k − B̄)(A_k − A_K) = Σ w_k s_k B_k A_k − B̄ A_K − B̄ Ā
    + B̄ A_K; the last client's term is zero and is left out. One client: no residual (None), there is nothing to add.
    """
    if len(updates) == 1:
        return None
    residual = {}
    for name, avg in average.items():
        factors = [u.modules[name] for u in updates]
        r = avg.rank
        Bs = [zero_pad(fold_scaling(f), r, dim=1) for f in factors]
        As = [zero_pad(f.A, r, dim=0) for f in factors]
        B = torch.cat([w * (b - avg.B) for b, w in zip(Bs[:-1], weights[:-1])], dim=1)
        A = torch.cat([a - As[-1] for a in As[:-1]], dim=0)
        residual[name] = ModuleAggregate(A=A, B=B)
    return residual


class FedExLoRA(Method):
    name = "fedex"
    display = "FedEx-LoRA"
    order = 4
    summary = "Averages A and B, and merges the residual the averages miss into the base: exact."
    exact = True
    scheme = "reinit"  # the next round starts from (B̄, Ā) over the base with every residual so far
    style = Style(marker="*", colour="#e377c2")
    paper = "Singhal, Ponkshe, Vepakomma, ACL 2025 (arXiv 2410.09432)"
    options = (
        Option(
            "residual",
            "dense",
            "how the residual travels down: dense (m × n a module, as the authors' code) or factors (rank ≤ (K−1) r)",
            choices=("dense", "factors"),
        ),
    )

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        average = average_factors(updates, weights)
        return AggregationResult(
            self.name,
            average,
            weights=list(weights),
            residual=exact_residual(updates, weights, average),
            residual_dense=self.residual == "dense",
        )
