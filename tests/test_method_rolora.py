"""RoLoRA: odd rounds train and average B under a common A, even rounds A under a common B (the paper's eqs. 3–4),
so the global pair is the exact weighted mean in every round; one factor travels each way a round; the rule needs
the round and refuses a client whose frozen factor is not the common one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import florist.client as client_module
from florist.aggregation import AggregationError, ClientUpdate, LoraFactors
from florist.client import LocalTrainer
from florist.communication import round_communication
from florist.config import LoraConfig, TrainConfig
from florist.jobs import ClientStart, completed_factors, shared_factors
from florist.methods import RoundContext, aggregate, get_method
from florist.models import tiny_llama

SHAPES = {"q": (6, 5), "v": (4, 7)}  # module -> (m, n)
ROLORA = get_method("rolora")


def phase(round_number: int) -> str:
    """The factor a round trains: the paper's odd rounds B (B first: with B = 0 an A round learns nothing), even A."""
    return "B" if round_number % 2 else "A"


def round_updates(round_number, ranks, scalings, counts, seed) -> tuple[list[ClientUpdate], dict]:
    """float64 updates of one round and the common factor: in a B round every client holds the leading r_k rows of
    one A and its own B_k; in an A round the leading r_k columns of one (scaling-folded) B, as B_k = B[:, :r_k] / s_k,
    and its own A_k."""
    rng = np.random.default_rng(seed)
    top, common, updates = max(ranks), {}, []
    for name, (m, n) in SHAPES.items():
        common[name] = rng.standard_normal((top, n) if phase(round_number) == "B" else (m, top))
    for k, (r, s, c) in enumerate(zip(ranks, scalings, counts)):
        modules = {}
        for name, (m, n) in SHAPES.items():
            if phase(round_number) == "B":
                A, B = common[name][:r], rng.standard_normal((m, r))
            else:
                A, B = rng.standard_normal((r, n)), common[name][:, :r] / s
            modules[name] = LoraFactors(torch.from_numpy(A.copy()), torch.from_numpy(B.copy()), scaling=s)
        updates.append(ClientUpdate(modules, num_examples=c, client_id=f"c{k}"))
    return updates, common


