"""One base model in memory for every client and every method: adapted weights are set, not copied.

The pristine weights of the adapted modules are kept once; ``set_deltas`` writes
W = W0 + sum of low-rank updates into the model in place, from the pristine copy, so
switching between methods, clients and rounds never accumulates round-off and never needs
a second model. Only the adapted modules are copied (q_proj and v_proj: a few percent of the model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .aggregation import Adapter
from .config import ConfigError

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear layer but the output head


def targets(target_modules: str | Sequence[str], name: str) -> bool:
    """Whether ``target_modules`` names the module of full name ``name``, as PEFT decides it: a string is a regex
    that must match the whole name; a list holds full names and dotted tails ("v_proj", "self_attn.v_proj")."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def adapted_module_names(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """The full names of the modules LoRA adapts under ``target_modules`` (``lora.target_modules``), as PEFT picks
    them, in the model's order. Every one must be a Linear layer, the only kind florist adapts, and there must be one.

    ``model`` may be an empty model (``models.empty_model``): only its module names and types are read.
    """
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [name for name in linear if model.get_submodule(name) is not head]
    else:
        matched = [(name, module) for name, module in model.named_modules() if name and targets(target_modules, name)]
        for name, module in matched:
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"config key 'lora.target_modules' {target_modules!r} matches {name} of type "
                    f"{type(module).__name__}; only Linear layers can be adapted"
                )
        names = [name for name, _ in matched]
    if not names:
        leaves = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in linear}))
        form = (
            f"a string is a regex for whole names such as {linear[0] if linear else '-'}; a list names modules"
            if isinstance(target_modules, str)
            else "a list names modules by full name or dotted tail"
        )
        raise ConfigError(
            f"config key 'lora.target_modules' {target_modules!r} matches no module of the model "
            f"({form}); its Linear layers are named {leaves}"
        )
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
    def set_deltas(self, deltas: Sequence[Adapter] = ()) -> None:
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

    @contextmanager
    def holding(self, deltas: Sequence[Adapter]) -> Iterator[None]:
        """W0 + ``deltas`` in the model for the ``with`` block, and W0 again after it, however the block ends."""
        self.set_deltas(deltas)
        try:
            yield
        finally:
            self.restore()
