"""The in-process simulator: every client trains in turn on the one shared base model."""

from __future__ import annotations

from collections.abc import Sequence

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..base_weights import BaseWeights
from ..client import LocalTrainer
from ..server import ClientJob, ClientResult


def training_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), transient=False,
    )


class InProcessEngine:
    def __init__(self, base: BaseWeights, trainer: LocalTrainer, client_examples: Sequence[Sequence[dict]], progress: bool = True):
        self.base, self.trainer, self.client_examples = base, trainer, client_examples
        self.progress = progress

    def train(self, round_number: int, jobs: Sequence[ClientJob]) -> list[ClientResult]:
        results = []
        with training_progress() if self.progress else _Silent() as bar:
            for job in jobs:
                task = bar.add_task(f"round {round_number} client {job.client} (r={job.start.rank})", total=None, loss="-")

                def on_step(step, total, loss, task=task):
                    bar.update(task, completed=step, total=total, loss=f"{loss:.3f}")

                self.base.set_deltas(job.base_deltas)
                update, log = self.trainer.train(
                    self.client_examples[job.client], job.start, client_id=f"client {job.client}", on_step=on_step
                )
                results.append(ClientResult(job.client, update, log))
        self.base.restore()
        return results


class _Silent:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass
