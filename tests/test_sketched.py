"""FLoRIST from two sums over the clients (florist.aggregation.sketched) against FLoRIST from the stacked pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from florist.aggregation import ClientUpdate, LoraFactors
from florist.aggregation.florist import thresholded
from florist.aggregation.sketched import (
    projection_share,
    range_basis,
    range_share,
    share_sizes,
    sketch,
    sketch_width,
    thresholded_from_sums,
)
from florist.aggregation.validate import normalized_weights

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

setups = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "ranks": st.lists(st.integers(1, 6), min_size=1, max_size=5),
        "m": st.integers(2, 24),
        "n": st.integers(2, 24),
        "mixed_scalings": st.booleans(),
        "oversampling": st.integers(0, 4),
    }
)


def updates_for(setup, dtype=torch.float64):
    g = torch.Generator().manual_seed(setup["seed"])
    out = []
    for k, r in enumerate(setup["ranks"]):
        s = 0.5 + k if setup["mixed_scalings"] else 2.0
        mods = {
            name: LoraFactors(
                torch.randn(r, setup["n"], generator=g, dtype=dtype),
                torch.randn(setup["m"], r, generator=g, dtype=dtype),
                s,
            )
            for name in ("q", "v")
        }
        out.append(ClientUpdate(mods, 10 * (k + 1), f"client {k}"))
    return out


def exact(updates, name, weights):
    return sum(w * u.modules[name].delta() for u, w in zip(updates, weights))


@SETTINGS
@given(setups, st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4))
def test_two_sums_give_florist_at_every_tau(setup, taus):
    updates = updates_for(setup)
    weights = normalized_weights(updates, None)
    private = thresholded_from_sums(updates, weights, taus, seed=setup["seed"], oversampling=setup["oversampling"])
    plain = thresholded(updates, weights, taus)
    for name in ("q", "v"):
        S = plain[max(taus)][name].singular_values
        energy = (S.square().cumsum(0) / S.square().sum()).tolist()
        assume(all(abs(e - t) > 1e-6 for e in energy for t in taus))  # a tie within rounding: either rank
        scale = float(exact(updates, name, weights).norm())
        for tau in taus:
            got, want = private[tau][name], plain[tau][name]
            assert got.rank == want.rank
            assert float((got.delta() - want.delta()).norm()) <= 1e-6 * scale
        r = min(got.singular_values.numel(), S.numel())
        torch.testing.assert_close(got.singular_values[:r], S[:r], rtol=1e-6, atol=1e-6 * float(S[0]))


def test_at_tau_one_the_two_sums_are_the_exact_update():
    setup = {"seed": 3, "ranks": [4, 2, 6], "m": 30, "n": 20, "mixed_scalings": True, "oversampling": 0}
    updates = updates_for(setup)
    weights = normalized_weights(updates, None)
    result = thresholded_from_sums(updates, weights, [1.0], seed=7)[1.0]
    for name in ("q", "v"):
        delta = exact(updates, name, weights)
        assert float((result[name].delta() - delta).norm() / delta.norm()) < 1e-12


def test_the_summed_shares_are_the_sketch_and_the_projection_of_the_update():
    setup = {"seed": 5, "ranks": [3, 5], "m": 12, "n": 9, "mixed_scalings": True, "oversampling": 2}
    updates = updates_for(setup)
    weights = normalized_weights(updates, None)
    pairs = [u.modules["q"] for u in updates]
    omega = sketch(11, "q", 9, sketch_width([3, 5], 12, 9, 2))
    delta = exact(updates, "q", weights)
    Y = sum(range_share(p, w, omega) for p, w in zip(pairs, weights))
    torch.testing.assert_close(Y, delta @ omega)
    Q = range_basis(Y)
    Z = sum(projection_share(p, w, Q) for p, w in zip(pairs, weights))
    torch.testing.assert_close(Z, Q.mT @ delta)
    torch.testing.assert_close(Q @ Z, delta)  # Q spans ΔW's columns: nothing of the update is lost


def test_every_client_draws_the_same_sketch_and_each_module_its_own():
    assert torch.equal(sketch(1, "layers.0.q", 8, 5), sketch(1, "layers.0.q", 8, 5))
    assert not torch.equal(sketch(1, "layers.0.q", 8, 5), sketch(1, "layers.0.v", 8, 5))
    assert not torch.equal(sketch(1, "layers.0.q", 8, 5), sketch(2, "layers.0.q", 8, 5))
    assert sketch(1, "q", 8, 5).dtype == torch.float64


def test_the_result_does_not_depend_on_the_sketch_drawn():
    setup = {"seed": 9, "ranks": [4, 4, 4], "m": 40, "n": 32, "mixed_scalings": False, "oversampling": 0}
    updates = updates_for(setup, dtype=torch.float32)
    weights = normalized_weights(updates, None)
    a = thresholded_from_sums(updates, weights, [0.8], seed=1)[0.8]["q"]
    b = thresholded_from_sums(updates, weights, [0.8], seed=2, oversampling=5)[0.8]["q"]
    assert a.rank == b.rank
    torch.testing.assert_close(a.delta(), b.delta(), rtol=1e-9, atol=1e-9 * float(a.singular_values[0]))


def test_sizes_of_the_shares_and_a_bad_oversampling():
    assert sketch_width([16] * 8, 4096, 4096, 4) == 132
    assert sketch_width([16] * 8, 4096, 64, 4) == 64  # never wider than ΔW's rank can be: min(m, n)
    assert sketch_width([4], 8, 8, 10**9) == 8  # so an absurd oversampling costs nothing
    assert share_sizes(4096, 4096, 128) == (4096 * 128, 128 * 4096)
    with pytest.raises(ValueError, match="oversampling"):
        sketch_width([4], 8, 8, -1)


def test_float32_inputs_count_components_at_float32_rounding_as_florist_does():
    g = torch.Generator().manual_seed(4)
    updates = []
    for k in range(3):  # one client's update is 1e-7 of the others': below float32's rounding of the sum
        scale = 1e-7 if k == 2 else 1.0
        mods = {"q": LoraFactors(torch.randn(2, 20, generator=g) * scale, torch.randn(30, 2, generator=g), 1.0)}
        updates.append(ClientUpdate(mods, 10))
    weights = normalized_weights(updates, None)
    private = thresholded_from_sums(updates, weights, [1.0], seed=0)[1.0]["q"]
    plain = thresholded(updates, weights, [1.0])[1.0]["q"]
    assert private.rank == plain.rank == 4