def rolora_reference(updates, weights, round_number) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Eqs. 3–4 in numpy float64, with data weights w_k for the paper's 1/N, each s_k folded into its B, and smaller
    ranks zero-padded (the paper has one rank): B rounds B ← Σ w_k s_k B_k with A kept, A rounds A ← Σ w_k A_k with
    B kept. Returns per module (A, B) of the global pair, scaling folded into B."""
    out = {}
    for name in updates[0].modules:
        factors = [u.modules[name] for u in updates]
        widest = max(factors, key=lambda f: f.rank)
        A, B = widest.A.numpy().copy(), widest.scaling * widest.B.numpy()
        if phase(round_number) == "B":
            B = np.zeros_like(B)
            for f, w in zip(factors, weights):
                B[:, : f.rank] += w * f.scaling * f.B.numpy()
        else:
            A = np.zeros_like(A)
            for f, w in zip(factors, weights):
                A[: f.rank] += w * f.A.numpy()
        out[name] = (A, B)
    return out


def exact_mean(updates, weights, name) -> np.ndarray:
    return sum(w * u.modules[name].delta().numpy() for u, w in zip(updates, weights))


def context(round_number: int, clients: int) -> RoundContext:
    return RoundContext(round_number, [None] * clients)


@st.composite
def federations(draw, equal_ranks: bool):
    k = draw(st.integers(1, 4))
    rank = draw(st.integers(2, 3))
    ranks = [rank] * k if equal_ranks else draw(st.lists(st.integers(2, 3), min_size=k, max_size=k))
    scalings = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=k, max_size=k))
    raw = draw(st.lists(st.integers(1, 60), min_size=k, max_size=k))
    return ranks, scalings, [w / sum(raw) for w in raw], draw(st.integers(0, 2**16))


@pytest.mark.parametrize("round_number", [1, 2, 3, 4])
@pytest.mark.parametrize("equal_ranks", [True, False], ids=["equal ranks", "heterogeneous ranks"])
def test_global_pair_is_the_papers_average_of_the_trained_factor_and_exact(round_number, equal_ranks):
    @settings(max_examples=25, deadline=None)
    @given(federations(equal_ranks))
    def check(federation):
        ranks, scalings, weights, seed = federation
        updates, common = round_updates(round_number, ranks, scalings, [1] * len(ranks), seed)
        result = ROLORA.aggregate(updates, weights, context=context(round_number, len(updates)))
        for name, (A, B) in rolora_reference(updates, weights, round_number).items():
            got = result.modules[name]
            np.testing.assert_allclose(got.A.numpy(), A, atol=1e-12)
            np.testing.assert_allclose(got.B.numpy(), B, atol=1e-12)
            np.testing.assert_allclose(got.delta().numpy(), exact_mean(updates, weights, name), atol=1e-10)
            kept = got.A if phase(round_number) == "B" else got.B
            np.testing.assert_allclose(kept.numpy(), common[name], rtol=1e-15)  # the frozen factor is kept

    check()


@pytest.mark.parametrize("round_number", [1, 2, 3])
def test_without_the_round_the_factor_that_differs_is_the_one_averaged(round_number):
    updates, _ = round_updates(round_number, [2, 3], [1.0, 2.0], [3, 4], seed=0)
    weights = [3 / 7, 4 / 7]
    with_round = ROLORA.aggregate(updates, weights, context=context(round_number, 2))
    alone = ROLORA.aggregate(updates, weights, context=None)  # florist aggregate's front has no round to give
    for name in with_round.modules:
        assert torch.equal(alone.modules[name].A, with_round.modules[name].A)
        assert torch.equal(alone.modules[name].B, with_round.modules[name].B)


def test_without_the_round_clients_sharing_no_factor_are_refused():
    updates = [
        ClientUpdate(
            {"v": LoraFactors(torch.randn(2, 5, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64))}, 3
        )
        for _ in range(2)
    ]
    with pytest.raises(AggregationError, match="^rolora: neither A nor B is the same on every client"):
        aggregate("rolora", updates)


def test_a_round_refuses_a_client_holding_another_b_naming_it():
    updates, _ = round_updates(2, [3, 2, 3], [1.0, 2.0, 1.0], [3, 4, 5], seed=1)
    stray = updates[1].modules["v"]
    modules = {**updates[1].modules, "v": LoraFactors(stray.A, stray.B + 1e-3, stray.scaling)}
    updates[1] = ClientUpdate(modules, 4, "c1")
    with pytest.raises(AggregationError, match="^rolora, module v: c1 holds another B than the global one$"):
        ROLORA.aggregate(updates, [0.2, 0.3, 0.5], context=context(2, 3))


def test_b_round_refuses_a_client_holding_another_a_naming_it():
    updates, _ = round_updates(3, [3, 3, 2], [1.0, 1.0, 1.0], [3, 4, 5], seed=2)
    stray = updates[2].modules["q"]
    updates[2] = ClientUpdate({**updates[2].modules, "q": LoraFactors(stray.A * 1.01, stray.B)}, 5, "c2")
    with pytest.raises(AggregationError, match="^c2, module q: a shared frozen A is needed"):
        ROLORA.aggregate(updates, [0.2, 0.3, 0.5], context=context(3, 3))


@pytest.mark.parametrize("round_number", [1, 2, 3])
def test_one_factor_travels_each_way_half_of_fedits_rank(round_number):
    ranks = [2, 3, 3]
    updates, _ = round_updates(round_number, ranks, [2.0, 1.0, 2.0], [4, 5, 6], seed=3)
    result = ROLORA.aggregate(updates, [0.2, 0.3, 0.5], context=context(round_number, 3))
    comm = round_communication(ROLORA, round_number, updates, result)
    size = (lambda r, m, n: m * r) if phase(round_number) == "B" else (lambda r, m, n: r * n)
    assert comm.upload_params == [sum(size(r, m, n) for m, n in SHAPES.values()) for r in ranks]
    assert comm.download_params == [sum(size(3, m, n) for m, n in SHAPES.values())] * 3
    # The paper's cost: half of LoRA's a round, so Eff twice FedIT's on the same modules and ranks
    fedit = get_method("fedit")
    fedit_comm = round_communication(fedit, round_number, updates, aggregate(fedit, updates))
    assert comm.down_rank == 0.5 * 3 * len(SHAPES) and comm.eff == pytest.approx(2 * fedit_comm.eff)
    assert comm.residual == ""


def test_modes_alternate_b_first_under_one_shared_a():
    first, second, third = ROLORA.mode(1), ROLORA.mode(2), ROLORA.mode(3)
    assert (first.trains, first.shared, first.uploads) == ({"B"}, {"A"}, {"B"})
    assert (second.trains, second.shared, second.uploads) == ({"A"}, set(), {"A"})
    assert (third.trains, third.shared, third.uploads) == ({"B"}, set(), {"B"})
    assert [ROLORA.downloads(t) for t in (1, 2, 3, 4)] == [{"B"}, {"A"}, {"B"}, {"A"}]
    assert ROLORA.scheme == "reinit" and not first.keeps | second.keeps | third.keeps


def examples(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


class HeldFactors:
    """Records every factor a client's LoRA layers hold after training, as the trainer reads them to upload."""

    def __init__(self, read):
        self.read, self.seen = read, []

    def __call__(self, model):
        factors, scalings = self.read(model)
        self.seen.append(factors)
        return factors, scalings


