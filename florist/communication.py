"""What each method puts on the wire in one round: parameters and bytes, up and down, and the paper's Eff.

Counted from the tensors that actually travel, as the method declares them: a client uploads the factors of its
round's ``ClientMode.uploads`` (A is r × n, B m × r, a core R r × r); the server sends each client the factors of
``Method.downloads`` of the adapter ``result.for_client(k)``.

The paper's "Eff" is 1 / sum over modules of the rank sent down. It ignores matrix sizes and the
upload; a one-factor download (FFA-LoRA's B) counts half a rank, which is how the paper arrives at
twice FedIT's figure. It is reported beside the parameter and byte counts, never instead of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from .aggregation import AggregationResult, ClientUpdate, LoraFactors, ModuleAggregate
from .methods import Method


@dataclass(frozen=True)
class RoundCommunication:
    method: str
    upload_params: list[int]  # per client
    download_params: list[int]  # per client
    bytes_per_param: int
    down_rank: float  # sum over modules of the rank sent down (mean over clients when it differs)

    @property
    def upload_bytes(self) -> list[int]:
        return [p * self.bytes_per_param for p in self.upload_params]

    @property
    def download_bytes(self) -> list[int]:
        return [p * self.bytes_per_param for p in self.download_params]

    @property
    def total_upload_params(self) -> int:
        return sum(self.upload_params)

    @property
    def total_download_params(self) -> int:
        return sum(self.download_params)

    @property
    def eff(self) -> float:
        """The paper's communication efficiency, 1 / sum(rank sent down); tables show it x 10^4."""
        return 1.0 / self.down_rank if self.down_rank else float("inf")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            upload_bytes=self.upload_bytes,
            download_bytes=self.download_bytes,
            total_upload_params=self.total_upload_params,
            total_download_params=self.total_download_params,
            total_upload_bytes=sum(self.upload_bytes),
            total_download_bytes=sum(self.download_bytes),
            eff=self.eff,
            eff_e4=self.eff * 1e4,
        )
        return d


def factor_params(factors: frozenset[str], pair: LoraFactors | ModuleAggregate) -> int:
    """How many numbers the named factors of one module's pair are: A r × n, B m × r, a core R r × r."""
    sizes = {"A": pair.A.numel(), "B": pair.B.numel(), "R": pair.rank**2}
    return sum(sizes[f] for f in factors)


def round_communication(
    method: Method,
    round_number: int,
    updates: Sequence[ClientUpdate],
    result: AggregationResult,
    bytes_per_param: int = 4,
) -> RoundCommunication:
    """Traffic of one round; ``bytes_per_param`` is the wire dtype's size (float32 by default)."""
    up, down = method.mode(round_number).uploads, method.downloads(round_number)
    upload = [sum(factor_params(up, f) for f in u.modules.values()) for u in updates]
    download, ranks = [], []
    for k in range(len(updates)):
        adapter = result.for_client(k)
        download.append(sum(factor_params(down, m) for m in adapter.values()))
        ranks.append(sum(m.rank for m in adapter.values()))
    rank_units = 1.0 if {"A", "B"} <= down else 0.5  # the paper counts a one-factor download as half a rank
    return RoundCommunication(
        method=method.name,
        upload_params=upload,
        download_params=download,
        bytes_per_param=bytes_per_param,
        down_rank=rank_units * sum(ranks) / len(ranks),
    )
