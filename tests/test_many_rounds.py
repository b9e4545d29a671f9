"""Many clients over many rounds on the tiny model, in-process: 100 clients, 10 a round, 75 rounds (the later setting
of the paper's authors). What a client must be sent stays flat in the round number, the server keeps only the newest
round in memory, a run stopped in the middle resumes to the same adapters, the sampling is seeded and uniform, and
every client trains on its own data only."""

from __future__ import annotations

import collections
import json

import pytest
import torch
from test_federation import TINY_RUN

from florist import run as run_module
from florist import setup as run_setup
from florist.adapters import read_adapter
from florist.client import LocalTrainer
from florist.config import load_config
from florist.models import tiny_llama
from florist.server import Federation, sample_clients

CLIENTS, PER_ROUND, ROUNDS = 100, 10, 75
MANY = [
    *TINY_RUN,
    f"data.clients={CLIENTS}",
    "data.max_examples_per_client=3",
    "lora.ranks=[2]",
    f"federation.clients_per_round={PER_ROUND}",
    f"federation.rounds={ROUNDS}",
    'federation.methods=["florist"]',
    'federation.thresholds="0.9"',
    "eval.limit=4",  # four built-in questions (at a cutoff of 32 tokens the held-out answers do not fit)
    "eval.heldout_loss=false",
    "eval.every=25",
]


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))


def run(path, *overrides):
    cfg = load_config(None, [*MANY, f'output="{path}"', *overrides])
    return run_module.run(cfg, progress=False, log=lambda m: None)


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def many_rounds(tmp_path_factory):
    """One 75-round run, watched: per round, each job's base keys, the rounds the server held in memory, and what
    each client trained on."""
    seen = {"jobs": {}, "memory": {}, "examples": collections.defaultdict(set)}
    real_round, real_train = Federation.run_round, LocalTrainer.train

    def run_round(self, round_number):
        records = real_round(self, round_number)
        seen["memory"][round_number] = [b.history.rounds_in_memory() for b in self.branches]
        return records

    def plan_round(self, round_number):
        groups = real_plan(self, round_number)
        seen["jobs"][round_number] = [(j.client, [d.key for d in j.base_deltas]) for g in groups for j in g.jobs]
        return groups

    def train(self, examples, start, client_id="", on_step=None, kept=None):
        seen["examples"][client_id].update(tuple(e["input_ids"]) for e in examples)
        return real_train(self, examples, start, client_id, on_step, kept)

    real_plan = Federation.plan_round
    patch = pytest.MonkeyPatch()
    patch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))
    patch.setattr(Federation, "run_round", run_round)
    patch.setattr(Federation, "plan_round", plan_round)
    patch.setattr(LocalTrainer, "train", train)
    path = run(tmp_path_factory.mktemp("many") / "whole")
    patch.undo()
    return path, seen


def test_what_a_client_must_be_sent_does_not_grow_with_the_rounds(many_rounds):
    """A client holds the base updates it was sent; a job needs the ones it misses: the rounds since it last took
    part, never more, whatever the round number."""
    _, seen = many_rounds
    held = collections.defaultdict(set)
    missed = []
    for r in range(1, ROUNDS + 1):
        for client, keys in seen["jobs"][r]:
            assert len(keys) == r - 1  # the merged base: every past round
            missing = [k for k in keys if k not in held[client]]
            last = max([q for q in range(1, r) if client in dict(seen["jobs"][q])], default=1)
            assert len(missing) == r - last, (r, client)  # since its last round: what it sat out
            missed.append((r, len(missing)))
            held[client].update(keys)
    early = [n for r, n in missed if 11 <= r <= 35]
    late = [n for r, n in missed if 51 <= r <= 75]
    assert sum(late) / len(late) < 2 * sum(early) / len(early)  # the gaps, about 1 / 10 of a round, not the round


