"""The five aggregation rules against the exact federated update ΔW = Σ_k w_k s_k B_k A_k."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from florist.aggregation import AggregationError, ClientUpdate, LoraFactors, energy_rank, stacked_svd
from florist.aggregation.florist import thresholded
from florist.aggregation.validate import normalized_weights
from florist.methods import METHODS, aggregate, get_method

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_updates(
    seed, ranks, m, n, scalings=None, counts=None, modules=("q", "v"), dtype=torch.float64, shared_a=False
):
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    shared = {name: torch.randn(r_max, n, generator=g, dtype=dtype) for name in modules}
    updates = []
    for k, r in enumerate(ranks):
        s = scalings[k] if scalings else 2.0
        mods = {}
        for name in modules:
            A = shared[name][:r].clone() if shared_a else torch.randn(r, n, generator=g, dtype=dtype)
            mods[name] = LoraFactors(A=A, B=torch.randn(m, r, generator=g, dtype=dtype), scaling=s)
        updates.append(ClientUpdate(mods, counts[k] if counts else 10 * (k + 1), f"client {k}"))
    return updates


def exact_delta(updates, name, weights=None):
    w = normalized_weights(updates, weights)
    return sum(wk * u.modules[name].delta() for u, wk in zip(updates, w))


def best_rank(delta, p):
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return (U[:, :p] * S[:p]) @ Vh[:p], S


def rel_err(a, b):
    return float((a - b).norm() / max(b.norm(), 1e-300))


client_setups = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "ranks": st.lists(st.integers(1, 6), min_size=1, max_size=5),
        "m": st.integers(2, 24),
        "n": st.integers(2, 24),
        "alpha_scale": st.sampled_from(["equal", "mixed"]),
    }
)


def build(setup, **kw):
    ranks = setup["ranks"]
    scalings = [2.0] * len(ranks) if setup["alpha_scale"] == "equal" else [0.5 + k for k in range(len(ranks))]
    return make_updates(setup["seed"], ranks, setup["m"], setup["n"], scalings=scalings, **kw)


@SETTINGS
@given(client_setups)
def test_florist_at_threshold_one_is_exact(setup):
    updates = build(setup)
    result = aggregate("florist", updates, value=1.0)
    for name in ("q", "v"):
        assert rel_err(result.modules[name].delta(), exact_delta(updates, name)) < 1e-10


@SETTINGS
@given(client_setups, st.floats(0.05, 1.0))
def test_florist_is_best_rank_p_and_picks_the_dense_rank(setup, tau):
    updates = build(setup)
    result = aggregate("florist", updates, value=tau)
    for name in ("q", "v"):
        delta = exact_delta(updates, name)
        module = result.modules[name]
        best, S_dense = best_rank(delta, module.rank)
        energy = (S_dense.square().cumsum(0) / S_dense.square().sum()).tolist()
        # a tie within round-off of tau could go either way on either route
        assume(all(abs(e - tau) > 1e-9 for e in energy))
        assert module.rank == energy_rank(S_dense, tau)
        assert rel_err(module.delta(), best) < 1e-8
        r = module.singular_values.numel()
        torch.testing.assert_close(module.singular_values, S_dense[:r], rtol=1e-9, atol=1e-9 * float(S_dense[0]))


@SETTINGS
@given(client_setups)
def test_flora_stacks_exactly(setup):
    updates = build(setup)
    result = aggregate("flora", updates)
    for name in ("q", "v"):
        assert result.modules[name].rank == sum(setup["ranks"])
        assert rel_err(result.modules[name].delta(), exact_delta(updates, name)) < 1e-12


@SETTINGS
@given(client_setups)
def test_fedit_is_exact_only_for_identical_clients(setup):
    one = build(setup)[0]
    clones = [ClientUpdate(one.modules, 5 + k, f"client {k}") for k in range(3)]
    same = aggregate("fedit", clones)
    assert rel_err(same.modules["q"].delta(), exact_delta(clones, "q")) < 1e-12


def test_fedit_differs_from_exact_update_when_clients_differ():
    updates = make_updates(0, [4, 4, 4], 16, 12)
    result = aggregate("fedit", updates)
    assert rel_err(result.modules["q"].delta(), exact_delta(updates, "q")) > 0.1


def test_fedit_zero_pads_heterogeneous_ranks():
    updates = make_updates(1, [6, 2, 4], 10, 8)
    module = aggregate("fedit", updates).modules["q"]
    w = normalized_weights(updates, None)
    assert module.rank == 6
    expected_A = sum(
        wk * torch.nn.functional.pad(u.modules["q"].A, (0, 0, 0, 6 - u.modules["q"].rank)) for u, wk in zip(updates, w)
    )
    torch.testing.assert_close(module.A, expected_A)


@SETTINGS
@given(client_setups)
def test_ffa_is_exact_with_a_shared_frozen_a(setup):
    updates = build(setup, shared_a=True)
    result = aggregate("ffa", updates)
    for name in ("q", "v"):
        assert result.modules[name].rank == max(setup["ranks"])
        assert rel_err(result.modules[name].delta(), exact_delta(updates, name)) < 1e-12


def test_ffa_refuses_clients_whose_a_differ():
    updates = make_updates(2, [4, 4], 8, 8, shared_a=True)
    bad = dict(updates[1].modules)
    bad["v"] = LoraFactors(A=bad["v"].A + 1e-3, B=bad["v"].B, scaling=2.0)
    updates[1] = ClientUpdate(bad, 3, "hospital-b")
    with pytest.raises(AggregationError, match=r"hospital-b, module v: .*frozen A"):
        aggregate("ffa", updates)


@SETTINGS
@given(client_setups)
def test_flexlora_gives_each_client_its_own_best_truncation(setup):
    updates = build(setup)
    result = aggregate("flexlora", updates)
    for name in ("q", "v"):
        delta = exact_delta(updates, name)
        for k, r in enumerate(setup["ranks"]):
            module = result.for_client(k)[name]
            assert module.rank == min(r, min(setup["m"], setup["n"]))
            assert rel_err(module.delta(), best_rank(delta, r)[0]) < 1e-8


@SETTINGS
@given(client_setups, st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4))
def test_sweep_matches_separate_runs(setup, taus):
    updates = build(setup)
    weights = normalized_weights(updates, None)
    swept = thresholded(updates, weights, taus)
    results = get_method("florist").aggregate_sweep(updates, weights, taus)
    for tau in taus:
        alone = aggregate("florist", updates, value=tau)
        for name in ("q", "v"):
            for adapter in (swept[tau], results[tau].modules):
                assert torch.equal(adapter[name].B, alone.modules[name].B)
                assert torch.equal(adapter[name].A, alone.modules[name].A)


def shares_a(method: str) -> bool:
    """Whether the method's clients hold one shared A (FFA-LoRA, RoLoRA's first round, Fed-SB)."""
    return "A" in METHODS[method].mode(1).shared


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_method_is_deterministic_and_keeps_dtype(method, dtype):
    runs = [
        aggregate(method, make_updates(3, [4, 2, 3], 12, 10, dtype=dtype, shared_a=shares_a(method))) for _ in range(2)
    ]
    for name in ("q", "v"):
        a, b = runs[0].modules[name], runs[1].modules[name]
        assert a.B.dtype == dtype and torch.equal(a.B, b.B) and torch.equal(a.A, b.A)


def test_float32_is_accurate_to_single_precision():
    updates = make_updates(4, [16] * 8, 256, 192, dtype=torch.float32)
    result = aggregate("florist", updates, value=1.0)
    assert rel_err(result.modules["q"].delta().double(), exact_delta(updates, "q").double()) < 1e-5


def test_bfloat16_inputs_are_computed_in_float32():
    updates = make_updates(5, [4, 4], 16, 16, dtype=torch.bfloat16)
    result = aggregate("florist", updates, value=1.0)
    assert result.modules["q"].B.dtype == torch.float32


def test_florist_never_forms_the_dense_update():
    # a 200000 x 200000 float32 update would need 160 GB; the stacked route needs a few MB
    g = torch.Generator().manual_seed(0)
    big = 200_000
    updates = [
        ClientUpdate({"w": LoraFactors(torch.randn(2, big, generator=g), torch.randn(big, 2, generator=g))}, 1)
        for _ in range(3)
    ]
    module = aggregate("florist", updates, value=1.0).modules["w"]
    assert module.rank == 6 and module.B.shape == (big, 6) and module.A.shape == (6, big)


def test_singular_values_go_to_b_and_a_is_orthonormal():
    module = aggregate("florist", make_updates(6, [3, 5], 20, 15), value=0.9).modules["q"]
    eye = torch.eye(module.rank, dtype=module.A.dtype)
    torch.testing.assert_close(module.A @ module.A.T, eye)
    torch.testing.assert_close(module.B.norm(dim=0), module.singular_values[: module.rank])


def test_stacked_svd_signs_match_a_canonicalised_dense_svd():
    from florist.aggregation.svd import canonical_signs

    g = torch.Generator().manual_seed(7)
    B, A = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(5, 25, generator=g, dtype=torch.float64)
    U, S, Vh = stacked_svd(B, A)
    Ud, Sd, Vhd = canonical_signs(*torch.linalg.svd(B @ A, full_matrices=False))
    torch.testing.assert_close(U, Ud[:, :5])
    torch.testing.assert_close(Vh, Vhd[:5])


# --- the float32 route: Gram matrices in float64, batched over modules of one shape ----------------------------------

# stacks that are hard for a Gram route: clients that start from one A (florist's first round), a stack of more rows
# than A has columns (rank-deficient), a client whose B is zero, and one client sent twice
float32_setups = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "ranks": st.lists(st.integers(1, 8), min_size=1, max_size=5),
        "m": st.integers(2, 40),
        "n": st.integers(2, 40),
        "kind": st.sampled_from(["random", "common start", "zero client", "duplicate", "rescaled client"]),
    }
)


def float32_updates(setup):
    updates = make_updates(setup["seed"], setup["ranks"], setup["m"], setup["n"], dtype=torch.float32)
    kind, g = setup["kind"], torch.Generator().manual_seed(setup["seed"])
    if kind == "common start":  # A_k = A_0[:r_k] + a small step: the stack's A is nearly rank max(r_k)
        start = {name: torch.randn(max(setup["ranks"]), setup["n"], generator=g) for name in ("q", "v")}
        updates = [
            ClientUpdate(
                {
                    name: LoraFactors(start[name][: f.rank] + 1e-3 * f.A, 1e-2 * f.B, f.scaling)
                    for name, f in u.modules.items()
                },
                u.num_examples,
                u.client_id,
            )
            for u in updates
        ]
    elif kind == "zero client":
        updates[0] = ClientUpdate(
            {name: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for name, f in updates[0].modules.items()},
            updates[0].num_examples,
            updates[0].client_id,
        )
    elif kind == "duplicate":
        updates = updates + [ClientUpdate(updates[0].modules, updates[0].num_examples, "copy")]
    elif kind == "rescaled client":  # the same update as (1e7 B, 1e-7 A): a valid pair the Gram route must not drop
        updates[0] = ClientUpdate(
            {name: LoraFactors(f.A * 1e-7, f.B * 1e7, f.scaling) for name, f in updates[0].modules.items()},
            updates[0].num_examples,
            updates[0].client_id,
        )
    return updates


def float64_reference(updates, name):
    """The exact update's SVD in float64, from float64 copies of the factors."""
    as64 = [
        ClientUpdate({k: LoraFactors(f.A.double(), f.B.double(), f.scaling) for k, f in u.modules.items()}, 1)
        for u in updates
    ]
    return torch.linalg.svd(exact_delta(as64, name, weights=[u.num_examples for u in updates]), full_matrices=False)


