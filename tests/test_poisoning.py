"""One client cannot poison the others: numbers that are finite but huge, in any dtype, are screened as the server
will compute with them, and no aggregation ever hands out a NaN or an Inf.

A hostile pair here is an honest one with its scaling and factors multiplied by powers of ten (scalings up to 1e300,
factors from 1e-150 to 1e150, B possibly all zero), among honest clients of mixed dtypes (float16, bfloat16,
float32, float64). Every call ends in a finite result or in an ``AggregationError`` that names the hostile client
(or, for a result, the method and module); an honest client is never the one named, first or last in the round.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from florist.aggregation import (
    AggregationError,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    ModuleAggregate,
    asked_scalings,
    check_result,
    prepare,
    screen_updates,
)
from florist.aggregation.validate import normalized_weights
from florist.jobs import ClientReply, ClientUpload, RoundReplies, TrainingLog, seed_for, shared_factors
from florist.methods import METHODS, aggregate, get_method
from florist.server import Federation, RoundFailed, RoundHooks, RoundSettings, UpdateChecks, make_branches

POISON = settings(
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the same inputs on every run: a failure is a bug to fix, never a flake
    max_examples=60,
)
SHAPES = {"q": (6, 5), "v": (4, 5)}
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
HONEST_SCALING = 2.0  # alpha = 2 r, so alpha / r
HOSTILE = "client h"


def honest_update(seed: int, rank: int, dtype: torch.dtype, name: str, shared_a: dict | None = None) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for module, (m, n) in SHAPES.items():
        fresh = (torch.rand(rank, n, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(n)  # PEFT's init
        A = shared_a[module][:rank] if shared_a else fresh
        modules[module] = LoraFactors(
            A=A.to(dtype),
            B=(0.1 * torch.randn(m, rank, generator=g, dtype=torch.float64)).to(dtype),
            scaling=HONEST_SCALING,
        )
    return ClientUpdate(modules, 10 + seed % 7, name)


def scaled(t: torch.Tensor, exponent: int, dtype: torch.dtype) -> torch.Tensor:
    """``t * 10**exponent`` in ``dtype``, or in float64 where ``dtype`` cannot hold it (the hostile keeps it finite)."""
    exact = t.double() * 10.0**exponent
    cast = exact.to(dtype)
    return cast if torch.isfinite(cast).all() and (cast != 0).sum() == (exact != 0).sum() else exact


@st.composite
def poisonings(draw):
    """(exponents of scaling, B and A, B all zero): finite but huge, tiny, or balanced so that the product is fine."""
    kind = draw(st.sampled_from(["any", "balanced", "zero B", "scaling only"]))
    s = draw(st.integers(-300, 300) | st.sampled_from([38, 39, 40, 300, -38, -45]))
    b = draw(st.integers(-150, 150))
    a = -b if kind == "balanced" else draw(st.integers(-150, 150))
    if kind == "scaling only":
        a = b = 0
    return s, b, a, kind == "zero B" or draw(st.integers(0, 9)) == 0


def poisoned(update: ClientUpdate, exponents, dtype: torch.dtype, frozen_a: bool = False) -> ClientUpdate:
    s, b, a, zero_b = exponents
    modules = {}
    for module, f in update.modules.items():
        B = scaled(f.B, b, dtype)
        modules[module] = LoraFactors(
            A=f.A if frozen_a else scaled(f.A, a, dtype), B=B * 0 if zero_b else B, scaling=f.scaling * 10.0**s
        )
    return ClientUpdate(modules, update.num_examples, HOSTILE)


@st.composite
def rounds(draw, frozen_a: bool = False):
    """Honest updates of mixed dtypes and ranks, and a hostile one placed first or last."""
    # FFA's shared A, exact in every dtype (bfloat16's), so that each client holds the very same A
    shared = (
        {
            n: (torch.rand(4, k, generator=torch.Generator().manual_seed(1)) - 0.5).bfloat16().double()
            for n, (_, k) in SHAPES.items()
        }
        if frozen_a
        else None
    )
    honest = [
        honest_update(
            draw(st.integers(0, 2**16)), draw(st.integers(1, 4)), draw(st.sampled_from(DTYPES)), f"client {k}", shared
        )
        for k in range(draw(st.integers(1, 3)))
    ]
    exponents = draw(poisonings())
    base = honest_update(
        draw(st.integers(0, 2**16)),
        4 if frozen_a else draw(st.integers(1, 4)),
        draw(st.sampled_from(DTYPES)),
        HOSTILE,
        shared,
    )
    hostile = poisoned(base, exponents, draw(st.sampled_from(DTYPES)), frozen_a)
    first = draw(st.booleans())
    event(f"hostile {'first' if first else 'last'}")
    return ([hostile, *honest] if first else [*honest, hostile]), honest


def assert_finite(result: AggregationResult) -> None:
    for adapter in [result.modules, *(result.per_client or [])]:
        for name, m in adapter.items():
            for t in (m.A, m.B, m.singular_values):
                assert t is None or bool(torch.isfinite(t.float()).all()), (result.method, name)


def assert_names_the_hostile(e: AggregationError) -> None:
    message = str(e)
    assert message.startswith(f"{HOSTILE}, module ") and "\n" not in message, message
    event(f"refused: {message.split(': ', 1)[1][:24]}")


@POISON
@given(data=rounds(), method=st.sampled_from(sorted(set(METHODS) - {"ffa"})))
def test_aggregate_is_finite_or_names_the_hostile_client(data, method):
    updates, _ = data
    try:
        result = aggregate(method, updates)
    except AggregationError as e:
        assert_names_the_hostile(e)
    else:
        assert_finite(result)
        event("aggregated")


@POISON
@given(data=rounds(frozen_a=True))
def test_ffa_is_finite_or_names_the_hostile_client(data):
    updates, _ = data
    try:
        result = aggregate("ffa", updates)
    except AggregationError as e:
        assert_names_the_hostile(e)
    else:
        assert_finite(result)


@POISON
@given(data=rounds(), taus=st.lists(st.sampled_from([0.5, 0.9, 1.0]), min_size=1, max_size=3, unique=True))
def test_prepare_passes_only_what_every_method_and_the_sweep_keep_finite(data, taus):
    updates, _ = data
    try:
        prepared, weights = prepare(updates, max_norm=1e6)
    except AggregationError as e:
        assert_names_the_hostile(e)
        return
    for method in ("fedit", "flora", "flexlora"):
        assert_finite(METHODS[method].aggregate(prepared, weights))
    for result in METHODS["florist"].aggregate_sweep(prepared, weights, taus).values():
        assert_finite(result)


@POISON
@given(data=rounds(), max_norm=st.sampled_from([0.0, 10.0, 1e6]))
def test_screening_keeps_every_honest_client_and_leaves_the_hostile_out_or_harmless(data, max_norm):
    updates, honest = data
    accepted, rejected = screen_updates(
        updates, SHAPES, max_ranks=[4] * len(updates), scalings=[(HONEST_SCALING,)] * len(updates), max_norm=max_norm
    )
    assert [updates[k].client_id for k in rejected] in ([], [HOSTILE])
    assert all(reason.startswith(f"{HOSTILE}, module ") for reason in rejected.values())
    kept = [updates[k] for k in accepted]
    for method in ("fedit", "flora", "florist", "flexlora"):
        assert_finite(aggregate(method, kept))
    if rejected:
        event("hostile left out")
        for a, b in zip(aggregate("flora", kept).modules.values(), aggregate("flora", honest).modules.values()):
            assert torch.equal(a.B @ a.A, b.B @ b.A)


@POISON
@given(data=rounds())
def test_sweep_over_unchecked_updates_is_finite_or_names_the_method(data):
    """The sweep trusts its caller to have prepared the updates; handed hostile ones, its results as the server
    checks them (``check_result``) still hand out no NaN."""
    updates, _ = data
    as_float32 = [
        ClientUpdate(
            {n: LoraFactors(f.A.float(), f.B.float(), f.scaling) for n, f in u.modules.items()},
            u.num_examples,
            u.client_id,
        )
        for u in updates
    ]
    weights = normalized_weights(as_float32, None)
    try:
        results = [
            check_result(r) for r in METHODS["florist"].aggregate_sweep(as_float32, weights, [0.9, 1.0]).values()
        ]
    except AggregationError as e:
        assert str(e).startswith("florist, module ") and "\n" not in str(e), str(e)
        return
    for result in results:
        assert_finite(result)


# --- what the server knows it asked for ------------------------------------------------------------------------------


def test_the_asked_scaling_follows_peft():
    assert asked_scalings(8.0, 4, False) == (2.0,)
    assert asked_scalings(8.0, 4, True) == (4.0,)
    assert asked_scalings(8.0, 4, None) == (2.0, 4.0)
    assert asked_scalings(8.0, 1, None) == (8.0,)  # r = 1: the two rules agree


@pytest.mark.parametrize(
    "scaling, accepted",
    [
        (2.0, True),
        (2.0 * (1 + 1e-9), True),
        (2.0000002, True),
        (2.1, False),
        (4.0, False),
        (1e40, False),
        (1e-300, False),
    ],
)
def test_a_scaling_other_than_the_asked_one_is_refused(scaling, accepted):
    update = honest_update(3, 2, torch.float32, "client 0")
    update = ClientUpdate({n: LoraFactors(f.A, f.B, scaling) for n, f in update.modules.items()}, 5, "client 0")
    kept, rejected = screen_updates([update], SHAPES, scalings=[asked_scalings(4.0, 2, False)])
    assert (kept == [0]) == accepted
    if not accepted:
        assert rejected[0].startswith("client 0, module q: scaling") and "the job's lora_alpha and rank" in rejected[0]


def test_the_norm_bound_measures_the_update_as_the_server_computes_it():
    """1e40 with an all-zero B is a zero update in exact arithmetic but NaN in float32; 1e150 and 1e-150 are a fine
    product but overflow when folded in float32: both refused, with or without a bound, and named."""
    honest = honest_update(4, 2, torch.float32, "client 0")
    f = honest.modules["q"]
    cases = {
        "scaling": LoraFactors(f.A, torch.zeros_like(f.B), 1e40),
        "||s B||": LoraFactors(f.A.double() * 1e-150, f.B.double() * 1e150, 2.0),
    }
    for max_norm in (0.0, 1e3):
        for what, pair in cases.items():
            hostile = ClientUpdate({**honest.modules, "q": pair}, 5, HOSTILE)
            with pytest.raises(AggregationError, match=rf"^{HOSTILE}, module q: {re.escape(what)}"):
                prepare([hostile, honest], max_norm=max_norm)
            kept, rejected = screen_updates([hostile, honest], SHAPES, max_norm=max_norm)
            assert kept == [1] and rejected[0].startswith(f"{HOSTILE}, module q: {what}")


def test_example_counts_too_large_to_sum_still_weigh_the_clients():
    updates = [honest_update(k, 2, torch.float32, f"client {k}") for k in range(3)]
    updates = [ClientUpdate(u.modules, n, u.client_id) for u, n in zip(updates, [1e308, 1e308, 1])]
    assert normalized_weights(updates, None) == pytest.approx([0.5, 0.5, 0.0])
    assert_finite(aggregate("fedit", updates))


def test_the_modules_most_clients_adapt_are_the_reference_even_when_the_odd_one_is_first():
    honest = [honest_update(k, 2, torch.float32, f"client {k}") for k in range(2)]
    odd = ClientUpdate({**honest[0].modules, "q": LoraFactors(torch.ones(2, 7), torch.ones(6, 2))}, 5, HOSTILE)
    extra = ClientUpdate({**honest[0].modules, "k": honest[0].modules["q"]}, 5, HOSTILE)
    for hostile, reason in ((odd, "adapts a 6x7 weight, most clients 6x5"), (extra, "has an extra module")):
        for updates in ([hostile, *honest], [*honest, hostile]):
            with pytest.raises(AggregationError, match=rf"^{HOSTILE}, module [qk]: {reason}"):
                aggregate("flora", updates)


# --- the output check ------------------------------------------------------------------------------------------------


def pair(**changes) -> ModuleAggregate:
    return ModuleAggregate(**{"A": torch.ones(2, 5), "B": torch.ones(6, 2), "singular_values": None, **changes})


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"A": torch.full((2, 5), math.nan)}, "global adapter has A"),
        ({"B": torch.full((6, 2), math.inf, dtype=torch.float64)}, "global adapter has B"),
        ({"B": torch.full((6, 2), 1e39, dtype=torch.float64)}, "global adapter has B"),  # finite, but not in float32
        ({"singular_values": torch.tensor([1.0, math.nan])}, "global adapter has singular values"),
    ],
)
def test_a_result_with_nan_or_inf_anywhere_is_refused_naming_method_and_module(bad, where):
    with pytest.raises(AggregationError, match=rf"^flexlora, module v: the aggregated {where}"):
        check_result(AggregationResult("flexlora", {"q": pair(), "v": pair(**bad)}))
    per_client = [{"q": pair(), "v": pair()}, {"q": pair(**bad), "v": pair()}]
    with pytest.raises(AggregationError, match=r"^flexlora, module q: the aggregated adapter for client 1 has"):
        check_result(AggregationResult("flexlora", {"q": pair(), "v": pair()}, per_client=per_client))
    ok = AggregationResult("flexlora", {"q": pair(), "v": pair()}, per_client=[{"q": pair(), "v": pair()}])
    assert check_result(ok) is ok


@pytest.mark.parametrize("method", ["florist", "flexlora"])
def test_a_failed_decomposition_is_an_aggregation_error_naming_the_module(method, monkeypatch):
    def fails(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    for decomposition in ("svd", "eigh", "qr"):  # whichever route the method takes
        monkeypatch.setattr(torch.linalg, decomposition, fails)
    updates = [honest_update(k, 2, torch.float32, f"client {k}") for k in range(2)]
    with pytest.raises(AggregationError, match=rf"^{method}, module q: the decomposition failed \(linalg.svd"):
        aggregate(method, updates)


# --- a server round --------------------------------------------------------------------------------------------------

RANKS = [2, 4, 3, 4]
SEED = 0
FFA_MODE = get_method("ffa").mode(1)
FROZEN = {n: f["A"] for n, f in shared_factors(SHAPES, FFA_MODE, max(RANKS), seed_for(SEED, "shared", 1)).items()}


class ScriptedEngine:
    """Honest uploads from each job (its rank, its alpha, the shared frozen A it is sent, the factors its mode
    uploads), the ``hostile`` client's tampered and sent whole (A too, whatever its mode uploads).
    ``sent[(client, frozen)]`` keeps each client's pair, per training group (with or without a shared A)."""

    def __init__(self, hostile: int, tamper):
        self.hostile, self.tamper, self.sent = hostile, tamper, {}

    def train(self, round_number, jobs):
        replies = RoundReplies()
        for job in jobs:
            start, g = job.start, torch.Generator().manual_seed(100 * round_number + job.client)
            modules = {}
            for n, (m, k) in SHAPES.items():
                fresh = torch.randn(start.rank, k, generator=g)
                A = start.shared[n]["A"][: start.rank].clone() if start.shared else fresh
                modules[n] = LoraFactors(A, 0.1 * torch.randn(m, start.rank, generator=g), start.alpha / start.rank)
            update = ClientUpdate(modules, 10 + job.client, "")
            uploads = start.mode.uploads
            if job.client == self.hostile:
                update, uploads = self.tamper(update), {"A", "B"}
            self.sent[job.client, start.shared is not None] = update
            upload = ClientUpload(
                {n: {x: getattr(f, x) for x in uploads} for n, f in update.modules.items()},
                {n: f.scaling for n, f in update.modules.items()},
                update.num_examples,
            )
            replies.replies.append(ClientReply(job.client, upload, TrainingLog(), group=job.group))
        return replies


