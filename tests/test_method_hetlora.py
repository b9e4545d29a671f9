"""HetLoRA (Cho et al., EMNLP 2024): the sparsity-weighted mean of zero-padded factors, each client's cut of it, rank
self-pruning, what a client trains and sends, the traffic, and the refusals. The references are numpy float64 written
from the paper's Fig. 2 and its self-pruning rule, not from florist's code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florist.aggregation import AggregationResult, ClientUpdate, LoraFactors, ModuleAggregate
from florist.client import LocalTrainer
from florist.communication import round_communication
from florist.config import LoraConfig, TrainConfig
from florist.history import History
from florist.jobs import ClientStart
from florist.methods import RoundContext, aggregate, get_method
from florist.models import tiny_llama

SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 7)}  # (m, n)
RANKS = st.lists(st.integers(2, 3), min_size=3, max_size=3)
SCALINGS = st.lists(st.sampled_from([1.0, 0.5, 2.5]), min_size=3, max_size=3)
TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def random_update(rng, rank: int, scaling: float, examples: int = 10) -> ClientUpdate:
    modules = {
        name: LoraFactors(
            torch.from_numpy(rng.normal(size=(rank, n))), torch.from_numpy(rng.normal(size=(m, rank))), scaling
        )
        for name, (m, n) in SHAPES.items()
    }
    return ClientUpdate(modules, examples)


def as_numpy(update: ClientUpdate) -> dict:
    """{module: (A, s B)}: the paper's pair, its ΔW = (s B) A."""
    return {name: (f.A.numpy(), f.scaling * f.B.numpy()) for name, f in update.modules.items()}


def paper_global(clients: list[dict]) -> dict:
    """Fig. 2 per module: p_k = ||B_k A_k||_F / Z (uniform if Z = 0); B = Σ p_k [B_k, 0], A = Σ p_k [A_k; 0]."""
    out = {}
    for name in clients[0]:
        pairs = [c[name] for c in clients]
        norms = np.array([np.linalg.norm(B @ A, "fro") for A, B in pairs])
        p = norms / norms.sum() if norms.sum() > 0 else np.full(len(pairs), 1 / len(pairs))
        r_max = max(A.shape[0] for A, _ in pairs)
        A_g = sum(w * np.pad(A, ((0, r_max - A.shape[0]), (0, 0))) for w, (A, _) in zip(p, pairs))
        B_g = sum(w * np.pad(B, ((0, 0), (0, r_max - B.shape[1]))) for w, (_, B) in zip(p, pairs))
        out[name] = (A_g, B_g)
    return out


def paper_prune(trained: dict, received: dict, gamma: float, min_rank: int) -> dict:
    """A client's pairs as it sends them: cut to c = max(min_rank, ⌊γ r⌋) when its tail Σ ||B[:, c:]|| ||A[c:]||
    is below the tail of the pairs it received."""
    r = next(iter(trained.values()))[0].shape[0]
    c = max(min_rank, math.floor(gamma * r))
    tail = lambda pairs: sum(np.linalg.norm(B[:, c:]) * np.linalg.norm(A[c:]) for A, B in pairs.values())  # noqa: E731
    if c < r and tail(trained) < tail(received):
        return {name: (A[:c], B[:, :c]) for name, (A, B) in trained.items()}
    return trained


def assert_adapter_is(adapter: dict, expected: dict) -> None:
    assert adapter.keys() == expected.keys()
    for name, (A, B) in expected.items():
        np.testing.assert_allclose(adapter[name].A.numpy(), A, **TIGHT)
        np.testing.assert_allclose(adapter[name].B.numpy(), B, **TIGHT)


@settings(max_examples=25, deadline=None)
@given(RANKS, SCALINGS, st.integers(0, 2**32 - 1))
def test_global_is_the_sparsity_weighted_mean_of_padded_factors_and_each_client_gets_its_cut(ranks, scalings, seed):
    rng = np.random.default_rng(seed)
    updates = [random_update(rng, r, s, int(rng.integers(1, 50))) for r, s in zip(ranks, scalings)]
    weights = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
    result = get_method("hetlora").aggregate(updates, weights)
    expected = paper_global([as_numpy(u) for u in updates])
    assert_adapter_is(result.modules, expected)
    assert result.ranks == dict.fromkeys(SHAPES, max(ranks))
    for k, r in enumerate(ranks):
        assert_adapter_is(result.for_client(k), {n: (A[:r], B[:, :r]) for n, (A, B) in expected.items()})