def check_client(trains: str, r: int, after: dict, global_module, shared_a, s: float) -> None:
    """Round 1: A is the shared draw cut to rank r and B moved off zero; later: the frozen factor is the global one
    (B unscaled), the trained one moved off its global start."""
    if global_module is None:
        torch.testing.assert_close(after["A"], shared_a[:r], rtol=0, atol=0)
        assert after["B"].abs().sum() > 0
        return
    start_of = {"A": global_module.A[:r], "B": global_module.B[:, :r] / s}
    frozen = "A" if trains == "B" else "B"
    torch.testing.assert_close(after[frozen], start_of[frozen], rtol=0, atol=0)
    assert not torch.equal(after[trains], start_of[trains])


def test_real_clients_train_the_rounds_factor_only_and_the_global_pair_stays_exact(monkeypatch):
    """Two clients of ranks 2 and 4 through rounds 1–3 on the tiny model: what each holds after training, what it
    uploads, and the global pair the server makes of the completed uploads."""
    model, _ = tiny_llama(0, vocab_size=256)
    adapted = [(name, mod) for name, mod in model.named_modules() if name.endswith(("q_proj", "v_proj"))]
    shapes = {name: tuple(mod.weight.shape) for name, mod in adapted}
    held = HeldFactors(client_module.trained_factors)
    monkeypatch.setattr(client_module, "trained_factors", held)
    ranks, data = (2, 4), (examples(8, 0), examples(5, 1))
    weights = [len(d) / 13 for d in data]
    trainer = LocalTrainer(
        model,
        pad_token_id=0,
        lora=LoraConfig(ranks=list(ranks), dropout=0.0),
        train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=2),
        dtype="float32",
    )
    shared_a = shared_factors(shapes, ROLORA.mode(1), max(ranks), seed=5)
    global_pair = None
    for round_number in (1, 2, 3):
        mode, trains = ROLORA.mode(round_number), phase(round_number)
        updates = []
        for k, (r, d) in enumerate(zip(ranks, data)):
            shared = shared_a if mode.shared else None
            start = ClientStart(r, 2.0 * r, 10 * round_number + k, mode, init=global_pair, shared=shared)
            upload, _, _ = trainer.train(d, start, client_id=f"c{k}")
            for name, factors in upload.factors.items():
                assert set(factors) == {trains}
                g = None if global_pair is None else global_pair[name]
                check_client(trains, r, held.seen[-1][name], g, shared_a[name]["A"], upload.scalings[name])
            modules = {
                n: completed_factors(start, n, f, upload.scalings[n], shapes[n]) for n, f in upload.factors.items()
            }
            updates.append(ClientUpdate(modules, len(d), f"c{k}"))
        result = ROLORA.aggregate(updates, weights, context=RoundContext(round_number, [global_pair] * 2))
        for name in shapes:
            exact = sum(w * u.modules[name].delta() for u, w in zip(updates, weights))
            torch.testing.assert_close(result.modules[name].delta(), exact, rtol=1e-5, atol=1e-7)
            if global_pair is not None:  # B rounds keep A, A rounds keep B
                kept = (lambda a: a.A) if trains == "B" else (lambda a: a.B)
                torch.testing.assert_close(kept(result.modules[name]), kept(global_pair[name]))
        global_pair = result.modules
    assert len(held.seen) == 6  # every training was seen
