"""Fed-SB: clients train only an r × r core R between frozen factors every client shares; averaging R is exact, and
r² numbers a module travel each way, however many clients there are."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_client import examples, trainer

import florist.client as client_module
from florist.aggregation import AggregationError, ClientUpdate, LoraFactors
from florist.aggregation.lorasb import first_step_start
from florist.client import CoreLinear, LocalTrainer, lora_layers, trained_factors
from florist.communication import round_communication
from florist.jobs import (
    ClientReply,
    ClientStart,
    ClientUpload,
    RoundReplies,
    TrainingLog,
    completed_factors,
    shared_factors,
)
from florist.methods import aggregate, get_method
from florist.models import tiny_llama
from florist.server import Branch, Federation, RoundFailed, RoundHooks, RoundSettings, UpdateChecks

MODULES = {"q": (6, 5), "v": (4, 5)}  # (m, n)
FEDSB = get_method("fedsb")


def fedsb_round(seed: int, ranks, scalings, counts=None):
    """Shared B (m × r_max) and A (r_max × n) per module, one R_k (r_k × r_k) per client and module, all float64,
    and the updates as the server completes them: the shared A's leading rows under B's leading columns times R_k."""
    rng = np.random.default_rng(seed)
    r_max = max(ranks)
    shared = {
        name: (rng.standard_normal((m, r_max)), rng.standard_normal((r_max, n))) for name, (m, n) in MODULES.items()
    }
    cores = [{name: rng.standard_normal((r, r)) for name in MODULES} for r in ranks]
    updates = []
    for k, (r, s) in enumerate(zip(ranks, scalings)):
        pairs = {
            name: LoraFactors(A=torch.tensor(A[:r]), B=torch.tensor(B[:, :r] @ cores[k][name]), scaling=s)
            for name, (B, A) in shared.items()
        }
        updates.append(ClientUpdate(pairs, counts[k] if counts else 10, f"client {k}"))
    return shared, cores, updates


def paper_core_average(cores, ranks, scalings, weights, name: str) -> np.ndarray:
    """R̄ = Σ_k w_k s_k R_k, each R_k in the top-left corner of an r_max × r_max zero matrix."""
    r_max = max(ranks)
    total = np.zeros((r_max, r_max))
    for R, r, s, w in zip(cores, ranks, scalings, weights):
        total[:r, :r] += w * s * R[name]
    return total


def assert_exact_core_average(result, shared, cores, ranks, scalings, weights):
    for name, (B, A) in shared.items():
        R_bar = paper_core_average(cores, ranks, scalings, weights, name)
        exact = sum(w * s * B[:, :r] @ R[name] @ A[:r] for R, r, s, w in zip(cores, ranks, scalings, weights))
        module = result.modules[name]
        np.testing.assert_allclose(module.delta().numpy(), B @ R_bar @ A, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(module.delta().numpy(), exact, rtol=1e-10, atol=1e-12)
        assert torch.equal(module.A, torch.tensor(A))  # the global pair stays over the shared A ...
        recovered = np.linalg.lstsq(B, module.B.numpy(), rcond=None)[0]
        np.testing.assert_allclose(recovered, R_bar, rtol=1e-9, atol=1e-10)  # ... and its B is B R̄: R̄ is what is sent


def three_clients(test):
    """Three clients' seeds, ranks (equal and not), scalings and example counts, random and two fixed cases."""
    test = example(seed=2, ranks=[2, 3, 2], scalings=[0.5, 4.0, 1.0], counts=[7, 1, 30])(test)
    test = example(seed=1, ranks=[3, 3, 3], scalings=[2.0, 2.0, 2.0], counts=[5, 10, 20])(test)
    return settings(max_examples=25, deadline=None)(
        given(
            seed=st.integers(0, 2**16),
            ranks=st.lists(st.integers(2, 3), min_size=3, max_size=3),
            scalings=st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=3, max_size=3),
            counts=st.lists(st.integers(1, 50), min_size=3, max_size=3),
        )(test)
    )