@SETTINGS
@given(float32_setups, st.floats(0.05, 1.0))
def test_float32_route_matches_a_float64_reference(setup, tau):
    """Ranks, spectra and the kept pair as a float64 SVD of the exact update gives them, to float32's precision,
    however ill-conditioned or rank-deficient the stacks are."""
    updates = float32_updates(setup)
    result = aggregate("florist", updates, value=tau)
    for name in ("q", "v"):
        module = result.modules[name]
        assert module.B.dtype == torch.float32 and module.A.dtype == torch.float32
        U, S, Vh = float64_reference(updates, name)
        top = float(S[0])
        tol = 1e-5 * max(top, 1e-30)
        r = module.singular_values.numel()
        assert r == min(setup["m"], setup["n"], sum(f.rank for f in (u.modules[name] for u in updates)))
        assert (module.singular_values.double() - S[:r]).abs().max() <= tol
        if top == 0:
            continue
        energy = S.square().cumsum(0) / S.square().sum()
        assume(all(abs(e - tau) > 1e-4 for e in energy.tolist()))  # a tie within float32's rounding: either way
        counted = int((S > 1e-4 * top).sum())  # components a float32 route can tell from round-off
        assume(all(abs(e - 1.0) > 1e-4 or i + 1 >= counted for i, e in enumerate(energy.tolist())))
        p = module.rank
        best = (U[:, :p] * S[:p]) @ Vh[:p]
        assert (module.delta().double() - best).norm() <= 1e-5 * S.norm()
        eye = torch.eye(p, dtype=torch.float64)
        assert (module.A.double() @ module.A.double().T - eye).abs().max() < 1e-5


