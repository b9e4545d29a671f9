"""What a federated LoRA method declares: who it is, what its clients train and send, how the server combines.

A method is one ``Method`` subclass in one file (see ``florist/methods/flora.py``, the smallest). Everything
else in florist (the round loop, the engines, the accounting, the results table, the report and its plots,
``florist demo``, ``florist aggregate`` and ``florist methods``) reads these declarations and names no method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..aggregation import AggregationResult, ClientUpdate
from ..jobs import BOTH_FACTORS, ClientMode


def format_value(value: float) -> str:
    """A parameter value as labels and tables write it: its shortest exact decimal form, with at least 2 decimals.

    0.9 -> "0.90", 0.901 -> "0.901", 1e-05 -> "0.00001": two different values never read alike, and the values of a
    2-decimal grid keep the names earlier runs saved them under.
    """
    whole, _, decimals = format(Decimal(repr(float(value))), "f").partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def branch_label(method: str, value: float | None = None) -> str:
    """A branch's name in the run directory and the results: its method, with its swept value ("florist@0.90")."""
    return method if value is None else f"{method}@{format_value(value)}"


@dataclass(frozen=True)
class Style:
    """How the report draws a method: a matplotlib marker and colour (a colour map for a swept method)."""

    marker: str = "o"
    colour: str = "#7f7f7f"
    colour_map: str = "viridis"


@dataclass(frozen=True)
class Sweep:
    """A parameter the method is run at several values of, one branch per value (FLoRIST's τ).

    ``config_key``: the config key holding the values, a spec ``parse`` reads into (values, "") or ([], what is
    wrong with it);
    ``option``: the command-line option that gives one value to ``florist aggregate``, with its ``default``.
    """

    name: str  # as tables head its column: "τ"
    config_key: str
    parse: Callable[[str], tuple[list[float], str]]
    option: str
    default: float
    help: str


class Method:
    """A federated LoRA method. Subclasses set the class attributes and implement ``aggregate``.

    ``name`` is its key (``federation.methods``, ``--method``, the branch directory); ``display`` the name tables
    show; ``order`` its place among the methods in tables; ``summary`` the line ``florist methods`` prints;
    ``exact`` whether the global update equals the clients' weighted sum of updates.
    """

    name: str = ""
    display: str = ""
    order: int = 100
    summary: str = ""
    exact: bool = False
    style: Style = Style()
    sweep: Sweep | None = None

    def mode(self, round_number: int) -> ClientMode:
        """What each client trains, holds shared and keeps in ``round_number`` (1-based); both factors by default."""
        return BOTH_FACTORS

    def downloads(self, round_number: int) -> frozenset[str]:
        """The factors the server sends each client after the round: by default what the clients uploaded."""
        return self.mode(round_number).uploads

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value: float | None = None):
        """The server step, on validated updates (cast to the compute dtype) and weights summing to 1.

        ``value``: the swept parameter's value (None for a method without one). Returns an ``AggregationResult``;
        raise ``AggregationError`` for input the method cannot combine.
        """
        raise NotImplementedError

    def aggregate_sweep(
        self, updates: Sequence[ClientUpdate], weights: Sequence[float], values: Sequence[float | None]
    ) -> dict[float | None, AggregationResult]:
        """The result at every value; a method whose values share work (one SVD for every τ) overrides this."""
        return {v: self.aggregate(updates, weights, v) for v in values}

    def values(self, config: Any) -> list[float | None]:
        """The swept values a run asks for (``sweep.config_key`` of the run's config), or [None]."""
        if self.sweep is None:
            return [None]
        spec = config
        for part in self.sweep.config_key.split("."):
            spec = getattr(spec, part)
        values, problem = self.sweep.parse(spec)
        if problem:
            raise ValueError(f"config key {self.sweep.config_key!r} {problem}; got {spec!r:.60}")
        return values

    def label(self, value: float | None = None) -> str:
        return branch_label(self.name, value)

    def picks(self, rows: Sequence[Any], config: Any) -> list[tuple[str, Any]]:
        """Rows the results table names besides the method's own (FLoRIST-O/E among its τ), as (label, row)."""
        return []

    def describe_picks(self, config: Any) -> str:
        """How the report's text names the picks ("FLoRIST-O (best τ) and ..."); "" for a method without picks."""
        return ""

    def describe(self) -> str:
        """One line: the key, the name, what clients do in round 1 and whether the result is exact."""
        swept = f", swept over {self.sweep.name}" if self.sweep else ""
        exact = "exact" if self.exact else "inexact"
        return f"{self.name:<10} {self.display:<10} {exact:<8} {self.mode(1).describe()}{swept}. {self.summary}"
