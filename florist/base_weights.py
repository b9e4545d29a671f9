"""One base model in memory for every client and every method: adapted weights are set, not copied.

The pristine weights of the adapted modules are kept once; ``set_deltas`` writes
W = W0 + sum of low-rank updates into the model in place, from the pristine copy, so
switching between methods, clients and rounds never accumulates round-off and never needs
a second model. Only the adapted modules are copied (q_proj and v_proj: a few percent of the model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .aggregation import ModuleAggregate

Delta = dict[str, ModuleAggregate]  # module name -> (B, A) with scaling folded: the update is B @ A


def adapted_module_names(model: nn.Module, target_modules: Sequence[str]) -> list[str]:
    """Names of the Linear layers whose leaf name is a target (as PEFT matches ``target_modules`` lists)."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in set(target_modules)
    ]
    if not names:
        raise ValueError(f"the model has no Linear layer named any of {list(target_modules)}")
    return names


class BaseWeights:
    """The pristine weights of the adapted modules, and the means to set W0 + deltas in place."""

    def __init__(self, model: nn.Module, module_names: Iterable[str]):
        self.model = model
        self.pristine = {name: model.get_submodule(name).weight.detach().clone() for name in module_names}

    @property
    def module_names(self) -> list[str]:
        return list(self.pristine)

    @torch.no_grad()
    def set_deltas(self, deltas: Sequence[Delta] = ()) -> None:
        """W = W0 + sum over ``deltas`` of B @ A, for every adapted module (W0 where no delta names it)."""
        for name, w0 in self.pristine.items():
            weight = self.model.get_submodule(name).weight
            total = w0.clone()
            for delta in deltas:
                if name in delta:
                    m = delta[name]
                    total += (m.B.to(w0.device, torch.float32) @ m.A.to(w0.device, torch.float32)).to(w0.dtype)
            weight.copy_(total)

    def restore(self) -> None:
        self.set_deltas(())