def assert_sweep_is_each_tau_alone(updates, taus):
    swept = get_method("florist").aggregate_sweep(updates, normalized_weights(updates, None), taus)
    for tau in taus:
        alone = aggregate("florist", updates, value=tau)
        for name in ("q", "v"):
            assert torch.equal(swept[tau].modules[name].B, alone.modules[name].B)
            assert torch.equal(swept[tau].modules[name].A, alone.modules[name].A)
    return swept


@SETTINGS
@given(float32_setups, st.lists(st.floats(0.05, 1.0), min_size=1, max_size=4))
def test_float32_sweep_matches_separate_runs_bit_for_bit(setup, taus):
    assert_sweep_is_each_tau_alone(float32_updates(setup), taus)


def test_float32_sweep_across_vector_blocks_matches_separate_runs_bit_for_bit():
    updates = make_updates(11, [16] * 6, 80, 70, dtype=torch.float32)  # R = 96: the kept vectors span two blocks
    swept = assert_sweep_is_each_tau_alone(updates, [0.3, 0.7, 0.95, 1.0])
    assert swept[1.0].modules["q"].rank > 64 > swept[0.3].modules["q"].rank


def test_an_all_zero_update_keeps_an_orthonormal_a_on_every_route():
    for dtype in (torch.float32, torch.float64):
        updates = make_updates(12, [3, 2], 10, 8, dtype=dtype)
        updates = [
            ClientUpdate({k: LoraFactors(f.A, torch.zeros_like(f.B), f.scaling) for k, f in u.modules.items()}, 1)
            for u in updates
        ]
        module = aggregate("florist", updates, value=0.9).modules["q"]
        assert module.rank == 1 and float(module.B.abs().max()) == 0.0
        torch.testing.assert_close(module.A @ module.A.T, torch.eye(1, dtype=dtype))  # a direction to train from


