"""A branch's finished rounds: the newest result in memory, the older ones read back from the run directory.

What the next round needs of the past is the newest global result (a re-init start, FlexLoRA's per-client adapters,
a method's context) and, for the clients' bases under the merge scheme, every past update. Those updates are on disk
once their round is saved, and a client holds the ones it was sent (``florist.jobs.BaseDelta``), so the server keeps
only the newest result and a few numbers a round (the ranks each client was sent, whether a residual came with it);
its memory does not grow with the rounds. A history without a ``load`` (a loop run without a run directory, as in
tests) keeps every result in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from .aggregation import Adapter, AggregationResult

GLOBAL, RESIDUAL = "global", "residual"


def client_part(client: int) -> str:
    return f"client_{client}"


@dataclass(frozen=True)
class RoundSummary:
    """What stays in memory of a past round: whether clients got their own adapters, whether a residual went into
    the base, the rank each client was sent (its adapter's largest module rank; one entry when all got one), the
    clients whose updates it aggregated (they were sent its result at once) and the numbers each saved part puts
    on the wire (``GLOBAL``, ``RESIDUAL``, ``client_part(k)``), for what a client that sat out fetches later."""

    per_client: bool
    residual: bool
    ranks: tuple[int, ...]
    participants: frozenset[int] = frozenset()
    part_params: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls, result: AggregationResult, participants: Collection[int] = (), part_params: Mapping[str, int] = {}
    ) -> RoundSummary:
        adapters = result.per_client if result.per_client is not None else [result.modules]
        ranks = tuple(max((m.rank for m in a.values()), default=0) for a in adapters)
        per_client, residual = result.per_client is not None, result.residual is not None
        return cls(per_client, residual, ranks, frozenset(participants), dict(part_params))

    def rank_sent(self, client: int) -> int:
        return self.ranks[client] if self.per_client else self.ranks[0]


class History:
    """A branch's global results, round 1 first. ``load(round, part)`` reads a saved round's adapter back (part:
    ``GLOBAL``, ``RESIDUAL`` or ``client_part(k)``); once set, ``settle`` drops every result but the newest."""

    def __init__(self, load: Callable[[int, str], Adapter] | None = None):
        self.load = load
        self._results: dict[int, AggregationResult] = {}
        self._summaries: list[RoundSummary] = []

    def __len__(self) -> int:
        return len(self._summaries)

    def __bool__(self) -> bool:
        return bool(self._summaries)

    def append(
        self, result: AggregationResult, participants: Collection[int] = (), part_params: Mapping[str, int] = {}
    ) -> None:
        """Add the next round's result, the clients it aggregated and its parts' sizes on the wire."""
        self._summaries.append(RoundSummary.of(result, participants, part_params))
        self._results[len(self._summaries)] = result

    def truncate(self, rounds: int) -> None:
        """Forget every round after ``rounds`` (a round that failed before it was kept)."""
        del self._summaries[rounds:]
        self._results = {r: x for r, x in self._results.items() if r <= rounds}

    def settle(self) -> None:
        """The rounds are on disk: keep only the newest result in memory."""
        if self.load is not None:
            self._results = {r: x for r, x in self._results.items() if r == len(self)}

    @property
    def last(self) -> AggregationResult:
        return self._results[len(self)]

    def summary(self, round_number: int) -> RoundSummary:
        return self._summaries[round_number - 1]

    def rounds_in_memory(self) -> list[int]:
        return sorted(self._results)

    def ranks_sent(self, client: int) -> list[int]:
        """The rank client ``client`` was sent each round (the global adapter's in rounds it sat out)."""
        return [s.rank_sent(client) for s in self._summaries]

    def part_for(self, round_number: int, client: int) -> str:
        """Which saved adapter of a round is client ``client``'s: its own, or the global one."""
        return client_part(client) if self.summary(round_number).per_client else GLOBAL

    def adapter(self, round_number: int, part: str) -> Adapter:
        """A round's global adapter, residual or one client's adapter: from memory, else from the run directory."""
        result = self._results.get(round_number)
        if result is None:
            if self.load is None:
                raise KeyError(f"round {round_number} is neither in memory nor on disk")
            return self.load(round_number, part)
        if part == RESIDUAL:
            return result.residual
        if part == GLOBAL:
            return result.modules
        return result.for_client(int(part.removeprefix("client_")))