def test_example_counts_do_not_change_the_result():
    rng = np.random.default_rng(1)
    updates = [random_update(rng, r, s) for r, s in [(2, 1.0), (3, 2.0), (3, 0.5)]]
    recounted = [ClientUpdate(u.modules, n) for u, n in zip(updates, [1, 100, 7])]
    first, second = aggregate("hetlora", updates), aggregate("hetlora", recounted)
    for a, b in zip([first.modules, *first.per_client], [second.modules, *second.per_client]):
        for name in SHAPES:
            assert torch.equal(a[name].A, b[name].A) and torch.equal(a[name].B, b[name].B)


def test_all_zero_updates_weigh_the_clients_equally():
    rng = np.random.default_rng(2)
    updates = [random_update(rng, r, 1.0) for r in (2, 3)]
    zeroed = [ClientUpdate({n: LoraFactors(f.A, 0 * f.B) for n, f in u.modules.items()}, 5) for u in updates]
    assert_adapter_is(aggregate("hetlora", zeroed).modules, paper_global([as_numpy(u) for u in zeroed]))


def test_the_global_update_is_not_the_exact_weighted_mean():
    rng = np.random.default_rng(3)
    updates = [random_update(rng, r, s) for r, s in [(2, 1.0), (3, 2.0), (3, 1.0)]]
    result = aggregate("hetlora", updates)  # weights n_k / N, all equal
    assert not get_method("hetlora").exact
    for name in SHAPES:
        exact = sum(u.modules[name].delta() for u in updates) / len(updates)
        assert not torch.allclose(result.modules[name].delta(), exact, rtol=1e-3)


def pruning_round(rng, ranks, tail_factors, scaling=2.0):
    """Per client: the adapter it received (random, scaling folded) and its update after training: the received
    pair with some noise, and in each module the components from index 1 on scaled by the client's tail factor for
    that module (a pair: q_proj's, v_proj's)."""
    received, updates = [], []
    for r, t in zip(ranks, tail_factors):
        adapter, modules = {}, {}
        for (name, (m, n)), t_module in zip(SHAPES.items(), t):
            A, B = rng.normal(size=(r, n)), rng.normal(size=(m, r))
            adapter[name] = ModuleAggregate(A=torch.from_numpy(A), B=torch.from_numpy(B))
            grow = np.r_[1.0, np.full(r - 1, t_module)]
            A_t, B_t = grow[:, None] * A + 0.01 * rng.normal(size=A.shape), grow * B / scaling
            modules[name] = LoraFactors(torch.from_numpy(A_t), torch.from_numpy(B_t), scaling)
        received.append(adapter)
        updates.append(ClientUpdate(modules, 10))
    return received, updates


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(2, 5), min_size=3, max_size=3),
    st.lists(st.tuples(st.sampled_from([0.3, 3.0]), st.sampled_from([0.3, 3.0])), min_size=3, max_size=3),
    st.sampled_from([0.5, 0.7, 0.99]),
    st.integers(1, 3),
    st.integers(0, 2**32 - 1),
)
def test_self_pruning_matches_the_papers_rule(ranks, tail_factors, gamma, min_rank, seed):
    received, updates = pruning_round(np.random.default_rng(seed), ranks, tail_factors)
    method = get_method("hetlora").configured({"prune": gamma, "min_rank": min_rank})
    result = method.aggregate(updates, [1 / 3] * 3, context=RoundContext(2, received))
    received_np = [{n: (m.A.numpy(), m.B.numpy()) for n, m in adapter.items()} for adapter in received]
    sent = [paper_prune(as_numpy(u), got, gamma, min_rank) for u, got in zip(updates, received_np)]
    expected = paper_global(sent)
    assert_adapter_is(result.modules, expected)
    for k, pairs in enumerate(sent):
        r = next(iter(pairs.values()))[0].shape[0]
        assert_adapter_is(result.for_client(k), {n: (A[:r], B[:, :r]) for n, (A, B) in expected.items()})


