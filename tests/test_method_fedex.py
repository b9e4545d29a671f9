"""FedEx-LoRA: the averaged adapter plus the residual is the exact weighted mean, as the paper's eqs. 12–14 give it;
clients train and send both factors; the residual's accounting follows the ``residual`` option alone; a branch keeps
every residual in the base and starts the next round from the averages (eqs. 15–16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from florist.aggregation import ClientUpdate, LoraFactors
from florist.client import LocalTrainer
from florist.communication import round_communication
from florist.config import LoraConfig, TrainConfig
from florist.jobs import ClientStart
from florist.methods import aggregate, get_method
from florist.models import tiny_llama
from florist.server import Branch, make_branches

SHAPES = {"q": (6, 5), "v": (4, 7)}  # module -> (m, n)


def random_updates(ranks, scalings, counts, seed) -> list[ClientUpdate]:
    """float64 factors: A_k r_k × n and B_k m × r_k per module, each client with its scaling and example count."""
    rng = np.random.default_rng(seed)
    return [
        ClientUpdate(
            {
                name: LoraFactors(
                    A=torch.from_numpy(rng.standard_normal((r, n))),
                    B=torch.from_numpy(rng.standard_normal((m, r))),
                    scaling=s,
                )
                for name, (m, n) in SHAPES.items()
            },
            num_examples=c,
            client_id=f"c{k}",
        )
        for k, (r, s, c) in enumerate(zip(ranks, scalings, counts))
    ]


def fedex_reference(updates, weights) -> dict[str, dict[str, np.ndarray]]:
    """Eqs. 12–14 in numpy float64, with data weights w_k for the paper's 1/k, each s_k inside its client's terms, and
    smaller ranks zero-padded to the largest (the paper has one rank and one s):

        B̄ = Σ w_k s_k B_k,  Ā = Σ w_k A_k,  ΔW_res = Σ w_k s_k B_k A_k − B̄ Ā,  exact = Σ w_k s_k B_k A_k.
    """
    out = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        r = max(f.rank for f in factors)
        m, n = factors[0].shape
        A_bar, B_bar, exact = np.zeros((r, n)), np.zeros((m, r)), np.zeros((m, n))
        for f, w in zip(factors, weights):
            A, sB = f.A.numpy(), f.scaling * f.B.numpy()
            A_bar[: f.rank] += w * A
            B_bar[:, : f.rank] += w * sB
            exact += w * sB @ A
        out[name] = {"A": A_bar, "B": B_bar, "residual": exact - B_bar @ A_bar, "exact": exact}
    return out


def assert_matches_reference(result, reference) -> None:
    for name, ref in reference.items():
        adapter = result.modules[name]
        residual = result.residual[name].delta().numpy() if result.residual is not None else 0.0
        np.testing.assert_allclose(adapter.A.numpy(), ref["A"], atol=1e-12)
        np.testing.assert_allclose(adapter.B.numpy(), ref["B"], atol=1e-12)
        np.testing.assert_allclose(residual, ref["residual"], atol=1e-10)
        np.testing.assert_allclose(adapter.delta().numpy() + residual, ref["exact"], atol=1e-10)


@st.composite
def federations(draw, equal_ranks: bool):
    k = draw(st.integers(2, 4))
    rank = draw(st.integers(2, 3))
    ranks = [rank] * k if equal_ranks else draw(st.lists(st.integers(2, 3), min_size=k, max_size=k))
    scalings = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=k, max_size=k))
    counts = draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    return ranks, scalings, counts, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("equal_ranks", [True, False], ids=["equal ranks", "heterogeneous ranks"])
def test_adapter_plus_residual_is_the_papers_exact_weighted_mean(equal_ranks):
    @settings(max_examples=25, deadline=None)
    @given(federations(equal_ranks), st.booleans())
    def check(federation, by_counts):
        ranks, scalings, counts, seed = federation
        updates = random_updates(ranks, scalings, counts, seed)
        if by_counts:  # the registry's front: validated updates, w_k = n_k / N
            weights = [c / sum(counts) for c in counts]
            result = aggregate("fedex", updates)
        else:
            raw = np.random.default_rng(seed + 1).random(len(ranks)) + 0.05
            weights = list(raw / raw.sum())
            result = get_method("fedex").aggregate(updates, weights)
        assert_matches_reference(result, fedex_reference(updates, weights))

    check()


def test_one_client_needs_no_residual():
    updates = random_updates([3], [2.0], [10], seed=4)
    result = aggregate("fedex", updates)
    assert_matches_reference(result, fedex_reference(updates, [1.0]))
    assert result.residual is None  # exact minus the average is zero: nothing to add, nothing to send
    for name, f in updates[0].modules.items():
        torch.testing.assert_close(result.modules[name].delta(), f.delta())


def test_residual_factors_have_rank_k_minus_1_times_r_below_the_papers_k_r():
    updates = random_updates([3, 2, 3, 3], [1.0, 2.0, 0.5, 1.0], [5, 9, 3, 7], seed=2)
    result = aggregate("fedex", updates)
    assert result.residual_dense  # the option's default: dense, as the authors' code sends it
    assert {name: m.rank for name, m in result.residual.items()} == {name: 3 * 3 for name in SHAPES}


@pytest.mark.parametrize("travels", ["dense", "factors"])
def test_download_adds_the_residual_as_the_option_says(travels):
    ranks = [2, 3, 3]
    updates = random_updates(ranks, [2.0, 1.0, 0.5], [4, 8, 6], seed=7)
    method = get_method("fedex").configured({"residual": travels})
    result = aggregate(method, updates)
    comm = round_communication(method, 1, updates, result)
    top, k = max(ranks), len(ranks)
    assert comm.upload_params == [sum(r * (m + n) for m, n in SHAPES.values()) for r in ranks]  # A_k and B_k up
    averages = sum(top * (m + n) for m, n in SHAPES.values())  # (B̄, Ā) down at the largest rank
    if travels == "dense":
        extra, extra_rank = sum(m * n for m, n in SHAPES.values()), sum(min(m, n) for m, n in SHAPES.values())
    else:
        extra, extra_rank = sum((k - 1) * top * (m + n) for m, n in SHAPES.values()), (k - 1) * top * len(SHAPES)
    assert comm.download_params == [averages + extra] * k
    assert comm.down_rank == top * len(SHAPES) + extra_rank
    assert comm.residual == travels and comm.to_dict()["residual"] == travels
    assert comm.download_bytes == [4 * p for p in comm.download_params]


def test_residual_option_changes_the_accounting_only():
    updates = random_updates([3, 2, 3], [1.0, 2.0, 1.0], [3, 5, 8], seed=11)
    dense = aggregate(get_method("fedex").configured({"residual": "dense"}), updates)
    factored = aggregate(get_method("fedex").configured({"residual": "factors"}), updates)
    assert dense.residual_dense and not factored.residual_dense
    for name in SHAPES:
        for one, other in ((dense.modules, factored.modules), (dense.residual, factored.residual)):
            assert torch.equal(one[name].A, other[name].A) and torch.equal(one[name].B, other[name].B)
    assert get_method("fedex").residual == "dense"  # configuring a copy leaves the registered method at its default


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"residual": "x"}, "option 'residual' of fedex must be one of dense, factors"),
        ({"rank": 4}, "no option 'rank'"),
    ],
)
def test_bad_residual_option_is_refused_naming_it(values, says):
    with pytest.raises(ValueError, match=says):
        get_method("fedex").configured(values)


def test_branch_keeps_every_residual_in_the_base_and_starts_from_the_averages():
    method = get_method("fedex")
    (branch,) = make_branches(["fedex"], scheme="merge")  # the paper fixes reinit whatever the run's scheme
    assert branch.scheme == "reinit" and Branch("fedex", method, scheme="reinit").model_deltas(0) == ()

    def adapters(deltas):
        return tuple(d.load() for d in deltas)

    updates = random_updates([2, 3], [1.0, 2.0], [4, 6], seed=1)
    first = aggregate(method, updates)
    branch.history.append(first)
    assert adapters(branch.base_deltas(1)) == (first.residual,)
    assert adapters(branch.model_deltas(1)) == (first.residual, first.modules)
    exact = fedex_reference(updates, [0.4, 0.6])
    for name in SHAPES:
        model = sum(d[name].delta() for d in adapters(branch.model_deltas(0)))
        np.testing.assert_allclose(model.numpy(), exact[name]["exact"], atol=1e-10)
    second = aggregate(method, random_updates([3, 3], [1.0, 1.0], [5, 5], seed=2))
    branch.history.append(second)  # eq. 16: W0 keeps accumulating residuals round after round
    assert adapters(branch.base_deltas(0)) == (first.residual, second.residual)
    assert adapters(branch.model_deltas(0)) == (first.residual, second.residual, second.modules)


def examples(n: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def trained(start: ClientStart, lr: float = 1e-2):
    model, _ = tiny_llama(0, vocab_size=256)
    trainer = LocalTrainer(
        model,
        pad_token_id=0,
        lora=LoraConfig(ranks=[start.rank], dropout=0.0),
        train=TrainConfig(lr=lr, max_steps=2, batch_size=4, micro_batch_size=2),
        dtype="float32",
    )
    upload, _, kept = trainer.train(examples(), start, client_id="c0")
    return upload, kept


def test_clients_train_and_upload_both_factors_from_a_fresh_start_then_from_the_averages():
    method = get_method("fedex")
    fresh = ClientStart(rank=4, alpha=8, seed=1, mode=method.mode(1))
    start_factors, _ = trained(fresh, lr=0.0)  # lr 0: the factors as the start left them
    first, kept = trained(fresh)
    assert kept == {name: {} for name in first.factors}
    for name, f in first.factors.items():
        assert set(f) == {"A", "B"}
        assert not torch.equal(f["A"], start_factors.factors[name]["A"]) and f["B"].abs().sum() > 0

    update = ClientUpdate(
        {n: LoraFactors(f["A"], f["B"], first.scalings[n]) for n, f in first.factors.items()}, num_examples=8
    )
    averages = aggregate(method, [update]).modules
    again = ClientStart(rank=4, alpha=8, seed=2, mode=method.mode(2), init=averages)
    (held, _), (second, _) = trained(again, lr=0.0), trained(again)
    for name, f in second.factors.items():
        assert set(f) == {"A", "B"}
        torch.testing.assert_close(held.factors[name]["A"], averages[name].A)  # the start is (B̄, Ā)
        torch.testing.assert_close(held.factors[name]["B"] * held.scalings[name], averages[name].B)
        assert not torch.equal(f["A"], averages[name].A)
        assert not torch.equal(f["B"], averages[name].B / second.scalings[name])