@three_clients
def test_averaged_core_is_the_exact_data_weighted_mean_update(seed, ranks, scalings, counts):
    shared, cores, updates = fedsb_round(seed, ranks, scalings, counts)
    result = aggregate("fedsb", updates)
    weights = np.array(counts) / sum(counts)
    assert result.per_client is None and result.residual is None
    assert_exact_core_average(result, shared, cores, ranks, scalings, weights)


def test_explicit_weights_replace_the_example_counts():
    ranks, scalings, weights = [3, 2, 3], [2.0, 2.0, 0.5], [0.6, 0.1, 0.3]
    shared, cores, updates = fedsb_round(4, ranks, scalings)
    result = FEDSB.aggregate(updates, weights)
    assert result.weights == weights
    assert_exact_core_average(result, shared, cores, ranks, scalings, weights)


def test_a_client_whose_frozen_a_is_not_the_shared_one_is_named():
    _, _, updates = fedsb_round(5, [3, 3, 3], [1.0, 1.0, 1.0])
    own = updates[1].modules["v"]
    moved = dict(updates[1].modules, v=LoraFactors(A=own.A + 1e-3, B=own.B, scaling=own.scaling))
    updates[1] = ClientUpdate(moved, 10, "client 1")
    with pytest.raises(AggregationError, match=r"client 1, module v: a shared frozen A"):
        aggregate("fedsb", updates)


def test_every_round_holds_the_one_shared_draw_of_the_run():
    shapes = {"q": (6, 5)}
    federation = Federation(None, [], RoundSettings([4, 4], 2.0, "merge", seed=5), UpdateChecks(module_shapes=shapes))
    random_start = FEDSB.configured({"init_examples": 0})
    draws = [federation._shared_factors(random_start, t, random_start.mode(t), 4)["q"] for t in (1, 2, 7)]
    assert [FEDSB.shared_round(t) for t in (1, 2, 7, 100)] == [1, 1, 1, 1]
    assert all(torch.equal(d[f], draws[0][f]) for d in draws for f in ("A", "B"))
    ffa = get_method("ffa")  # a method with a fresh draw each round, to show the draws would differ
    fresh = [federation._shared_factors(ffa, t, ffa.mode(t), 4)["q"]["A"] for t in (1, 2)]
    assert not torch.equal(fresh[0], fresh[1])


def record_factors(monkeypatch) -> dict:
    """Records every LoRA layer's factors and which of them train right after initialisation, and the factors the
    trainer reads out after training."""
    seen: dict = {}
    initialise = LocalTrainer._initialise

    def recording_initialise(self, start, kept):
        initialise(self, start, kept)
        seen["initial"] = trained_factors(self.model)[0]
        seen["trains"] = {
            name: {f for f, p in trained_parameters(layer).items() if p.requires_grad}
            for name, layer in lora_layers(self.model)
        }

    def recording_readout(model):
        factors, scalings = trained_factors(model)
        seen["final"] = factors
        return factors, scalings

    monkeypatch.setattr(LocalTrainer, "_initialise", recording_initialise)
    monkeypatch.setattr(client_module, "trained_factors", recording_readout)
    return seen


def trained_parameters(layer) -> dict:
    lora_A = layer.lora_A["default"]
    held = {"A": lora_A.weight, "B": layer.lora_B["default"].weight}
    if isinstance(lora_A, CoreLinear):
        held["R"] = lora_A.R.weight
    return held


