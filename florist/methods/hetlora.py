"""HetLoRA: heterogeneous ranks zero-padded, averaged with weights by each update's size, cut back to each client.

Cho, Liu, Xu, Fahrezi, Joshi, "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP
2024 (arXiv 2401.06432). Per module, each client's pair is zero-padded to the largest rank r_max and the server
averages B and A apart with the "sparsity" weights of its Fig. 2:

    p_k = ||s_k B_k A_k||_F / Σ_j ||s_j B_j A_j||_F,   B = Σ p_k s_k B̃_k,   A = Σ p_k Ã_k

(not the data sizes: a client whose update is larger counts more). Each client then starts its next round from the
global pair cut to its own rank, B[:, :r_k] and A[:r_k]. Not exact: B and A are averaged apart.

Rank self-pruning (``prune = γ``, 0: off): after a round, a client whose trained tail (its components from
⌊γ r_k⌋ on, all modules together) scores below the tail it received, score Σ ||B_tail||_F ||A_tail||_F, drops the tail
for good: its rank becomes max(``min_rank``, ⌊γ r_k⌋) and it sends the leading components only. The server applies
the rule to what each client sent and started from, which is the client's own decision computed where it is checked;
the accounting counts a pruned client's upload at its new rank, as the paper's client sends it.

Choices the paper leaves open, made here: weights per module (the paper writes one ΔW) with the scaling inside ΔW;
pruning per client over all modules; the tail penalty λ the reimplementations add to the local loss is not added (the
clients train as every florist method's do); round 1 starts as every florist method does (each client a fresh PEFT
draw; the paper's clients take truncations of one global draw), so it shares its training with FedIT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..aggregation import AggregationResult, ClientUpdate, LoraFactors, ModuleAggregate
from ..aggregation.base import Adapter, fold_scaling, zero_pad
from .base import Method, Option, RoundContext, Style


def sparsity_weights(factors: Sequence[LoraFactors]) -> list[float]:
    """p_k ∝ ||s_k B_k A_k||_F, from the factors (trace of (BᵀB)(AAᵀ), not the m × n product); uniform if all are 0."""
    norms = []
    for f in factors:
        B, A = fold_scaling(f).double(), f.A.double()
        norms.append(math.sqrt(max(float(torch.sum((B.T @ B) * (A @ A.T))), 0.0)))
    total = sum(norms)
    return [n / total for n in norms] if total > 0 else [1.0 / len(factors)] * len(factors)


def sparsity_weighted(updates: Sequence[ClientUpdate]) -> Adapter:
    """Per module, the sparsity-weighted means of the zero-padded B (scaling folded in) and A."""
    modules = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        r, p = max(f.rank for f in factors), sparsity_weights(factors)
        B = sum(w * zero_pad(fold_scaling(f), r, dim=1) for f, w in zip(factors, p))
        A = sum(w * zero_pad(f.A, r, dim=0) for f, w in zip(factors, p))
        modules[name] = ModuleAggregate(A=A, B=B)
    return modules


def tail_score(adapter: dict, start: int) -> float:
    """Σ over modules of ||B[:, start:]||_F ||A[start:]||_F: how much the components from ``start`` on carry."""
    score = 0.0
    for m in adapter.values():
        B = m.B * m.scaling if isinstance(m, LoraFactors) else m.B
        score += float(B[:, start:].norm()) * float(m.A[start:].norm())
    return score


def truncated(update: ClientUpdate, rank: int) -> ClientUpdate:
    """The update's leading ``rank`` components, as a pruning client sends them."""
    modules = {n: LoraFactors(f.A[:rank], f.B[:, :rank], f.scaling) for n, f in update.modules.items()}
    return ClientUpdate(modules, update.num_examples, update.client_id)


class HetLoRA(Method):
    name = "hetlora"
    display = "HetLoRA"
    order = 8
    summary = "Zero-pads ranks, averages A and B by each update's norm, cuts the result to each client's rank."
    scheme = "reinit"  # each client starts from the global pair cut to its rank
    style = Style(marker="d", colour="#7f7f7f")
    paper = "Cho, Liu, Xu, Fahrezi, Joshi, EMNLP 2024 (arXiv 2401.06432)"
    uses_context = True
    options = (
        Option("prune", 0.0, "rank self-pruning's decay γ in [0, 1) (0: no pruning); the rank drops to ⌊γ r⌋", low=0),
        Option("min_rank", 1, "the least rank pruning leaves a client", low=1),
    )

    def upload_cut_problem(self, rounds: int) -> str:
        return "its rank self-pruning reads each client's rank from what it sends, which a cut would change"

    def check(self, ranks, module_shapes) -> str:
        return f"option prune {self.prune} must be below 1 (method.hetlora.prune)" if self.prune >= 1 else ""

    def client_rank(self, rank, history, client) -> int:
        """Its run rank, or the smallest rank pruning left it: ranks only go down, also over rounds it sat out (where
        it was sent nothing, and its slot holds the global adapter)."""
        return min([rank, *history.ranks_sent(client)])

    def aggregate(self, updates, weights, value=None, context: RoundContext | None = None) -> AggregationResult:
        received = context.received if context is not None else [None] * len(updates)
        sent = [self.pruned(u, r) for u, r in zip(updates, received)]
        modules = sparsity_weighted(sent)
        ranks = [max(f.rank for f in u.modules.values()) for u in sent]
        per_client = [{n: ModuleAggregate(A=m.A[:r], B=m.B[:, :r]) for n, m in modules.items()} for r in ranks]
        return AggregationResult(self.name, modules, per_client=per_client, weights=list(weights), sent_ranks=ranks)

    def pruned(self, update: ClientUpdate, received: Adapter | None) -> ClientUpdate:
        """The update as a self-pruning client sends it: cut to max(min_rank, ⌊γ r⌋) when its tail there scores
        below the tail it received (never in round 1: a fresh B is zero, so nothing received scores above zero)."""
        rank = max(f.rank for f in update.modules.values())
        keep = max(self.min_rank, math.floor(self.prune * rank))
        if not self.prune or received is None or keep >= rank:
            return update
        if tail_score(update.modules, keep) < tail_score(received, keep):
            return truncated(update, keep)
        return update