def federation(engine, methods, max_update_norm=0.0, on_round=lambda *a: None):
    return Federation(
        engine,
        make_branches(methods, [0.5, 1.0]),
        RoundSettings(ranks=RANKS, alpha_per_rank=2.0, scheme="reinit", seed=SEED),
        UpdateChecks(SHAPES, max_update_norm=max_update_norm),
        RoundHooks(on_round=on_round, log=lambda message: None),
    )


def each_pair(update: ClientUpdate, change) -> ClientUpdate:
    return ClientUpdate({n: change(f) for n, f in update.modules.items()}, update.num_examples, update.client_id)


TAMPERINGS = {
    "huge scaling, zero B": (lambda f: LoraFactors(f.A, torch.zeros_like(f.B), 1e40), "scaling 1e+40"),
    "float64 1e150 and 1e-150": (
        lambda f: LoraFactors(f.A.double() * 1e-150, f.B.double() * 1e150, f.scaling),
        "||s B||",
    ),
    "another scaling": (lambda f: LoraFactors(f.A, f.B, 4 * f.scaling), "scaling"),
    "float16 over the bound": (lambda f: LoraFactors(f.A.half(), (f.B * 1e3).half(), f.scaling), "update norm"),
    "another A under FFA": (lambda f: LoraFactors(f.A * 1e20, f.B, f.scaling), None),  # the server keeps its own A
}


