"""Reports people read: a run directory's results as markdown and plots.

    report.md                      setup, results table (paper layout), summary, plots; one section per run
    plots/<run>-tradeoff.png       accuracy / held-out loss against download, Pareto front, the picks ringed
    plots/<run>-ranks.png          the rank each swept method kept per layer and module, at every value
    plots/<run>-spectra.png        singular values of a few modules, with a swept method's cut-offs
    plots/<run>-rounds.png         accuracy / held-out loss per round (runs with several rounds)

Everything is read from what a run wrote (config.toml, metrics.jsonl, rounds/NNN/<branch>/spectra.json,
rounds/NNN/clients/<group>/client_K/client.json); nothing is recomputed from adapters. What the report knows of a
method (its name, order, style, sweep and picks) it reads from the method's declaration in ``florist.methods``.

``runs`` reads and checks a run directory, ``plots`` draws the figures, ``markdown`` writes the text and
``writing`` puts it all on disk.
"""

from __future__ import annotations

from .markdown import combined_table, describe_setup, run_section, summarize
from .plots import (
    PLOTS,
    cut_values,
    pareto_front,
    plot_ranks,
    plot_rounds,
    plot_spectra,
    plot_tradeoff,
    round_series,
    spectra_modules,
    split_module,
)
from .runs import ReportError, Run, check_record, load_run, load_spectra
from .writing import Report, build_report, check_targets, write_report

__all__ = [
    "PLOTS",
    "Report",
    "ReportError",
    "Run",
    "build_report",
    "check_record",
    "check_targets",
    "combined_table",
    "cut_values",
    "describe_setup",
    "load_run",
    "load_spectra",
    "pareto_front",
    "plot_ranks",
    "plot_rounds",
    "plot_spectra",
    "plot_tradeoff",
    "round_series",
    "run_section",
    "spectra_modules",
    "split_module",
    "summarize",
    "write_report",
]
