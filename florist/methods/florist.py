"""FLoRIST: the exact stacked update's SVD from its factors, then singular value thresholding at energy τ.

Clients train both factors. The server keeps, per module, the fewest components whose energy reaches τ and sends
that one pair to every client; τ = 1 is the exact update. A run sweeps τ from one decomposition per module, and the
results name two of its τ: FLoRIST-O (best quality) and FLoRIST-E (least download within a tolerance of it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..aggregation import AggregationResult, ClientUpdate
from ..aggregation.florist import thresholded
from .base import MAX_TAUS, Method, Style, Sweep, parse_taus

__all__ = ["FLoRIST", "MAX_TAUS", "parse_taus", "pick_best_and_efficient"]


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
