"""Progress of florist's long steps, on stderr: animated bars on a terminal, one plain line per finished step
anywhere else (a log file, a pipe, CI), nothing when progress is off.

    >>> with Steps() as steps:
    ...     step = steps.add("round 1 client 0 (r=16)", unit="steps")
    ...     for k in range(n):
    ...         step.update(completed=k + 1, total=n, figures=f"loss {loss:.3f}")
    ...     step.done()

A log file gets ``round 1 client 0 (r=16): 12/12 steps, loss 1.234, 8.1 s`` and never a carriage return. A step that
ends in an exception prints no line: whoever catches the exception tells what happened.

The libraries' own tqdm bars (datasets' ``map``, transformers' weight loading and hub downloads) are switched off
where florist draws its own, and off a terminal altogether (``library_bars``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column

T = TypeVar("T")


def stderr_console() -> Console:
    return Console(stderr=True)


def log_to_stderr(message: str) -> None:
    """A message on one line of stderr, dimmed; florist never wraps it, so a log file keeps it whole."""
    stderr_console().print(message, style="dim", markup=False, highlight=False, soft_wrap=True)


def animates(console: Console | None = None) -> bool:
    """Whether progress is drawn as redrawn bars: the console is a terminal that can move its cursor."""
    console = console or stderr_console()
    return console.is_terminal and not console.is_dumb_terminal


class Steps:
    """One or more long steps shown together: each a bar on a terminal, a line when it ends elsewhere.

    ``enabled=False`` shows nothing. ``transient``: the bars go when the display closes (they stay otherwise).
    ``remaining``: the bars also estimate the time left. ``lines=False``: a quick step that is shown on a terminal
    only, and prints no line elsewhere.
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        transient: bool = False,
        remaining: bool = False,
        lines: bool = True,
        console: Console | None = None,
    ):
        self.console = console or stderr_console()
        bars = enabled and animates(self.console)
        self.lines = enabled and lines and not bars
        self._bars = Progress(*_columns(remaining), console=self.console, transient=transient) if bars else None

    def __enter__(self) -> Steps:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._bars is not None:
            self._bars.stop()
        return False

    def add(self, description: str, total: int | None = None, unit: str = "") -> Step:
        """A new step, shown at once on a terminal; ``unit`` names what ``completed`` counts (steps, batches)."""
        task = None if self._bars is None else self._bars.add_task(description, total=total, figures="")
        return Step(self, description, total, unit, task)

    def _show(self, step: Step) -> None:
        if self._bars is not None and step.task is not None:
            self._bars.update(step.task, completed=step.completed, total=step.total, figures=step.figures)

    def _print_line(self, step: Step) -> None:
        if self.lines:
            self.console.print(step.line(), markup=False, highlight=False, soft_wrap=True)


def _columns(remaining: bool) -> list[ProgressColumn]:
    # The bar takes the width the text leaves (at most 40 columns), so that a line fits an 80-column terminal.
    columns: list[ProgressColumn] = [
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=None, table_column=Column(ratio=1, max_width=40)),
        MofNCompleteColumn(),
        TextColumn("{task.fields[figures]}", markup=False),
        TimeElapsedColumn(),
    ]
    return columns + [TimeRemainingColumn()] if remaining else columns


class Step:
    """One step of a ``Steps`` display: its count, its figures (``loss 1.234``) and when it began."""

    def __init__(self, steps: Steps, description: str, total: int | None, unit: str, task: TaskID | None):
        self.steps, self.description, self.total, self.unit, self.task = steps, description, total, unit, task
        self.completed, self.figures = 0, ""
        self.began = time.monotonic()

    def update(
        self, *, completed: int | None = None, total: int | None = None, advance: int = 0, figures: str | None = None
    ) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        self.completed += advance
        if figures is not None:
            self.figures = figures
        self.steps._show(self)

    def done(self, *, completed: int | None = None, figures: str | None = None) -> None:
        """The step finished (with its last count and figures, if given): off a terminal its one line is printed."""
        self.update(completed=completed, figures=figures)
        self.steps._print_line(self)

    def line(self) -> str:
        count = f"{self.completed}/{self.total}" if self.total is not None else str(self.completed)
        parts = [f"{count} {self.unit}".rstrip(), self.figures, f"{time.monotonic() - self.began:.1f} s"]
        return f"{self.description}: " + ", ".join(p for p in parts if p)


def track(
    items: Sequence[T],
    description: str,
    enabled: bool = True,
    *,
    unit: str = "",
    transient: bool = True,
    lines: bool = True,
) -> Iterator[T]:
    """The items, one at a time, as one step counted in ``unit``; its line is printed once every item is done
    (``lines=False``: a quick step, shown on a terminal only)."""
    with Steps(enabled, transient=transient, lines=lines) as steps:
        step = steps.add(description, total=len(items), unit=unit)
        for item in items:
            yield item
            step.update(advance=1)
        step.done()


class Counter:
    """``step.update(advance=n)`` as a plain callable, for a function ``datasets.Dataset.map`` runs in this process.

    datasets names a map's cache file after a hash of the function and its arguments; a counter hashes as the same
    constant whatever it counts, so that counting changes neither the cache's name nor its use. (The constant does
    not unpickle to a counter: a map with ``num_proc`` workers cannot be given one.)
    """

    def __init__(self, step: Step):
        self.step = step

    def __call__(self, n: int) -> None:
        self.step.update(advance=n)

    def __reduce__(self):
        return (_no_count, ())


def _no_count() -> None:
    return None


# --- the libraries' own bars -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def datasets_bars(enabled: bool) -> Iterator[None]:
    """datasets' tqdm bars (map, filter, sorting, downloads) off for the duration unless ``enabled``; the previous
    state is restored after."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    if was_enabled and not enabled:
        disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            enable_progress_bars()


@contextlib.contextmanager
def transformers_bars(enabled: bool) -> Iterator[None]:
    """transformers' and the Hugging Face hub's tqdm bars (weight loading, downloads) off for the duration unless
    ``enabled``; turned back on afterwards only where both were on (turning the hub's on against its
    HF_HUB_DISABLE_PROGRESS_BARS=1 would warn)."""
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    if not enabled:
        transformers_logging.disable_progress_bar()  # the hub's bars too
    try:
        yield
    finally:
        if was_enabled and not enabled:
            transformers_logging.enable_progress_bar()


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """The libraries' bars for a command's work: drawn only when ``enabled`` and stderr is a terminal (a log file
    would fill with their frames)."""
    on = enabled and animates()
    with datasets_bars(on), transformers_bars(on):
        yield
