"""The vocabulary of aggregation: what a client sends, what the server returns.

Conventions (PEFT's): an adapted weight W is m x n (out x in); a LoRA pair is
B (m x r) and A (r x n) with scaling s, and the update it stands for is s * B @ A.
Everything here is pure tensors: no models, no files, no engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


class AggregationError(ValueError):
    """An update that cannot be aggregated; the message names the client and the module."""


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA pair: the update is ``scaling * B @ A``."""

    A: Tensor  # r x n
    B: Tensor  # m x r
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n): the shape of the weight this pair adapts."""
        return self.B.shape[0], self.A.shape[1]

    def delta(self) -> Tensor:
        """The dense m x n update. For tests and small modules only: the point of FLoRIST is never to need it."""
        return self.scaling * (self.B @ self.A)


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends after local training: a LoRA pair per adapted module and its example count.

    ``trained_rank``: the rank the client trained at, where its pairs were cut below it (an upload cut to a share of
    its energy, ``florist.aggregation.truncation``); 0: the pairs' own ranks. A rule that sends each client an
    adapter at its rank (FlexLoRA) reads it."""

    modules: Mapping[str, LoraFactors]
    num_examples: int
    client_id: str = ""
    trained_rank: int = 0

    def rank_of(self, name: str) -> int:
        """The rank this client trains module ``name`` at: ``trained_rank``, or its pair's rank."""
        return self.trained_rank or self.modules[name].rank


@dataclass(frozen=True)
class ModuleAggregate:
    """One module of an aggregated adapter, scaling folded in: the update is ``B @ A``.

    ``singular_values`` holds the spectrum of the aggregated update where the method
    computed one (FLoRIST, FlexLoRA): all of it, not only the kept part, so reports can plot it.
    """

    A: Tensor
    B: Tensor
    singular_values: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> Tensor:
        return self.B @ self.A


Adapter = dict[str, ModuleAggregate]


@dataclass
class AggregationResult:
    """The server's output for one round.

    ``modules`` is the global adapter. ``per_client`` is set when clients receive
    different adapters (FlexLoRA's per-client truncations); otherwise every client gets ``modules``.
    ``residual`` is an update the server adds to every client's frozen base weights from the next round on, beside
    the adapter (FedEx-LoRA's exact-minus-averaged term); ``residual_dense`` says whether it travels as the dense
    m × n matrix of each module or as its factors (the accounting reads it, the model is the same either way).
    ``sent_ranks`` (per update, in their order) is the rank each client's upload counts at when the rule cut it
    (HetLoRA's self-pruning); None: as uploaded.
    """

    method: str
    modules: Adapter
    per_client: list[Adapter] | None = None
    weights: list[float] = field(default_factory=list)
    residual: Adapter | None = None
    residual_dense: bool = True
    sent_ranks: list[int] | None = None

    def for_client(self, k: int) -> Adapter:
        """The adapter client ``k`` receives."""
        return self.per_client[k] if self.per_client is not None else self.modules

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}


@contextmanager
def linalg_failures(method: str, module: str) -> Iterator[None]:
    """Turns a failed decomposition inside (torch's LinAlgError: an SVD that does not converge, a singular input)
    into an ``AggregationError`` naming the method and module, the error every aggregation caller handles."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise AggregationError(f"{method}, module {module}: the decomposition failed ({reason})") from None


def fold_scaling(f: LoraFactors) -> Tensor:
    """B with the pair's scaling folded in, so clients with different alpha/r combine correctly."""
    return f.B * f.scaling if f.scaling != 1.0 else f.B


def zero_pad(t: Tensor, rank: int, dim: int) -> Tensor:
    """Pad a factor with zeros along its rank dimension up to ``rank`` (shapes only: padded rows never learn)."""
    missing = rank - t.shape[dim]
    if missing == 0:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = missing
    return torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