def test_the_download_counts_what_a_client_fetches_of_the_rounds_it_sat_out(many_rounds):
    """Each round's result goes at once to the clients it aggregated; one that sat rounds out fetches them when it is
    next drawn, and its download counts them: as many numbers as the saved adapters of the rounds it lacked."""
    path, seen = many_rounds
    records = {x["round"]: x for x in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())}
    sizes = {}
    for q in range(1, ROUNDS + 1):
        adapter, _ = read_adapter(path / "rounds" / f"{q:03d}" / "florist@0.90")
        sizes[q] = sum(m.A.numel() + m.B.numel() for m in adapter.values())
    held = collections.defaultdict(set)
    fetched = 0
    for r in range(1, ROUNDS + 1):
        comm = records[r]["communication"]
        catchup = dict(zip(records[r]["participants"], comm["catchup_download_params"] or [0] * PER_ROUND))
        for client, keys in seen["jobs"][r]:
            lacked = [int(k.split("/")[1]) for k in keys if k not in held[client]]
            assert catchup[client] == sum(sizes[q] for q in lacked), (r, client)
            held[client].update(keys + [f"florist@0.90/{r:03d}/global"])  # and this round's result, once made
            fetched += catchup[client]
        assert comm["download_params"] == [sizes[r] + catchup[c] for c in records[r]["participants"]]
    assert fetched > 0


def test_the_server_keeps_only_the_newest_round_in_memory(many_rounds):
    _, seen = many_rounds
    assert all(memory == [[r]] for r, memory in seen["memory"].items())


def test_sampling_is_seeded_and_every_client_trains_on_its_own_data(many_rounds):
    path, seen = many_rounds
    records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    for r in range(1, ROUNDS + 1):
        (record,) = [x for x in records if x["round"] == r]
        assert record["participants"] == sample_clients(CLIENTS, PER_ROUND, 0, r)
        assert sorted(c for c, _ in seen["jobs"][r]) == record["participants"]
    cfg = load_config(None, [*MANY, f'output="{path}"'])
    own, _ = run_setup.load_client_examples(cfg, tiny_llama(0)[1])
    trained = seen["examples"]
    assert sorted(trained) == sorted({f"client {c}" for r in seen["jobs"].values() for c, _ in r})
    for client, examples in trained.items():  # each trained on examples of its own part of the split, all of them
        assert examples == {tuple(e["input_ids"]) for e in own[int(client.split()[1])]}, client
    scored = [x["round"] for x in records if x["evaluation"]]
    assert scored == [0, 25, 50, 75]  # eval.every=25 and the last round, beside the base model


def test_a_run_stopped_in_the_middle_resumes_to_the_same_adapters(many_rounds, tmp_path, monkeypatch):
    whole, _ = many_rounds
    real = Federation.run_round

    def crash_at_40(self, round_number):
        if round_number == 40:
            raise Crash("stopped")
        return real(self, round_number)

    monkeypatch.setattr(Federation, "run_round", crash_at_40)
    with pytest.raises(Crash):
        run(tmp_path / "resumed")
    monkeypatch.setattr(Federation, "run_round", real)
    resumed = run(tmp_path / "resumed")
    lines = [(whole / "metrics.jsonl").read_text(), (resumed / "metrics.jsonl").read_text()]
    first, again = ([json.loads(x)["communication"] for x in text.splitlines()] for text in lines)
    assert first == again  # the catch-up of rounds after the stop too: the participants were read back
    for r in (39, 40, 75):
        a, _ = read_adapter(whole / "rounds" / f"{r:03d}" / "florist@0.90")
        b, _ = read_adapter(resumed / "rounds" / f"{r:03d}" / "florist@0.90")
        for n in a:
            assert torch.equal(a[n].A, b[n].A) and torch.equal(a[n].B, b[n].B), (r, n)


def test_sampling_is_uniform_and_reproducible_at_1000_clients():
    draws = [sample_clients(1000, 100, 7, r) for r in range(1, 201)]
    assert draws == [sample_clients(1000, 100, 7, r) for r in range(1, 201)]
    assert all(len(set(d)) == 100 and d == sorted(d) for d in draws)
    counts = collections.Counter(k for d in draws for k in d)
    assert len(counts) == 1000  # 200 rounds of 100: every client is drawn (expected 20 times each)
    expected = 200 * 100 / 1000
    chi2 = sum((counts[k] - expected) ** 2 / expected for k in range(1000))
    assert chi2 < 1000 + 5 * (2 * 1000) ** 0.5  # chi-square with 999 degrees of freedom, five sigma