def test_half_precision_stacks_are_decomposed_in_float32():
    g = torch.Generator().manual_seed(13)
    B, A = torch.randn(40, 128, generator=g), torch.randn(128, 50, generator=g)
    U, S, Vh = stacked_svd(B.bfloat16(), A.bfloat16())
    assert S.dtype == torch.float32 and float(S[0]) > 0
    want = B.bfloat16().double() @ A.bfloat16().double()
    assert float(((U * S) @ Vh - want).norm() / want.norm()) < 1e-5


def test_modules_of_one_shape_are_batched_and_others_apart():
    from florist.aggregation.stacking import same_shape_batches

    g = torch.Generator().manual_seed(0)

    def pair(m, n, r):
        return LoraFactors(torch.randn(r, n, generator=g), torch.randn(m, r, generator=g))

    shapes = {"q0": (8, 6), "v0": (4, 6), "q1": (8, 6), "v1": (4, 6), "q2": (8, 6)}
    updates = [ClientUpdate({k: pair(*mn, 2) for k, mn in shapes.items()}, 1) for _ in range(3)]
    assert list(same_shape_batches(updates)) == [["q0", "q1", "q2"], ["v0", "v1"]]
    # a module one client trains at another rank stacks to another shape
    updates[1] = ClientUpdate({**updates[1].modules, "q1": pair(8, 6, 3)}, 1)
    assert list(same_shape_batches(updates)) == [["q0", "q2"], ["v0", "v1"], ["q1"]]
    # the byte cap cuts a group, one module at the least
    two_v = 2 * (4 + 6) * 6 * 4  # bytes of two v stacks (float32, rank 6), less than two q stacks
    assert list(same_shape_batches(updates, max_bytes=two_v)) == [["q0"], ["q2"], ["v0", "v1"], ["q1"]]
    assert list(same_shape_batches(updates, max_bytes=1)) == [["q0"], ["q2"], ["v0"], ["v1"], ["q1"]]


def test_a_batched_module_equals_the_module_aggregated_alone():
    updates = make_updates(9, [4, 6, 2], 30, 20, modules=("a", "b", "c"), dtype=torch.float32)
    together = aggregate("florist", updates, value=0.8)
    for name in ("a", "b", "c"):
        alone = aggregate(
            "florist", [ClientUpdate({name: u.modules[name]}, u.num_examples) for u in updates], value=0.8
        )
        got, want = together.modules[name], alone.modules[name]
        assert got.rank == want.rank
        torch.testing.assert_close(got.delta(), want.delta(), rtol=1e-5, atol=1e-5 * float(want.singular_values[0]))


