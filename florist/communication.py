"""What each method puts on the wire in one round: parameters and bytes, up and down, and the paper's Eff.

Counted from the tensors that actually travel, as the method declares them: a client uploads the factors of its
round's ``ClientMode.uploads`` (A is r × n, B m × r, a core R r × r); the server sends each client the factors of
``Method.downloads`` of the adapter ``result.for_client(k)``, and a result's residual (FedEx-LoRA's): dense, m × n
numbers a module, or as its factors, r (m + n) at its rank r. A method whose clients take part in a protocol
instead of uploading their factors (private FLoRIST's two secure exchanges) declares that traffic
(``Method.exchange_traffic``): its shares up, and what the server sends between the exchanges down, beside the
result. A method whose shared factors start from the first full-gradient step (Fed-SB's LoRA-SB start) adds, in
that round, each client's dense m × n gradient up and the shared factors with the core's start down
(``with_start_traffic``). Shared factors drawn from a seed cost nothing: the seed would do.

The paper's "Eff" is 1 / sum over modules of the rank sent down. It ignores matrix sizes and the
upload; a one-factor download (FFA-LoRA's B) counts half a rank, which is how the paper arrives at
twice FedIT's figure. It is reported beside the parameter and byte counts, never instead of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from .aggregation import AggregationResult, ClientUpdate, LoraFactors, ModuleAggregate
from .history import GLOBAL, RESIDUAL, client_part
from .methods import Method


@dataclass(frozen=True)
class RoundCommunication:
    method: str
    upload_params: list[int]  # per client
    download_params: list[int]  # per client
    bytes_per_param: int
    down_rank: float  # sum over modules of the rank sent down (mean over clients when it differs)
    residual: str = ""  # how a residual merged into the base travels down: "dense", "factors", or "" (none)
    # of upload_params and download_params, what a first-step start took (Method.gradient_examples): each client's
    # dense gradient up, the shared factors and the core's start down; empty for other rounds and methods
    start_upload_params: list[int] = field(default_factory=list)
    start_download_params: list[int] = field(default_factory=list)
    # of download_params, the earlier rounds' results a client that sat them out fetches now (under client sampling;
    # under full participation every client was sent each result in its round): empty when there is none
    catchup_download_params: list[int] = field(default_factory=list)

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


def factor_params(factors: frozenset[str], pair: LoraFactors | ModuleAggregate, rank: int | None = None) -> int:
    """How many numbers the named factors of one module's pair are: A r × n, B m × r, a core R r × r; at ``rank``
    when the pair is sent cut to its leading components (None: its own rank)."""
    r = pair.rank if rank is None else min(rank, pair.rank)
    m, n = pair.B.shape[0], pair.A.shape[1]
    sizes = {"A": r * n, "B": m * r, "R": r**2}
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
    sent = result.sent_ranks or [None] * len(updates)
    upload = [sum(factor_params(up, f, r) for f in u.modules.values()) for u, r in zip(updates, sent)]
    exchanged = method.exchange_traffic(updates)  # a protocol's shares instead of the factors, and what it sends down
    protocol_down = [0] * len(updates)
    if exchanged is not None:
        upload, protocol_down = list(exchanged[0]), list(exchanged[1])
    rank_units = 1.0 if {"A", "B"} <= down else 0.5  # the paper counts a one-factor download as half a rank
    extra_params, extra_rank = residual_traffic(result)
    download, ranks = [], []
    for k in range(len(updates)):
        adapter = result.for_client(k)
        download.append(sum(factor_params(down, m) for m in adapter.values()) + extra_params + protocol_down[k])
        ranks.append(rank_units * sum(m.rank for m in adapter.values()) + extra_rank)
    return RoundCommunication(
        method=method.name,
        upload_params=upload,
        download_params=download,
        bytes_per_param=bytes_per_param,
        down_rank=sum(ranks) / len(ranks),
        residual="" if result.residual is None else "dense" if result.residual_dense else "factors",
    )


def with_start_traffic(comm: RoundCommunication, start: Sequence[tuple[int, int]]) -> RoundCommunication:
    """``comm`` with each client's first-step traffic added, (parameters up, parameters down) in reply order."""
    up, down = [u for u, _ in start], [d for _, d in start]
    return replace(
        comm,
        upload_params=[p + u for p, u in zip(comm.upload_params, up)],
        download_params=[p + d for p, d in zip(comm.download_params, down)],
        start_upload_params=up,
        start_download_params=down,
    )


def with_spectra(comm: RoundCommunication, values: Sequence[int]) -> RoundCommunication:
    """``comm`` with each client's spectra added to its upload: the singular values a cut upload carries beside its
    pair (``ClientStart.upload_threshold``), ``values`` of them per client in reply order."""
    return replace(comm, upload_params=[p + v for p, v in zip(comm.upload_params, values, strict=True)])


def with_catchup(comm: RoundCommunication, catchup: Sequence[int]) -> RoundCommunication:
    """``comm`` with each client's catch-up added to its download: the earlier rounds' results it was not sent when
    they were made, because it sat those rounds out (``part_params`` of each, in reply order)."""
    if not any(catchup):
        return comm
    return replace(
        comm,
        download_params=[p + c for p, c in zip(comm.download_params, catchup, strict=True)],
        catchup_download_params=list(catchup),
    )


def part_params(method: Method, round_number: int, result: AggregationResult) -> dict[str, int]:
    """The numbers each saved part of a round's result puts on the wire when a client is sent it, counted as
    ``round_communication`` counts them: the global adapter's (or each client's own) factors of
    ``Method.downloads``, and the residual's. ``result`` is keyed by client index (``by_client``)."""
    down = method.downloads(round_number)
    if result.per_client is None:
        adapters = {GLOBAL: result.modules}
    else:
        adapters = {client_part(k): a for k, a in enumerate(result.per_client)}
    parts = {part: sum(factor_params(down, m) for m in a.values()) for part, a in adapters.items()}
    if result.residual is not None:
        parts[RESIDUAL] = residual_traffic(result)[0]
    return parts


def residual_traffic(result: AggregationResult) -> tuple[int, int]:
    """What a result's residual adds to each client's download: its parameters, and its rank for the paper's Eff
    (a dense m × n module counts at full rank, min(m, n))."""
    if result.residual is None:
        return 0, 0
    modules = result.residual.values()
    if result.residual_dense:
        return sum(m.B.shape[0] * m.A.shape[1] for m in modules), sum(min(m.B.shape[0], m.A.shape[1]) for m in modules)
    return sum(m.A.numel() + m.B.numel() for m in modules), sum(m.rank for m in modules)