@pytest.mark.parametrize("rank", [4, 2])  # 2: a client below the rank the shared draw was made at
def test_client_trains_only_the_core_and_uploads_only_r(monkeypatch, rank):
    seen = record_factors(monkeypatch)
    model, _ = tiny_llama(0, vocab_size=256)
    shapes = {
        name: tuple(mod.weight.shape) for name, mod in model.named_modules() if name.endswith(("q_proj", "v_proj"))
    }
    shared = shared_factors(shapes, FEDSB.mode(1), 4, seed=7)
    start = ClientStart(rank=rank, alpha=2.0 * rank, seed=1, mode=FEDSB.mode(1), shared=shared)
    upload, _, kept = trainer(model, "float32").train(examples(), start)
    assert set(upload.factors) == set(shapes)
    for name, (m, n) in shapes.items():
        initial, final = seen["initial"][name], seen["final"][name]
        assert seen["trains"][name] == {"R"}  # R exists only in a core layer: A and B are frozen
        assert torch.equal(initial["A"], shared[name]["A"][:rank]) and torch.equal(
            initial["B"], shared[name]["B"][:, :rank]
        )
        assert torch.equal(initial["R"], torch.zeros(rank, rank))
        assert torch.equal(final["A"], initial["A"]) and torch.equal(final["B"], initial["B"])  # frozen
        assert final["R"].abs().sum() > 0  # R trained off its zero start
        assert set(upload.factors[name]) == {"R"} and torch.equal(upload.factors[name]["R"], final["R"])
        assert kept[name] == {}
        pair = completed_factors(start, name, upload.factors[name], upload.scalings[name], (m, n))
        assert torch.equal(pair.A, shared[name]["A"][:rank])
        torch.testing.assert_close(pair.B, shared[name]["B"][:, :rank] @ final["R"])
        assert pair.scaling == upload.scalings[name] == pytest.approx(2.0)


@pytest.mark.parametrize("clients", [2, 6])
def test_each_client_sends_and_receives_r_squared_a_module_however_many_clients(clients):
    _, _, updates = fedsb_round(6, [3] * clients, [2.0] * clients)
    traffic = round_communication(FEDSB, 2, updates, aggregate("fedsb", updates))
    assert traffic.upload_params == [len(MODULES) * 3**2] * clients
    assert traffic.download_params == [len(MODULES) * 3**2] * clients
    assert traffic.upload_bytes == [4 * len(MODULES) * 3**2] * clients
    assert traffic.residual == ""


def test_heterogeneous_ranks_send_their_own_core_and_receive_the_largest():
    ranks = [2, 3, 2]
    _, _, updates = fedsb_round(7, ranks, [2.0] * 3)
    traffic = round_communication(FEDSB, 1, updates, aggregate("fedsb", updates))
    assert traffic.upload_params == [len(MODULES) * r**2 for r in ranks]
    # every client merges the whole s B R̄ A into its base, so it needs all of R̄, r_max × r_max
    assert traffic.download_params == [len(MODULES) * 3**2] * 3


def test_rank_option_sets_every_clients_rank():
    assert FEDSB.client_rank(4, [], 0) == 4  # 0: the run's own rank
    assert FEDSB.configured({"rank": 8}).client_rank(4, [], 2) == 8
    assert FEDSB.rank == 0  # configuring makes a copy


