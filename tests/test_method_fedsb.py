"""Fed-SB: clients train only an r × r core R between frozen factors every client shares; averaging R is exact, and
r² numbers a module travel each way, however many clients there are."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_client import examples, trainer

import florist.client as client_module
from florist.aggregation import AggregationError, ClientUpdate, LoraFactors
from florist.client import CoreLinear, LocalTrainer, lora_layers, trained_factors
from florist.communication import round_communication
from florist.jobs import ClientStart, completed_factors, shared_factors
from florist.methods import aggregate, get_method
from florist.models import tiny_llama
from florist.server import Federation, RoundSettings, UpdateChecks

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
    draws = [federation._shared_factors(FEDSB, t, FEDSB.mode(t), 4)["q"] for t in (1, 2, 7)]
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
        ({"rnk": 8}, r"fedsb has no option 'rnk'; its options: rank"),
    ],
)
def test_bad_options_are_refused_in_one_line(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        FEDSB.configured(values)
