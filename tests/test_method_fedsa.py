"""FedSA-LoRA: clients train A and B, share only A and keep their own B; the server averages A, the global adapter
is (Ā, 0) and each client's personalised adapter is Ā with its own s_k B_k."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_client import examples, trainer
from test_method_fedsb import record_factors, three_clients

from florist.aggregation import AggregationError, ClientUpdate, LoraFactors, ModuleAggregate
from florist.communication import round_communication
from florist.jobs import ClientStart, completed_factors
from florist.methods import aggregate, get_method
from florist.models import tiny_llama

MODULES = {"q": (6, 5), "v": (4, 5)}  # (m, n)
FEDSA = get_method("fedsa")


def fedsa_round(seed: int, ranks, scalings, counts=None):
    """Each client's float64 A_k (r_k × n) and B_k (m × r_k) per module, and the updates carrying them."""
    rng = np.random.default_rng(seed)
    pairs = [
        {name: (rng.standard_normal((r, n)), rng.standard_normal((m, r))) for name, (m, n) in MODULES.items()}
        for r in ranks
    ]
    updates = [
        ClientUpdate(
            {name: LoraFactors(A=torch.tensor(A), B=torch.tensor(B), scaling=s) for name, (A, B) in p.items()},
            counts[k] if counts else 10,
            f"client {k}",
        )
        for k, (p, s) in enumerate(zip(pairs, scalings))
    ]
    return pairs, updates


def assert_shared_a_and_own_b(result, pairs, ranks, scalings, weights):
    """The paper's rule, Ā = Σ_k w_k A_k, with each row the mean over the clients that hold it where ranks differ;
    no B is averaged."""
    r_max = max(ranks)
    for name, (m, n) in MODULES.items():
        A_bar, held = np.zeros((r_max, n)), np.zeros(r_max)
        for p, r, w in zip(pairs, ranks, weights):
            A_bar[:r] += w * p[name][0]
            held[:r] += w
        A_bar /= held[:, None]
        shared = result.modules[name]
        np.testing.assert_allclose(shared.A.numpy(), A_bar, rtol=1e-12, atol=1e-14)
        assert torch.equal(shared.B, torch.zeros(m, r_max, dtype=shared.B.dtype))  # no global B: the base model
        for k, (p, r, s) in enumerate(zip(pairs, ranks, scalings)):
            own = result.for_client(k)[name]
            np.testing.assert_allclose(own.A.numpy(), A_bar[:r], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(own.delta().numpy(), s * p[name][1] @ A_bar[:r], rtol=1e-12, atol=1e-14)


@three_clients
def test_a_is_the_data_weighted_mean_and_each_client_keeps_its_own_b(seed, ranks, scalings, counts):
    pairs, updates = fedsa_round(seed, ranks, scalings, counts)
    result = aggregate("fedsa", updates)
    assert result.residual is None and len(result.per_client) == 3
    assert_shared_a_and_own_b(result, pairs, ranks, scalings, np.array(counts) / sum(counts))


def test_explicit_weights_replace_the_example_counts():
    ranks, scalings, weights = [3, 2, 3], [2.0, 2.0, 0.5], [0.6, 0.1, 0.3]
    pairs, updates = fedsa_round(3, ranks, scalings)
    result = FEDSA.aggregate(updates, weights)
    assert result.weights == weights
    assert_shared_a_and_own_b(result, pairs, ranks, scalings, weights)


def test_server_completes_an_unreported_b_as_zero_and_a_reported_one_as_sent():
    (m, n), r = MODULES["q"], 3
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(r, n, generator=g), torch.randn(m, r, generator=g)
    known = {"q": ModuleAggregate(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g))}
    for report_kept, sent, expected_B in [(False, {"A": A}, torch.zeros(m, r)), (True, {"A": A, "B": B}, B)]:
        start = ClientStart(rank=r, alpha=2.0 * r, seed=0, mode=FEDSA.mode(2), init=known, report_kept=report_kept)
        pair = completed_factors(start, "q", sent, 2.0, (m, n))
        assert torch.equal(pair.A, A) and pair.scaling == 2.0
        assert torch.equal(pair.B, expected_B)  # never the global adapter's B: B is the client's own


def test_client_trains_both_uploads_a_and_starts_its_next_round_from_its_own_b(monkeypatch):
    seen = record_factors(monkeypatch)
    model, _ = tiny_llama(0, vocab_size=256)
    local = trainer(model, "float32")
    mode = FEDSA.mode(1)
    uploads, kept, starts = [], [], []
    for k, report_kept in enumerate([False, True]):  # round 1: fresh LoRAs
        starts.append(ClientStart(rank=4, alpha=8.0, seed=1 + k, mode=mode, report_kept=report_kept))
        upload, _, keeps = local.train(examples(seed=k), starts[-1])
        uploads.append(upload)
        kept.append(keeps)
        for name, final in seen["final"].items():
            assert seen["trains"][name] == {"A", "B"}
            assert torch.equal(seen["initial"][name]["B"], torch.zeros_like(final["B"]))
            assert not torch.equal(final["A"], seen["initial"][name]["A"]) and final["B"].abs().sum() > 0
            assert set(upload.factors[name]) == ({"A", "B"} if report_kept else {"A"})
            assert torch.equal(upload.factors[name]["A"], final["A"])
            assert set(keeps[name]) == {"B"} and torch.equal(keeps[name]["B"], final["B"])
    shapes = {name: (f["B"].shape[0], f["A"].shape[1]) for name, f in seen["final"].items()}
    updates = [
        ClientUpdate(
            {name: completed_factors(s, name, u.factors[name], u.scalings[name], shapes[name]) for name in shapes}, 12
        )
        for s, u in zip(starts, uploads)
    ]
    result = aggregate("fedsa", updates)

    # round 2, client 0 (it did not report B, so the server's adapter for it has a zero B): Ā and its own B
    start = ClientStart(rank=4, alpha=8.0, seed=3, mode=FEDSA.mode(2), init=result.for_client(0), keep_from="fedsa")
    _, _, keeps = local.train(examples(seed=0), start, kept=kept[0])
    for name in shapes:
        initial, final = seen["initial"][name], seen["final"][name]
        assert torch.equal(initial["A"], result.modules[name].A)
        assert torch.equal(initial["B"], kept[0][name]["B"])
        assert not torch.equal(final["B"], kept[0][name]["B"]) and torch.equal(keeps[name]["B"], final["B"])


def test_traffic_counts_only_a_each_way_at_each_clients_rank():
    ranks = [2, 3, 3]
    _, updates = fedsa_round(4, ranks, [2.0] * 3)  # the B beside each A (report_kept) is no traffic
    traffic = round_communication(FEDSA, 2, updates, aggregate("fedsa", updates))
    a_params = [sum(r * n for _, n in MODULES.values()) for r in ranks]
    assert traffic.upload_params == a_params
    assert traffic.download_params == a_params
    assert traffic.download_bytes == [4 * p for p in a_params]
    assert traffic.residual == ""


def test_every_round_trains_a_and_b_and_keeps_b():
    for t in (1, 2, 5):
        mode = FEDSA.mode(t)
        assert mode.trains == {"A", "B"} and mode.keeps == {"B"} and not mode.shared and not mode.core
        assert mode.uploads == {"A"} and FEDSA.downloads(t) == {"A"}


def test_options_are_refused_naming_that_fedsa_has_none():
    with pytest.raises(ValueError, match=r"^fedsa has no option 'rank'; its options: none$"):
        FEDSA.configured({"rank": 8})


def test_a_client_whose_a_has_another_width_is_named():
    _, updates = fedsa_round(5, [3, 3, 3], [1.0] * 3)
    own = updates[2].modules["v"]
    wider = dict(updates[2].modules, v=LoraFactors(A=torch.zeros(3, 7, dtype=own.A.dtype), B=own.B))
    updates[2] = ClientUpdate(wider, 10, "client 2")
    with pytest.raises(AggregationError, match=r"^client 2, module v: adapts a 4x7 weight"):
        aggregate("fedsa", updates)


def test_round_one_clients_start_from_one_common_draw_of_a():
    """Two clients with their own seeds but the round's common init seed start from the same A (lr 0: nothing
    moves), as the paper's clients start from the server's model; without it each draws its own."""
    model, _ = tiny_llama(0, vocab_size=256)
    still = trainer(model, "float32")
    still.train_config = dataclasses.replace(still.train_config, lr=0.0)
    mode = get_method("fedsa").mode(1)
    assert mode.common_init
    starts = [ClientStart(4, 8.0, seed, mode=mode, report_kept=True, init_seed=99) for seed in (1, 2)]
    uploads = [still.train(examples(), start)[0] for start in starts]
    for name in uploads[0].factors:
        assert torch.equal(uploads[0].factors[name]["A"], uploads[1].factors[name]["A"])
    own = [still.train(examples(), dataclasses.replace(start, init_seed=None))[0] for start in starts]
    assert not torch.equal(own[0].factors[name]["A"], own[1].factors[name]["A"])


def test_the_common_draw_is_nested_across_ranks_and_differs_by_module():
    """A client of a smaller rank starts from the leading rows of a larger client's common A (so averaging a row of
    A averages like with like), at PEFT's init scale, U(-1/sqrt(n), 1/sqrt(n))."""
    from florist.jobs import common_a

    big, small = common_a(7, "layers.0.q_proj", 8, 40), common_a(7, "layers.0.q_proj", 3, 40)
    assert torch.equal(big[:3], small)
    assert not torch.equal(common_a(7, "layers.0.v_proj", 3, 40), small)
    assert not torch.equal(common_a(8, "layers.0.q_proj", 3, 40), small)
    assert big.abs().max() <= 1 / np.sqrt(40) and big.abs().max() > 0.8 / np.sqrt(40)


def test_heterogeneous_clients_of_one_round_start_from_one_nested_draw():
    """Clients of ranks 2 and 4 with their own seeds: the rank-2 client's starting A is the rank-4 client's leading
    rows (lr 0: nothing moves)."""
    model, _ = tiny_llama(0, vocab_size=256)
    still = trainer(model, "float32")
    still.train_config = dataclasses.replace(still.train_config, lr=0.0)
    mode = get_method("fedsa").mode(1)
    starts = [ClientStart(r, 2.0 * r, seed, mode=mode, init_seed=99) for r, seed in ((2, 1), (4, 2))]
    small, big = (still.train(examples(), start)[0] for start in starts)
    for name in small.factors:
        assert torch.equal(small.factors[name]["A"], big.factors[name]["A"][:2])


def test_a_row_held_only_by_a_client_of_weight_zero_stays_zero():
    pairs, updates = fedsa_round(3, [2, 3], [1.0, 1.0])
    result = aggregate("fedsa", updates, weights=[1.0, 0.0])
    for name in MODULES:
        A = result.modules[name].A
        assert torch.isfinite(A).all() and torch.equal(A[2], torch.zeros_like(A[2]))
        np.testing.assert_allclose(A[:2].numpy(), pairs[0][name][0], rtol=1e-12)