@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30), st.floats(1e-3, 1.0))
def test_energy_rank_is_the_smallest_rank_reaching_tau(values, tau):
    S = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    p = energy_rank(S, tau)
    energy = S.square().cumsum(0) / S.square().sum()
    assert 1 <= p <= len(values)
    assert energy[p - 1] >= tau - 1e-12 or p == len(values)
    assert p == 1 or energy[p - 2] < tau
    assert energy_rank(S, min(1.0, tau + 0.1)) >= p


def test_energy_rank_ignores_round_off_at_threshold_one():
    S = torch.tensor([3.0, 2.0, 1.0, 1e-18, 1e-19], dtype=torch.float64)
    assert energy_rank(S, 1.0) == 3
    assert energy_rank(torch.zeros(4), 0.5) == 1


# --- bad input: a one-line error naming the client and the module -------------------------------------------------


def _replace(updates, k, name, **changes):
    mods = dict(updates[k].modules)
    old = mods[name]
    mods[name] = LoraFactors(**{"A": old.A, "B": old.B, "scaling": old.scaling, **changes})
    updates[k] = ClientUpdate(mods, updates[k].num_examples, updates[k].client_id)
    return updates


@pytest.mark.parametrize(
    "corrupt, pattern",
    [
        (
            lambda u: _replace(u, 1, "v", A=torch.full_like(u[1].modules["v"].A, math.nan)),
            r"client 1, module v: A contains NaN",
        ),
        (
            lambda u: _replace(u, 2, "q", B=torch.full_like(u[2].modules["q"].B, math.inf)),
            r"client 2, module q: B contains NaN or Inf",
        ),
        (
            lambda u: _replace(u, 1, "q", B=torch.randn(9, 4, dtype=torch.float64)),
            r"client 1, module q: adapts a 9x8 weight",
        ),
        (
            lambda u: _replace(u, 0, "v", B=torch.randn(8, 3, dtype=torch.float64)),
            r"client 0, module v: B is \(8, 3\) but A is \(4, 8\)",
        ),
        (lambda u: _replace(u, 1, "q", scaling=float("nan")), r"client 1, module q: scaling nan"),
        (
            lambda u: _replace(u, 1, "q", A=torch.ones(4, 8, dtype=torch.int64)),
            r"client 1, module q: A has dtype torch.int64",
        ),
        (lambda u: [u[0], ClientUpdate({"q": u[1].modules["q"]}, 1, "client 1"), u[2]], r"client 1, module v: lacks"),
        (
            lambda u: [u[0], ClientUpdate({**u[1].modules, "k": u[1].modules["q"]}, 1, "client 1"), u[2]],
            r"client 1, module k: has an extra",
        ),
        (lambda u: [], r"no client updates"),
    ],
)
def test_bad_updates_are_named(corrupt, pattern):
    updates = corrupt(make_updates(8, [4, 4, 4], 8, 8))
    with pytest.raises(AggregationError, match=pattern):
        aggregate("fedit", updates)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.01, float("nan")])
def test_threshold_outside_unit_interval_is_refused(tau):
    with pytest.raises(ValueError, match="threshold must be in"):
        aggregate("florist", make_updates(0, [2, 2], 4, 4), value=tau)


@pytest.mark.parametrize(
    "weights, pattern",
    [
        ([1.0], r"1 weights given for 2 clients"),
        ([1.0, -1.0], r"client 1: weight -1.0"),
        ([0, 0], r"sum to zero"),
        ([1.0, float("inf")], r"client 1: weight inf"),
    ],
)
def test_weights_that_do_not_fit_are_refused(weights, pattern):
    with pytest.raises(AggregationError, match=pattern):
        aggregate("flora", make_updates(0, [2, 2], 4, 4), weights=weights)


def test_explicit_weights_override_example_counts():
    updates = make_updates(9, [3, 3], 6, 6, counts=[1, 1000])
    result = aggregate("flora", updates, weights=[1, 1])
    torch.testing.assert_close(result.modules["q"].delta(), exact_delta(updates, "q", [1, 1]))


def test_unknown_method_lists_the_choices():
    with pytest.raises(AggregationError, match="fedit, flora, flexlora, ffa, .*florist"):
        get_method("fedavg")
