"""Two-way compression: clients cut their uploads to a share of their energy (``federation.upload_thresholds``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_federation import TINY_RUN

import florist.run as run_module
import florist.setup as run_setup
from florist.adapters import read_adapter
from florist.aggregation import LoraFactors
from florist.aggregation.truncation import leading_components, recut, truncated_pair, truncation_problem
from florist.config import ConfigError, load_config
from florist.jobs import ClientJob, ClientReply, ClientStart, ClientUpload, RoundReplies, TrainingLog, cut_upload
from florist.models import tiny_llama
from florist.report import build_report, load_run
from florist.server import Federation, RoundHooks, RoundSettings, UpdateChecks, make_branches

FAST = [*TINY_RUN, "eval.limit=8", "lora.ranks=[8]", 'federation.thresholds="0.90"']


def random_pair(seed: int, m: int, n: int, r: int, scaling: float) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, as trained updates have: the cut has something to keep and something to drop
    B = torch.randn(m, r, generator=g) * torch.logspace(0, -2, r)
    return LoraFactors(A=torch.randn(r, n, generator=g) / math.sqrt(n), B=B, scaling=scaling)


# --- the mathematics ---------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    m=st.integers(4, 40),
    n=st.integers(4, 40),
    r=st.integers(1, 12),
    scaling=st.sampled_from([0.5, 1.0, 2.0]),
    tau=st.floats(0.05, 1.0),
)
def test_a_cut_is_the_best_rank_p_approximation_with_the_fewest_components_reaching_tau(seed, m, n, r, scaling, tau):
    pair = random_pair(seed, m, n, r, scaling)
    cut, spectrum = truncated_pair(pair, tau)
    dense = pair.delta().double().numpy()
    U, S, Vh = np.linalg.svd(dense, full_matrices=False)
    np.testing.assert_allclose(spectrum.double().numpy(), S[: spectrum.numel()], rtol=1e-4, atol=1e-6 * S[0])
    energy = np.cumsum(S**2) / np.sum(S**2)
    p = cut.rank
    assert p == 1 or energy[p - 2] < tau - 1e-6  # one component fewer would not reach tau
    assert energy[p - 1] >= tau - 1e-5 or p == min(r, m, n)
    best = (U[:, :p] * S[:p]) @ Vh[:p]  # Eckart-Young: the best rank-p approximation
    np.testing.assert_allclose(cut.delta().double().numpy(), best, atol=1e-5 * S[0])
    assert cut.scaling == scaling and truncation_problem(cut, spectrum, tau, r) == ""


def test_a_cut_at_a_lower_tau_is_the_leading_part_of_a_cut_at_a_higher_one_bit_for_bit():
    pair = random_pair(3, 30, 20, 10, 2.0)
    high, spectrum = truncated_pair(pair, 0.95)
    for tau in (0.3, 0.6, 0.9, 0.95):
        direct, _ = truncated_pair(pair, tau)
        again = recut(high, spectrum, tau)
        assert torch.equal(again.A, direct.A) and torch.equal(again.B, direct.B)


def test_an_upload_at_threshold_one_is_sent_as_it_is():
    upload = ClientUpload({"q": {"A": torch.ones(2, 3), "B": torch.ones(4, 2)}}, {"q": 2.0}, 5)
    assert cut_upload(upload, 1.0) is upload


@pytest.mark.parametrize(
    "tamper, refusal",
    [
        (lambda cut, S: (leading_components(cut, cut.rank - 1), S), "but its spectrum needs rank"),  # claims less
        (lambda cut, S: (cut, S[:1] * 0 + S[0] * 2), "but its spectrum needs rank"),  # a spectrum claiming rank 1
        (lambda cut, S: (LoraFactors(cut.A * 1.1, cut.B, cut.scaling), S), "its A is not in the cut form"),
        (lambda cut, S: (LoraFactors(cut.A, cut.B * 3, cut.scaling), S), "its B is not in the cut form"),
        (lambda cut, S: (cut, S.flip(0)), "descending"),
        (lambda cut, S: (cut, torch.full_like(S, float("nan"))), "finite"),
        (lambda cut, S: (cut, torch.cat([S, S])), "not 1 to the rank"),
        (lambda cut, S: (cut, S.to(torch.int64)), "not a vector of floats"),
        (lambda cut, S: (cut, None), "not a vector of floats"),
    ],
)
def test_an_upload_that_is_not_the_cut_it_claims_is_named_for_what_is_wrong(tamper, refusal):
    pair = random_pair(5, 24, 16, 8, 2.0)
    cut, spectrum = truncated_pair(pair, 0.9)
    assert cut.rank > 1
    bad, claimed = tamper(cut, spectrum)
    assert refusal in truncation_problem(bad, claimed, 0.9, 8)


# --- the configuration -------------------------------------------------------------------------------------------


def test_a_method_that_cannot_cut_its_uploads_is_refused_before_training_unless_1_is_asked_for_too():
    with pytest.raises(ConfigError, match="ffa cannot cut its uploads"):
        load_config(None, ['federation.methods=["flora","ffa"]', 'federation.upload_thresholds="0.9"'])
    with pytest.raises(ConfigError, match="federation.upload_thresholds"):
        load_config(None, ['federation.upload_thresholds="0.9,1.5"'])
    labels = [b.label for b in make_branches(["flora", "ffa", "florist"], [0.8], upload_thresholds=[0.5, 1.0])]
    assert labels == ["flora", "flora+up0.50", "ffa", "florist@0.80", "florist@0.80+up0.50"]


# --- runs on the tiny model --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))


def run(tmp_path, name, *overrides):
    cfg = load_config(None, FAST + [f'output="{tmp_path / name}"', *overrides])
    return run_module.run(cfg, progress=False, log=lambda m: None)


def records(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def untimed(value):
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k not in ("seconds", "server_seconds")}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def same_adapter(a, b) -> bool:
    fa, fb = read_adapter(a)[0], read_adapter(b)[0]
    return fa.keys() == fb.keys() and all(torch.equal(fa[n].A, fb[n].A) and torch.equal(fa[n].B, fb[n].B) for n in fa)


METHODS = 'federation.methods=["florist","flora","fedit"]'


def test_a_sweep_shares_training_and_equals_each_threshold_run_alone_bit_for_bit(tmp_path):
    """Round 1: every threshold is cut from one training (the clients cut at 0.9, the server recuts at 0.5); round 2:
    each branch its own. Each equals a run asked for that threshold alone, whose clients cut at it themselves."""
    args = (METHODS, "federation.rounds=2")
    swept = run(tmp_path, "swept", *args, 'federation.upload_thresholds="0.5,0.9"')
    alone = run(tmp_path, "alone", *args, 'federation.upload_thresholds="0.5"')
    assert [p.name for p in (swept / "rounds" / "001" / "clients").iterdir()] == ["shared"]
    for rnd in ("001", "002"):
        for label in ("florist@0.90+up0.50", "flora+up0.50", "fedit+up0.50"):
            assert same_adapter(swept / "rounds" / rnd / label, alone / "rounds" / rnd / label), (rnd, label)
    by_branch = {(r["round"], r["branch"]): r for r in records(swept) if r["round"]}
    for (rnd, label), r in by_branch.items():
        if label.endswith("+up0.50"):
            assert untimed(r) == untimed(next(x for x in records(alone) if (x["round"], x["branch"]) == (rnd, label)))
    # the cut is honest about what it saves: fewer parameters up, and the kept ranks are those of the adapters
    higher, cut = by_branch[(1, "flora+up0.90")], by_branch[(1, "flora+up0.50")]
    assert sum(cut["communication"]["upload_params"]) < sum(higher["communication"]["upload_params"])
    assert all(max(ranks.values()) <= 8 for ranks in cut["upload_ranks"])
    stacked = read_adapter(swept / "rounds" / "001" / "flora+up0.50")[0]
    assert {n: m.rank for n, m in stacked.items()} == {
        n: sum(ranks[n] for ranks in cut["upload_ranks"]) for n in stacked
    }  # FLoRA stacks what arrived: its rank is the sum of the kept ranks
    info = json.loads((swept / "rounds" / "001" / "clients" / "shared" / "client_0" / "client.json").read_text())
    assert len(info["upload_spectra"]) == len(stacked)


def test_with_1_among_the_thresholds_the_server_makes_every_cut_as_the_clients_would(tmp_path):
    """The clients send whole pairs; each lower threshold is cut from the whole pair, never from another cut's
    spectrum over factors that are not in the cut form."""
    swept = run(tmp_path, "swept", METHODS, 'federation.upload_thresholds="0.5,0.8,1"')
    for threshold in ("0.50", "0.80"):
        alone = run(tmp_path, f"alone{threshold}", METHODS, f'federation.upload_thresholds="{threshold}"')
        for label in (f"flora+up{threshold}", f"fedit+up{threshold}", f"florist@0.90+up{threshold}"):
            assert same_adapter(swept / "rounds" / "001" / label, alone / "rounds" / "001" / label), label


def test_threshold_one_beside_a_sweep_reproduces_the_run_without_cuts_bit_for_bit(tmp_path):
    plain = run(tmp_path, "plain", METHODS, "federation.rounds=2")
    swept = run(tmp_path, "swept", METHODS, "federation.rounds=2", 'federation.upload_thresholds="0.7,1"')
    for rnd in ("001", "002"):
        for label in ("florist@0.90", "flora", "fedit"):
            assert same_adapter(plain / "rounds" / rnd / label, swept / "rounds" / rnd / label), (rnd, label)
    kept = [untimed(r) for r in records(swept) if "+up" not in r["branch"]]
    assert kept == [untimed(r) for r in records(plain)]
    assert (plain / "results.md").read_text().count("τ up") == 0


# --- a hostile client --------------------------------------------------------------------------------------------

SHAPES = {"q": (12, 10), "v": (8, 10)}


class CuttingEngine:
    """Clients that reply with honest cuts, but for ``liar``, whose reply ``tamper`` changes."""

    def __init__(self, liar: int, tamper):
        self.liar, self.tamper = liar, tamper

    def train(self, round_number, jobs: list[ClientJob]) -> RoundReplies:
        replies = RoundReplies()
        for job in jobs:
            r = job.start.rank
            pairs = {
                n: random_pair(job.client * 7 + k, m, n_, r, job.start.alpha / r)
                for k, (n, (m, n_)) in enumerate(SHAPES.items())
            }
            upload = ClientUpload(
                {n: {"A": p.A, "B": p.B} for n, p in pairs.items()}, {n: p.scaling for n, p in pairs.items()}, 10
            )
            upload = cut_upload(upload, job.start.upload_threshold)
            if job.client == self.liar:
                upload = self.tamper(upload)
            replies.replies.append(ClientReply(job.client, upload, TrainingLog(), group=job.group))
        return replies


def claims_less(upload: ClientUpload) -> ClientUpload:
    """Sends one component more than its spectrum says the cut keeps."""
    factors = {
        n: {
            "A": torch.cat([held["A"], torch.ones(1, held["A"].shape[1])]),
            "B": torch.cat([held["B"], torch.ones(held["B"].shape[0], 1)], 1),
        }
        for n, held in upload.factors.items()
    }
    return ClientUpload(factors, upload.scalings, upload.num_examples, upload.spectra)


def uncut(upload: ClientUpload) -> ClientUpload:
    """Sends no spectra at all."""
    return ClientUpload(upload.factors, upload.scalings, upload.num_examples)


@pytest.mark.parametrize("tamper, reason", [(claims_less, "needs rank"), (uncut, "not a vector of floats")])
def test_a_client_cannot_claim_a_smaller_rank_than_it_sends(tamper, reason):
    federation = Federation(
        CuttingEngine(1, tamper),
        make_branches(["flora"], upload_thresholds=[0.8]),
        RoundSettings(ranks=[4, 4, 4], alpha_per_rank=2.0, scheme="merge", seed=0),
        UpdateChecks(SHAPES),
        RoundHooks(log=lambda m: None),
    )
    (record,) = federation.run_round(1)
    assert record.participants == [0, 2] and reason in record.rejected["1"]
    assert len(record.upload_ranks) == 2 and all(1 <= p < 4 for ranks in record.upload_ranks for p in ranks.values())


def test_a_job_asking_for_whole_pairs_refuses_spectra():
    federation = Federation(
        CuttingEngine(0, lambda u: ClientUpload(u.factors, u.scalings, 10, {n: torch.ones(1) for n in u.factors})),
        make_branches(["flora"]),
        RoundSettings(ranks=[4, 4], alpha_per_rank=2.0, scheme="merge", seed=0),
        UpdateChecks(SHAPES),
        RoundHooks(log=lambda m: None),
    )
    (record,) = federation.run_round(1)
    assert record.participants == [1] and "spectra its job did not ask for" in record.rejected["0"]


def test_a_start_asks_for_whole_pairs_by_default():
    assert ClientStart(rank=4, alpha=8.0, seed=0).upload_threshold == 1.0


def test_the_report_shows_the_cuts_against_total_traffic_with_kept_ranks_and_spectra(tmp_path):
    path = run(tmp_path, "cuts", 'federation.methods=["florist","flora","ffa"]', 'federation.upload_thresholds="0.5,1"')
    report = build_report([load_run(path)])
    text = report.markdown
    assert "## Upload cuts" in text or "### Upload cuts" in text
    assert {"cuts-upload.png", "cuts-upload-spectra.png"} <= {Path(name).name for name in report.images}
    cut = next(line for line in text.splitlines() if line.startswith("| flora+up0.50 |"))
    cells = [c.strip() for c in cut.strip("|").split("|")]
    assert 0 < float(cells[-1]) < 1  # its upload is a share of flora's
    assert "| ffa+up" not in text  # FFA-LoRA's clients upload B alone: it runs with whole pairs only
    assert "τ up" in text.split("## Upload cuts")[0]  # the results table has the column

    both = build_report([load_run(path), load_run(path)]).markdown  # several runs: one table of all, τ up shown
    header, _, *rows = [x for x in both.split("## All runs")[1].splitlines() if x.startswith("|")][: 2 + 2 * 9]
    names = [c.strip() for c in header.strip("|").split("|")]
    assert "τ up" in names and "MB up" in names
    flora = [[c.strip() for c in r.strip("|").split("|")] for r in rows if "| FLoRA |" in r]
    assert sorted(r[names.index("τ up")] for r in flora[:2]) == ["", "0.50"]


def test_flexlora_sends_each_client_its_trained_rank_whatever_its_cut_kept():
    from florist.aggregation import ClientUpdate
    from florist.methods import aggregate

    pairs = [random_pair(k, 12, 10, 6, 2.0) for k in range(3)]
    cuts = [truncated_pair(p, 0.6)[0] for p in pairs]
    assert all(c.rank < 6 for c in cuts)
    updates = [ClientUpdate({"q": c}, 10, f"client {k}", trained_rank=6) for k, c in enumerate(cuts)]
    result = aggregate("flexlora", updates)
    assert [a["q"].rank for a in result.per_client] == [6, 6, 6]
    # without the trained rank, a client would get back no more than it sent
    plain = aggregate("flexlora", [ClientUpdate({"q": c}, 10) for c in cuts])
    assert [a["q"].rank for a in plain.per_client] == [c.rank for c in cuts]
