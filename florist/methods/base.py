"""What a federated LoRA method declares: who it is, what its clients train and send, how the server combines.

A method is one ``Method`` subclass in one file (see ``florist/methods/flora.py``, the smallest). Everything
else in florist (the round loop, the engines, the accounting, the results table, the report and its plots,
``florist demo``, ``florist aggregate`` and ``florist methods``) reads these declarations and names no method.
"""

from __future__ import annotations

import copy as _copy
import decimal
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..aggregation import AggregationResult, ClientUpdate
from ..history import History
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


MAX_TAUS = 1000  # a branch per τ, each scored every round: more is a mistyped step, not a sweep
FORM = "must be T, T1,T2,... or start:stop:step"


def parse_taus(spec: str) -> tuple[list[float], str]:
    """'0.9', '0.8,0.9,1.0' or 'start:stop:step' (inclusive, stepped in exact decimals), sorted, and "" ; or [] and
    what is wrong with the spec. At most ``MAX_TAUS`` taus, each in (0, 1], none given twice."""
    try:
        if ":" in spec:
            start, stop, step = (Decimal(x.strip()) for x in spec.split(":"))
            if not all(d.is_finite() for d in (start, stop, step)):
                return [], "must hold finite numbers"
            if step <= 0:
                return [], "must have a positive step"
            if start > stop:
                return [], "is an empty range: start is above stop"
            span = (stop - start) / step
            if span >= MAX_TAUS:
                return [], f"is a range of more than {MAX_TAUS} taus"
            taus = [float(start + i * step) for i in range(int(span) + 1)]
        else:
            taus = [float(x) for x in spec.split(",") if x.strip()]
    except (ValueError, decimal.DecimalException):
        return [], FORM
    if not taus:
        return [], FORM
    if len(taus) > MAX_TAUS:
        return [], f"lists more than {MAX_TAUS} taus"
    if not all(math.isfinite(t) and 0.0 < t <= 1.0 for t in taus):
        return [], "must hold taus in (0, 1]"
    twice = [t for t, n in Counter(taus).items() if n > 1]
    if twice:
        return [], f"gives tau {format_value(twice[0])} twice"
    return sorted(taus), ""


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


@dataclass(frozen=True)
class Option:
    """A setting of one method, read from the run's ``[method.<name>]`` table (``method.fedex.residual="factors"``).

    ``default`` fixes its type (bool, int, float or str); ``choices`` lists the values a string may take, ``low`` is
    the least a number may be. The method reads it as the attribute of the option's name.
    """

    name: str
    default: bool | int | float | str
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None

    def problem(self, value: Any) -> str:
        """What is wrong with ``value`` for this option, or ""."""
        kind = type(self.default)
        fits = isinstance(value, bool) == (kind is bool) and isinstance(value, (int, float) if kind is float else kind)
        if not fits:
            return f"must be {'true or false' if kind is bool else 'a number' if kind is float else kind.__name__}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if self.low is not None and value < self.low:
            return f"must be at least {self.low:g}"
        return ""


@dataclass(frozen=True)
class RoundContext:
    """What a server rule that reads more than the uploads gets (``Method.uses_context``): the round, and per update
    the adapter its client started the round from (None: a fresh LoRA)."""

    round_number: int
    received: Sequence[Any]  # per update, an Adapter or None


