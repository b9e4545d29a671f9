"""FLoRA's rule: the whole stack. Exact, but its rank is the sum of the clients' ranks."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Adapter, ClientUpdate, ModuleAggregate
from .stacking import stack


def stacked_update(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> Adapter:
    """Per module, the stacked pair: its product is the exact weighted sum of the clients' updates."""
    modules = {}
    for name in updates[0].modules:
        B_st, A_st = stack([u.modules[name] for u in updates], weights)
        modules[name] = ModuleAggregate(A=A_st, B=B_st)
    return modules
