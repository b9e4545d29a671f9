"""FLoRIST: the exact stacked update's SVD from its factors, then singular value thresholding at energy τ.

Clients train both factors. The server keeps, per module, the fewest components whose energy reaches τ and sends
that one pair to every client; τ = 1 is the exact update. A run sweeps τ from one decomposition per module, and the
results name two of its τ: FLoRIST-O (best quality) and FLoRIST-E (least download within a tolerance of it).
"""

from __future__ import annotations

import decimal
import math
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from ..aggregation import AggregationResult, ClientUpdate
from ..aggregation.florist import thresholded
from .base import Method, Style, Sweep, format_value

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


class FLoRIST(Method):
    name = "florist"
    display = "FLoRIST"
    order = 10  # after the baselines
    summary = "Stacked SVD of the exact update, thresholded at energy τ: one small pair for every client."
    exact = False  # exact at τ = 1
    style = Style(marker="o", colour="#d62728", colour_map="viridis")
    sweep = Sweep(
        name="τ",
        config_key="federation.thresholds",
        parse=parse_taus,
        option="--threshold",
        default=0.9,
        help="FLoRIST's energy threshold τ in (0, 1]",
    )
    tolerance_key = "florist_e_tolerance"  # of the run's federation config: FLoRIST-E's accuracy tolerance

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float], value: float | None = None):
        return self.aggregate_sweep(updates, weights, [value])[value]

    def aggregate_sweep(self, updates, weights, values) -> dict[float | None, AggregationResult]:
        taus = [self.sweep.default if v is None else v for v in values]
        adapters = thresholded(updates, weights, taus)
        return {v: AggregationResult(self.name, adapters[t], weights=list(weights)) for v, t in zip(values, taus)}

    def picks(self, rows: Sequence[Any], config: Any) -> list[tuple[str, Any]]:
        best, efficient = pick_best_and_efficient([r for r in rows if r.method == self.name], self.tolerance(config))
        return [(label, r) for label, r in (("FLoRIST-O", best), ("FLoRIST-E", efficient)) if r is not None]

    def describe_picks(self, config: Any) -> str:
        return f"FLoRIST-O (best τ) and FLoRIST-E (least download within {self.tolerance(config):g} of the best)"

    def tolerance(self, config: Any) -> float:
        """FLoRIST-E's accuracy tolerance from a run's config (or its federation section)."""
        return getattr(getattr(config, "federation", config), self.tolerance_key, 0.01)


def pick_best_and_efficient(rows: Sequence[Any], tolerance: float) -> tuple[Any, Any]:
    """FLoRIST-O: the τ with the best accuracy; ties go to the lower held-out loss, then to less download.
    FLoRIST-E: the least download among taus within ``tolerance`` (absolute accuracy) of that best.

    Without accuracy (no questions were asked) both are picked on held-out loss instead, lower being better.
    """
    if rows and all(r.accuracy is not None for r in rows):
        score = lambda r: r.accuracy  # noqa: E731
    elif rows and all(r.heldout_loss is not None for r in rows):
        score = lambda r: -r.heldout_loss  # noqa: E731
    else:
        return None, None
    # On a small question set many taus tie on accuracy; the loss separates them.
    loss = lambda r: -r.heldout_loss if r.heldout_loss is not None else 0.0  # noqa: E731
    best = max(rows, key=lambda r: (score(r), loss(r), r.eff_e4))
    efficient = max((r for r in rows if score(r) >= score(best) - tolerance), key=lambda r: (r.eff_e4, score(r)))
    return best, efficient
