"""FFA-LoRA's rule: A is frozen at one shared draw on every client; only B trains, and averaging B is exact.

With A shared, sum_k w_k s_k B_k A = (sum_k w_k s_k B_k) A. With heterogeneous ranks each client's A must be the
leading rows of the shared A (the largest client's); B is zero-padded to match.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Adapter, AggregationError, ClientUpdate, LoraFactors, ModuleAggregate, fold_scaling, zero_pad


def average_b(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Adapter:
    """Per module, the shared A and the weighted mean of the clients' B (scaling folded in)."""
    modules = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        shared_A = most_common_a(factors)
        check_shared_a(updates, name, shared_A)
        r = shared_A.shape[0]
        B = sum(w * zero_pad(fold_scaling(f), r, dim=1) for f, w in zip(factors, weights))
        modules[name] = ModuleAggregate(A=shared_A, B=B)
    return modules


def most_common_a(factors: Sequence[LoraFactors]) -> torch.Tensor:
    """The A that most clients of the largest rank hold (the first one's among equally common): one client whose
    A differs is then the one named, wherever it stands."""
    rank = max(f.rank for f in factors)
    distinct: list[list] = []  # [A, how many hold it], in first-seen order
    for f in factors:
        if f.rank == rank:
            held = next((d for d in distinct if torch.equal(d[0], f.A)), None)
            if held is None:
                distinct.append([f.A, 1])
            else:
                held[1] += 1
    return max(distinct, key=lambda d: d[1])[0]  # max keeps the first of equal counts


def check_shared_a(updates: Sequence[ClientUpdate], name: str, shared_A: torch.Tensor) -> None:
    """Every client's frozen A must be (the leading rows of) the shared one, or the average is not exact."""
    for k, u in enumerate(updates):
        A = u.modules[name].A
        if not torch.equal(A, shared_A[: A.shape[0]]):
            who = u.client_id or f"client {k}"
            raise AggregationError(f"{who}, module {name}: a shared frozen A is needed, but this client's A differs")