def test_a_rank_above_a_modules_smaller_side_is_refused_naming_the_module():
    shapes = {"layers.0.q_proj": (64, 64), "layers.0.v_proj": (32, 6)}
    assert FEDSB.configured({"rank": 6}).check([4], shapes) == ""  # min(m, n) itself is allowed
    problem = FEDSB.configured({"rank": 7}).check([4], shapes)
    assert problem == "rank 7 (method.fedsb.rank) is above module layers.0.v_proj's 32 x 6"
    assert FEDSB.check([4], shapes) == ""  # no rank of its own: the run's ranks are checked elsewhere


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ({"rank": -1}, r"option 'rank' of fedsb must be at least 0; got -1"),
        ({"rank": 2.5}, r"option 'rank' of fedsb must be int; got 2.5"),
        ({"rnk": 8}, r"fedsb has no option 'rnk'; its options: rank, init_examples$"),
        ({"init_examples": -2}, r"option 'init_examples' of fedsb must be at least 0; got -2"),
    ],
)
def test_bad_options_are_refused_in_one_line(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        FEDSB.configured(values)


# --- LoRA-SB's start: the first full-gradient step, estimated by the clients --------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(2, 9),
    n=st.integers(2, 9),
    data=st.data(),
    lr=st.floats(1e-5, 1.0),
    seed=st.integers(0, 2**31),
)
def test_the_start_is_the_best_rank_r_approximation_of_adams_first_step(m, n, data, lr, seed):
    rank = data.draw(st.integers(1, min(m, n)))
    g = np.random.default_rng(seed).standard_normal((m, n))
    B, R, A = (t.double().numpy() for t in first_step_start(torch.tensor(g, dtype=torch.float32), rank, lr))
    step = -lr * np.sign(g)  # Adam's first step: lr * g / |g|
    sigma = np.linalg.svd(step, compute_uv=False)
    start = B @ R @ A
    # Eckart-Young: no rank-r matrix is closer to the step than its truncated SVD, whose error is the tail's energy
    # (a sign matrix may repeat singular values, so the closest matrix need not be unique; its distance is)
    tail = np.sqrt(np.sum(sigma[rank:] ** 2))
    np.testing.assert_allclose(np.linalg.norm(step - start), tail, atol=1e-5 * lr * max(m, n))
    np.testing.assert_allclose(np.diag(R), sigma[:rank], rtol=1e-5, atol=1e-6 * lr)
    assert np.count_nonzero(R - np.diag(np.diag(R))) == 0  # R starts diagonal
    np.testing.assert_allclose(B.T @ B, np.eye(rank), atol=1e-5)
    np.testing.assert_allclose(A @ A.T, np.eye(rank), atol=1e-5)
    if rank > 1:  # a smaller rank's start is the leading block of a larger one's, as clients of smaller rank take it
        small = [t.double().numpy() for t in first_step_start(torch.tensor(g, dtype=torch.float32), rank - 1, lr)]
        k = rank - 1
        np.testing.assert_allclose(small[0] @ small[1] @ small[2], B[:, :k] @ R[:k, :k] @ A[:k], atol=1e-6 * lr)


def test_a_start_rank_beyond_the_module_is_refused():
    with pytest.raises(ValueError, match="rank 4 is outside 1..3 for a 3 x 5 gradient"):
        first_step_start(torch.ones(3, 5), 4, 1e-3)


def adapted_shapes(model) -> dict:
    return {n: tuple(mod.weight.shape) for n, mod in model.named_modules() if n.endswith(("q_proj", "v_proj"))}