def history(*results: AggregationResult) -> History:
    """A branch's past rounds as the loop keeps them: the older ones only as what each client was sent."""
    past = History(load=lambda round_number, part: {})
    for r in results:
        past.append(r)
        past.settle()
    return past


def test_a_client_whose_tail_shrank_is_cut_and_one_whose_tail_grew_is_not():
    # client 2's q_proj tail shrank, but its v_proj tail grew more: over all modules its tail grew
    received, updates = pruning_round(np.random.default_rng(4), [4, 4, 4], [(0.3, 0.3), (3.0, 3.0), (0.3, 3.0)])
    method = get_method("hetlora").configured({"prune": 0.5, "min_rank": 1})
    result = method.aggregate(updates, [1 / 3] * 3, context=RoundContext(2, received))
    assert [result.for_client(k)["layers.0.q_proj"].rank for k in range(3)] == [2, 4, 4]
    cut = ClientUpdate({n: LoraFactors(f.A[:2], f.B[:, :2], f.scaling) for n, f in updates[0].modules.items()}, 10)
    assert_adapter_is(result.modules, paper_global([as_numpy(u) for u in [cut, *updates[1:]]]))  # its tail left
    past = history(result)
    assert method.client_rank(4, past, 0) == 2 and method.client_rank(4, past, 1) == 4

    floor = get_method("hetlora").configured({"prune": 0.5, "min_rank": 3})
    floored = floor.aggregate(updates, [1 / 3] * 3, context=RoundContext(2, received))
    assert floored.for_client(0)["layers.0.q_proj"].rank == 3  # max(min_rank, ⌊γ r⌋)


@pytest.mark.parametrize(
    ("options", "context"),
    [
        ({"prune": 0.5}, "round 1"),  # every client started from a fresh LoRA
        ({"prune": 0.5}, None),  # no run, as florist aggregate calls it
        ({"prune": 0.0}, "round 2"),  # pruning off
        ({"prune": 0.5, "min_rank": 4}, "round 2"),  # nothing to cut: the least rank is the rank
    ],
)
def test_no_client_is_pruned(options, context):
    received, updates = pruning_round(np.random.default_rng(5), [4, 4, 3], [(0.3, 0.3)] * 3)
    contexts = {"round 1": RoundContext(1, [None] * 3), "round 2": RoundContext(2, received), None: None}
    result = get_method("hetlora").configured(options).aggregate(updates, [1 / 3] * 3, context=contexts[context])
    assert [result.for_client(k)["layers.0.q_proj"].rank for k in range(3)] == [4, 4, 3]
    assert_adapter_is(result.modules, paper_global([as_numpy(u) for u in updates]))


def test_the_registry_entry_aggregates_without_a_context_and_never_prunes():
    _, updates = pruning_round(np.random.default_rng(6), [4, 2, 3], [(0.3, 0.3)] * 3)
    pruning = get_method("hetlora").configured({"prune": 0.5})
    for result in (aggregate("hetlora", updates), aggregate(pruning, updates)):
        assert_adapter_is(result.modules, paper_global([as_numpy(u) for u in updates]))
        assert [result.for_client(k)["layers.0.v_proj"].rank for k in range(3)] == [4, 2, 3]


def test_client_rank_is_the_run_rank_until_pruned_and_never_above_it():
    method = get_method("hetlora").configured({"prune": 0.5})

    def at(rank):
        return {name: ModuleAggregate(torch.zeros(rank, n), torch.zeros(m, rank)) for name, (m, n) in SHAPES.items()}

    assert method.client_rank(3, history(), 0) == 3
    assert method.client_rank(3, history(AggregationResult("hetlora", at(4))), 0) == 3
    # pruned to 2 in one round, then sitting a round out (its slot holds the global at 4): it stays at 2
    pruned = AggregationResult("hetlora", at(4), per_client=[at(2), at(4)])
    assert method.client_rank(4, history(pruned, AggregationResult("hetlora", at(4))), 0) == 2