# the methods whose clients upload a pair, or B under a shared A, as this script's clients do
PAIR_METHODS = sorted(m for m in METHODS if not METHODS[m].mode(1).core and not METHODS[m].mode(1).keeps)


@pytest.mark.parametrize("hostile", [0, len(RANKS) - 1])
@pytest.mark.parametrize("tampering", sorted(TAMPERINGS))
def test_a_round_with_one_poisoning_client_gives_the_honest_clients_aggregate(tampering, hostile):
    change, reason = TAMPERINGS[tampering]
    engine = ScriptedEngine(hostile, lambda u: each_pair(u, change))
    methods = ["ffa"] if reason is None else PAIR_METHODS
    fed = federation(engine, methods, max_update_norm=100.0)
    records = fed.run_round(1)
    honest = [k for k in range(len(RANKS)) if k != hostile or reason is None]
    for record in records:
        assert record.participants == honest
        assert list(record.rejected) == ([] if reason is None else [str(hostile)])
        assert all(why.startswith(f"client {hostile}, module q: {reason}") for why in record.rejected.values())
    for b in fed.branches:
        frozen = "A" not in b.method.mode(1).uploads  # under FFA the server's A counts, whatever a client sent
        updates = []
        for k in honest:
            sent = engine.sent[k, frozen]
            updates.append(
                ClientUpdate(
                    {
                        n: LoraFactors(FROZEN[n][: f.rank] if frozen else f.A, f.B, f.scaling)
                        for n, f in sent.modules.items()
                    },
                    sent.num_examples,
                    f"client {k}",
                )
            )
        prepared, weights = prepare(updates)
        expected = b.method.aggregate_sweep(prepared, weights, [b.value])[b.value]
        for name, m in b.history.last.modules.items():
            assert torch.equal(m.A, expected.modules[name].A), (b.label, name)
            assert torch.equal(m.B, expected.modules[name].B), (b.label, name)
            assert torch.isfinite(m.B).all() and torch.isfinite(m.A).all()


def test_rescaled_factors_that_would_blow_up_fedit_fail_the_round_and_keep_nothing():
    """(c B, A / c) has the product of (B, A) and passes every per-client check, but FedIT multiplies c B with the
    other clients' A: with a norm bound set the aggregate is refused, and nothing of the round is kept."""
    rounds_written = []
    engine = ScriptedEngine(0, lambda u: each_pair(u, lambda f: LoraFactors(f.A * 1e-12, f.B * 1e12, f.scaling)))
    fed = federation(engine, ["fedit", "flora"], max_update_norm=100.0, on_round=lambda *a: rounds_written.append(a))
    with pytest.raises(RoundFailed, match=r"round 1: fedit, module [qv]: the aggregated global adapter has norm"):
        fed.run_round(1)
    assert rounds_written == [] and all(not b.history for b in fed.branches)
