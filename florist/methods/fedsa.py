"""FedSA-LoRA: every client trains A and B, shares only A; the server averages A, each client keeps its own B.

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025
(arXiv 2410.01463). A learns what the clients have in common and is averaged, Ā = Σ w_k A_k (data weights); B learns
what is each client's own and never leaves it. Each round a client starts from the global Ā and its own B of the round
before; in round 1 every client starts from one common draw of A, B = 0 (the paper's server sends its model out).
Its model is personal, W0 + s B_k Ā, so the method's quality is the data-weighted mean of
the clients' personalised models, each scored on the same test set (the paper scores each on its own slice; florist's
test set is shared).

Choices the paper leaves open, made here, for heterogeneous ranks (the paper has one): the common draw is nested, a
client of rank r_k holding the leading r_k rows of the largest client's A (``jobs.common_a``); each row of Ā is the
data-weighted mean over the clients that hold that row, Ā_j = Σ_{k: r_k > j} w_k A_k,j / Σ_{k: r_k > j} w_k (a
zero-padded mean would shrink the rows only large-rank clients hold, and with them those clients' own models); and a
client of rank r_k takes Ā's leading r_k rows. With equal ranks this is the paper's Σ w_k A_k. The global
adapter written for the run is (Ā, 0): with no B of its own it is the base model. To score personalised models the
server needs each B_k, which clients send beside their upload (``ClientStart.report_kept``) for scoring only: no rule
here averages them and the accounting leaves them out.
"""

from __future__ import annotations

import torch

from ..aggregation import AggregationResult, ModuleAggregate
from ..aggregation.base import fold_scaling, zero_pad
from ..jobs import ClientMode
from .base import Method, Style

LOCAL_B = ClientMode(trains={"A", "B"}, keeps={"B"}, common_init=True)


class FedSALoRA(Method):
    name = "fedsa"
    display = "FedSA-LoRA"
    order = 7
    summary = "Shares and averages A; each client keeps its own B: one personalised model per client."
    exact = False
    scheme = "reinit"  # the global A with the client's own B
    style = Style(marker="p", colour="#17becf")
    paper = "Guo, Zeng, Wang, Fan, Wang, Qu, ICLR 2025 (arXiv 2410.01463)"

    def mode(self, round_number: int) -> ClientMode:
        return LOCAL_B

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        shared, personal = {}, [{} for _ in updates]
        for name in updates[0].modules:
            factors = [u.modules[name] for u in updates]
            r = max(f.rank for f in factors)
            A = sum(w * zero_pad(f.A, r, dim=0) for f, w in zip(factors, weights))
            # mixed ranks: each row the mean over the clients that hold it (with equal ranks every client holds every
            # row and the weights sum to 1, so the paper's sum stands as it is)
            if len({f.rank for f in factors}) > 1:
                held = sum(w * (torch.arange(r) < f.rank).to(A.dtype) for f, w in zip(factors, weights))
                A = A / torch.where(held > 0, held, 1.0)[:, None]  # a row held only at weight 0 stays zero
            shared[name] = ModuleAggregate(A=A, B=torch.zeros(factors[0].B.shape[0], r, dtype=A.dtype))
            for k, f in enumerate(factors):  # B is each client's own (zero where it was not reported)
                personal[k][name] = ModuleAggregate(A=A[: f.rank], B=fold_scaling(f))
        return AggregationResult(self.name, shared, per_client=personal, weights=list(weights))
