"""The in-process simulator: every client trains in turn on the one shared base model.

It is an ``Engine`` of ``florist.server``: it trains a round's jobs and returns their replies, and for each client
it could not train, why. Factors a client keeps between rounds (``ClientMode.keeps``) stay here, on the client side:
what reaches the server is only the upload. So do the updates in the clients' bases (``ClientJob.base_deltas``):
one copy serves every simulated client, as each SuperNode of a deployment holds the ones it was sent, and the
server reads them from its run directory only for what is not held here yet (``BaseCache``).

A client whose training raises is left out of the round (the server decides whether enough remain). With a
``client_timeout``, a client still training after that many seconds is stopped at its next optimizer step and
left out too: clients share this process, so the limit is checked between steps and cannot cut a step short.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from ..aggregation import Adapter
from ..base_weights import BaseWeights
from ..client import LocalTrainer
from ..jobs import BaseDelta, ClientJob, ClientReply, KeptFactors, RoundReplies
from ..progress import Step, Steps, log_to_stderr


class ClientTimeout(RuntimeError):
    """A client's training ran past ``client_timeout``."""


class BaseCache:
    """The base updates the simulated clients hold, by key, the least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 1024):
        self.size = size
        self._held: OrderedDict[str, Adapter] = OrderedDict()

    def adapters(self, deltas: Sequence[BaseDelta]) -> list[Adapter]:
        out = []
        for d in deltas:
            if d.key in self._held:
                self._held.move_to_end(d.key)
            else:
                self._held[d.key] = d.load()
                if len(self._held) > self.size:
                    self._held.popitem(last=False)
            out.append(self._held[d.key])
        return out


class InProcessEngine:
    def __init__(
        self,
        base: BaseWeights,
        trainer: LocalTrainer,
        client_examples: Sequence[Sequence[dict]],
        progress: bool = True,
        *,
        client_timeout: float = 0.0,
        log: Callable[[str], None] = log_to_stderr,
    ):
        self.base, self.trainer, self.client_examples = base, trainer, client_examples
        self.progress, self.client_timeout, self.log = progress, client_timeout, log
        self.kept = KeptFactors()
        self.bases = BaseCache()

    def train(self, round_number: int, jobs: Sequence[ClientJob]) -> RoundReplies:
        replies = RoundReplies()
        # a bar per client on a terminal; elsewhere a line per client trained: steps, last loss, seconds
        with Steps(self.progress, remaining=True) as steps:
            for job in jobs:
                label = f"round {round_number} client {job.client} ({job.group}, r={job.start.rank})"
                step = steps.add(label, unit="steps")
                try:
                    replies.replies.append(self._train_one(job, step))
                    step.done()
                except Exception as e:  # a client's failure is its own: the round goes on without it
                    why = f"{type(e).__name__}: {' '.join(str(e).split())}"
                    replies.failures[(job.group, job.client)] = why
                    self.log(f"round {round_number}: client {job.client} ({job.group}) failed: {why}")
        self.base.restore()
        return replies

    def _train_one(self, job: ClientJob, progress: Step) -> ClientReply:
        began = time.monotonic()

        def on_step(step, total, loss):
            progress.update(completed=step, total=total, figures=f"loss {loss:.3f}")
            if self.client_timeout and time.monotonic() - began > self.client_timeout:
                raise ClientTimeout(f"still training after {self.client_timeout:g} s (step {step} of {total})")

        self.base.set_deltas(self.bases.adapters(job.base_deltas))
        upload, log, kept = self.trainer.train(
            self.client_examples[job.client],
            job.start,
            client_id=f"client {job.client}",
            on_step=on_step,
            kept=self.kept.get(job.client, job.start),
        )
        self.kept.put(job.client, job.start, kept)
        return ClientReply(job.client, upload, log, job.group)