class Method:
    """A federated LoRA method. Subclasses set the class attributes and implement ``aggregate``.

    ``name`` is its key (``federation.methods``, ``--method``, the branch directory); ``display`` the name tables
    show; ``order`` its place among the methods in tables; ``summary`` the line ``florist methods`` prints;
    ``exact`` whether the global update equals the clients' weighted sum of updates; ``scheme`` how its next round
    starts where its paper fixes it ("reinit": from the global adapter; "merge": the global update merged into the
    base, a fresh LoRA), None where the run's ``federation.scheme`` chooses; ``options`` its settings.
    """

    name: str = ""
    display: str = ""
    order: int = 100
    summary: str = ""
    exact: bool = False
    style: Style = Style()
    sweep: Sweep | None = None
    scheme: str | None = None
    options: tuple[Option, ...] = ()
    paper: str = ""  # the paper that states the rule, as the methods page cites it
    uses_context: bool = False  # aggregate takes context=RoundContext (the round, what each client started from)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for option in cls.__dict__.get("options", ()):  # an option's default is the attribute the method reads
            setattr(cls, option.name, option.default)

    def configured(self, values: Mapping[str, Any]) -> Method:
        """A copy of this method with ``values`` for its options (the rest at their defaults); ``ValueError`` naming
        the option for one it does not have or a value it cannot take."""
        known = {o.name: o for o in self.options}
        copy = _copy.copy(self)
        for key, value in values.items():
            if key not in known:
                have = ", ".join(known) or "none"
                raise ValueError(f"{self.name} has no option {key!r}; its options: {have}")
            problem = known[key].problem(value)
            if problem:
                raise ValueError(f"option {key!r} of {self.name} {problem}; got {value!r:.60}")
            setattr(copy, key, value)
        return copy

    def check(self, ranks: Sequence[int], module_shapes: Mapping[str, tuple[int, int]]) -> str:
        """What in a run this method cannot do (the clients' ``ranks``, the adapted modules' (m, n)), or "": a run
        that asks for it is refused before training."""
        return ""

    def upload_cut_problem(self, rounds: int) -> str:
        """Why this method's clients cannot cut their uploads to a share of their energy
        (``federation.upload_thresholds``), or "": a cut re-factors a client's update, so its clients must upload
        both factors of a plain pair (no core, nothing kept) in every round."""
        for t in range(1, rounds + 1):
            mode = self.mode(t)
            if mode.uploads != {"A", "B"} or mode.core or mode.shared or self.gradient_examples(t):
                return f"its clients upload {mode.describe().rpartition('uploads ')[2]} in round {t}, not a whole pair"
        return ""

    def client_rank(self, rank: int, history: History, client: int) -> int:
        """The rank client ``client`` trains at next, given the run's ``rank`` for it and the branch's past rounds
        (``History.ranks_sent``: the rank it was sent each round)."""
        return rank

    def shared_round(self, round_number: int) -> int:
        """Which round's draw of the shared frozen factors round ``round_number`` uses: its own (a new draw each
        round), or 1 for one draw the whole run holds."""
        return round_number

    def gradient_examples(self, round_number: int) -> int:
        """Above 0: round ``round_number``'s shared factors come from the first full-gradient step (``shared_start``),
        for which each client first sums the gradient of the base weights over that many of its examples."""
        return 0

    def shared_start(self, gradient: Mapping[str, Any], rank: int, lr: float) -> dict[str, dict[str, Any]]:
        """The shared factors (and a core's start ``R``, scaling folded in) at ``rank``, per module, from the clients'
        summed base-weight ``gradient`` and the learning rate ``lr`` of the first step; for ``gradient_examples``."""
        raise NotImplementedError

    def mode(self, round_number: int) -> ClientMode:
        """What each client trains, holds shared and keeps in ``round_number`` (1-based); both factors by default."""
        return BOTH_FACTORS

    def engine_problem(self, engine: str) -> str:
        """Why this method cannot run on ``engine`` ("inprocess" or "flower"), or "": a run that asks for it there is
        refused before the run directory is touched."""
        return ""

    def exchange_traffic(self, updates: Sequence[ClientUpdate]) -> tuple[list[int], list[int]] | None:
        """Per client (in the updates' order), the numbers up and down of a protocol that takes the place of the plain
        upload of ``mode(...).uploads`` (private FLoRIST's two secure exchanges), the download of the result not
        included; None: the clients upload their factors."""
        return None

    def downloads(self, round_number: int) -> frozenset[str]:
        """The factors the server sends each client after the round: by default what the clients uploaded."""
        return self.mode(round_number).uploads

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value: float | None = None):
        """The server step, on validated updates (cast to the compute dtype) and weights summing to 1.

        ``value``: the swept parameter's value (None for a method without one). A method with ``uses_context`` also
        takes ``context``, a ``RoundContext``, or None where there is no run (``florist aggregate``). Returns an
        ``AggregationResult``; raise ``AggregationError`` for input the method cannot combine.
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