def test_the_gradient_job_sums_each_adapted_weights_gradient_and_changes_nothing():
    model, _ = tiny_llama(0, vocab_size=256)
    reference, _ = tiny_llama(0, vocab_size=256)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = examples(7)
    start = ClientStart(rank=1, alpha=1.0, seed=3, gradient_examples=5)
    upload, log, kept = trainer(model, "float32").train(data, start)
    # the reference: the model's own loss (token mean over a micro-batch of 2) times the micro-batch's size, summed
    shapes = adapted_shapes(reference)
    weights = {n: mod.weight for n, mod in reference.named_modules() if n in shapes}
    for w in weights.values():
        w.requires_grad_(True)
    for i in range(0, 5, 2):
        batch = client_module.collate(data[i : min(i + 2, 5)], 0, "cpu")
        (reference(**batch).loss * len(batch["input_ids"])).backward()
    assert set(upload.factors) == set(shapes) and upload.num_examples == 7 and kept == {}
    for name, w in weights.items():
        assert set(upload.factors[name]) == {"G"}
        torch.testing.assert_close(upload.factors[name]["G"], w.grad, rtol=1e-4, atol=1e-6)
    assert log.steps == 3 and len(log.losses) == 3
    assert not lora_layers(model) and not any(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_core_start_is_the_updates_core_divided_by_the_clients_scaling(monkeypatch):
    seen = record_factors(monkeypatch)
    model, _ = tiny_llama(0, vocab_size=256)
    shapes = adapted_shapes(model)
    shared = shared_factors(shapes, FEDSB.mode(1), 4, seed=7)
    for held in shared.values():
        held["R"] = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    start = ClientStart(rank=2, alpha=6.0, seed=1, mode=FEDSB.mode(1), shared=shared)  # scaling 3
    trainer(model, "float32").train(examples(), start)
    for name in shapes:
        torch.testing.assert_close(seen["initial"][name]["R"], torch.diag(torch.tensor([4.0, 3.0])) / 3.0)


class GradientEngine:
    """Answers gradient jobs with made-up gradients: client k sends ``gradients[k]``."""

    def __init__(self, gradients):
        self.gradients, self.jobs = gradients, []

    def train(self, round_number, jobs):
        self.jobs += jobs
        replies = RoundReplies()
        for job in jobs:
            g = self.gradients[job.client]
            upload = ClientUpload({n: {"G": t} for n, t in g.items()}, {n: 1.0 for n in g}, 3)
            replies.replies.append(ClientReply(job.client, upload, TrainingLog(), job.group))
        return replies


def gradient_federation(gradients, min_clients=1, method=FEDSB):
    shapes = {"q": (6, 5), "v": (4, 5)}
    settings_ = RoundSettings([3, 2, 3], 2.0, "merge", seed=1, min_clients=min_clients, lr=1e-3)
    logged = []
    hooks = RoundHooks(log=logged.append)
    engine = GradientEngine(gradients)
    branch = Branch("fedsb", method, scheme="merge")
    return Federation(engine, [branch], settings_, UpdateChecks(shapes), hooks), engine, logged


def test_the_server_sums_the_clients_gradients_and_leaves_out_a_bad_one():
    rng = np.random.default_rng(4)
    good = [
        {n: torch.tensor(rng.standard_normal(s), dtype=torch.float32) for n, s in (("q", (6, 5)), ("v", (4, 5)))}
        for _ in range(3)
    ]
    bad = dict(good[1], v=torch.full((4, 5), float("nan")))
    federation, engine, logged = gradient_federation([good[0], bad, good[2]])
    federation.prepare_shared(1)
    assert [j.start.gradient_examples for j in engine.jobs] == [4, 4, 4] and not engine.jobs[0].base_deltas
    shared = federation._shared_for(FEDSB, 1, FEDSB.mode(1), 3)
    for name in ("q", "v"):
        B, R, A = first_step_start(good[0][name] + good[2][name], 3, 1e-3)
        torch.testing.assert_close(shared[name]["B"] @ shared[name]["R"] @ shared[name]["A"], B @ R @ A)
    assert any("left out client 1" in line and "not finite" in line for line in logged)
    # the start travels once: the dense gradient up, B, A and R's start at each client's rank down
    traffic = federation._start_traffic[("fedsb", 1)]
    assert set(traffic) == {0, 2}
    assert traffic[0] == (6 * 5 + 4 * 5, (6 * 3 + 3 * 5 + 9) + (4 * 3 + 3 * 5 + 9))
    later = federation._shared_for(FEDSB, 2, FEDSB.mode(2), 3)  # round 2: the same B and A, R starts at zero
    assert set(later["q"]) == {"A", "B"} and torch.equal(later["q"]["A"], shared["q"]["A"])
    federation.prepare_shared(2)
    assert len(engine.jobs) == 3  # estimated once


@pytest.mark.parametrize(
    ("gradient", "why"),
    [
        ({"q": torch.ones(6, 5)}, "modules are not the base model's"),
        (
            {"q": torch.ones(5, 6), "v": torch.ones(4, 5)},
            r"module q: a gradient must be a float tensor of shape \(6, 5\)",
        ),
        (
            {"q": torch.ones(6, 5), "v": torch.full((4, 5), 1e31)},
            "module v: its gradient is not finite or beyond 1e30",
        ),
    ],
)
def test_a_gradient_that_is_not_the_base_models_is_named(gradient, why):
    federation, _, logged = gradient_federation([gradient] * 3)
    with pytest.raises(RoundFailed, match="0 of 3 clients sent a usable gradient for fedsb's first step"):
        federation.prepare_shared(1)
    assert any(re.search(why, line) for line in logged)


def test_without_init_examples_no_gradient_is_asked_for():
    federation, engine, _ = gradient_federation([], method=FEDSB.configured({"init_examples": 0}))
    federation.prepare_shared(1)
    assert engine.jobs == []