def test_communication_counts_each_clients_rank_up_and_its_cut_down():
    received, updates = pruning_round(np.random.default_rng(7), [4, 2, 3], [(0.3, 0.3), (3.0, 3.0), (3.0, 3.0)])
    method = get_method("hetlora").configured({"prune": 0.5})
    result = method.aggregate(updates, [1 / 3] * 3, context=RoundContext(2, received))
    comm = round_communication(method, 2, updates, result)
    size = sum(m + n for m, n in SHAPES.values())  # one rank of every module: a column of B and a row of A
    # client 0 pruned to ⌊0.5 · 4⌋: it sends its leading 2 components, and gets the global cut to 2
    assert comm.upload_params == [2 * size, 2 * size, 3 * size]
    assert comm.download_params == [2 * size, 2 * size, 3 * size]
    assert comm.eff == pytest.approx(1 / (len(SHAPES) * (2 + 2 + 3) / 3))
    assert comm.residual == ""


def local_trainer(model, lr: float) -> LocalTrainer:
    train = TrainConfig(lr=lr, max_steps=2, batch_size=4, micro_batch_size=2)
    return LocalTrainer(model, pad_token_id=0, lora=LoraConfig(ranks=[4], dropout=0.0), train=train, dtype="float32")


def test_clients_train_and_upload_both_factors_starting_from_the_global_cut_to_their_rank():
    method = get_method("hetlora")
    assert method.scheme == "reinit"
    for round_number in (1, 2, 3):
        mode = method.mode(round_number)
        assert mode.trains == mode.uploads == method.downloads(round_number) == {"A", "B"}
        assert not mode.shared and not mode.keeps and not mode.core
    model, _ = tiny_llama(0, vocab_size=256)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": (ids := torch.randint(3, 200, (12,), generator=g).tolist()), "labels": ids} for _ in range(8)]

    def train(rank: int, lr: float, init=None) -> ClientUpdate:
        start = ClientStart(rank=rank, alpha=2 * rank, seed=rank, init=init)
        upload, _, _ = local_trainer(model, lr).train(data, start)
        for name, sent in upload.factors.items():
            assert sent.keys() == {"A", "B"} and sent["A"].shape[0] == sent["B"].shape[1] == rank, name
        modules = {n: LoraFactors(f["A"], f["B"], upload.scalings[n]) for n, f in upload.factors.items()}
        return ClientUpdate(modules, upload.num_examples)

    round_1 = method.aggregate([train(4, 1e-2), train(2, 1e-2)], [0.5, 0.5])
    cut = round_1.for_client(1)  # client 1 trains at rank 2
    unmoved, trained = train(2, 0.0, init=cut), train(2, 1e-2, init=cut)
    for name, start in cut.items():
        assert torch.equal(unmoved.modules[name].A, start.A.float())
        torch.testing.assert_close(unmoved.modules[name].B * unmoved.modules[name].scaling, start.B.float())
        assert not torch.allclose(trained.modules[name].A, start.A.float())
        assert not torch.allclose(trained.modules[name].B * trained.modules[name].scaling, start.B.float())


@pytest.mark.parametrize("prune", [1.0, 1.5])
def test_check_refuses_a_decay_of_one_or_more(prune):
    problem = get_method("hetlora").configured({"prune": prune}).check([4, 2], {"q": (6, 5)})
    assert "prune" in problem and "below 1" in problem and "\n" not in problem
    assert get_method("hetlora").configured({"prune": 0.99}).check([4, 2], {"q": (6, 5)}) == ""


@pytest.mark.parametrize(
    ("option", "value"),
    [("prune", "0.5"), ("prune", True), ("prune", -0.1), ("min_rank", 1.5), ("min_rank", "2"), ("min_rank", 0)],
)
def test_configured_refuses_a_value_of_the_wrong_kind_naming_the_option(option, value):
    with pytest.raises(ValueError, match=rf"option '{option}' of hetlora"):
        get_method("hetlora").configured({option: value})
