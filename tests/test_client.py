"""Local training: the shared base comes back untouched, batches cover every example, the CPU attention switch
changes speed only, not what a client learns, nor does the fused loss, and the fast LoRA dropout is an unbiased,
seeded dropout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaMLP

import florist.client as client_module
import florist.loss as loss_module
from florist.client import FastDropout, LocalTrainer, length_grouped_batches
from florist.config import LoraConfig, TrainConfig
from florist.jobs import ClientStart
from florist.loss import LinearCrossEntropy
from florist.models import tiny_llama


def examples(n: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": ids, "labels": ids})
    return out


def trainer(model, dtype: str) -> LocalTrainer:
    return LocalTrainer(
        model,
        pad_token_id=0,
        lora=LoraConfig(ranks=[4], dropout=0.0),
        train=TrainConfig(lr=1e-2, max_steps=3, batch_size=4, micro_batch_size=2),
        dtype=dtype,
    )


def delta(factors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One module's uploaded B @ A (scaling left out: both sides of every comparison share it)."""
    return factors["B"] @ factors["A"]


def test_training_leaves_the_shared_base_as_it_was():
    model, _ = tiny_llama(0, vocab_size=256)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    upload, log, _ = trainer(model, "float32").train(examples(), ClientStart(rank=4, alpha=8, seed=1), client_id="c0")
    assert log.steps == 3 and len(log.losses) == 3 and upload.num_examples == 12
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {f["B"].abs().sum().item() > 0 for f in upload.factors.values()} == {True}  # B moved off its zero init


def test_bf16_attention_switch_is_restored_and_learns_the_same(monkeypatch):
    model, _ = tiny_llama(0, vocab_size=256)
    model.set_attn_implementation("sdpa")
    seen = []
    original = model.set_attn_implementation
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl: (seen.append(impl), original(impl)))

    eager, eager_log, _ = trainer(model, "bfloat16").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert "eager" in seen and model.config._attn_implementation == "sdpa"  # switched for training, then restored

    seen.clear()
    monkeypatch.setattr(client_module, "EAGER_ATTENTION_BUDGET", 0)  # nothing fits: SDPA throughout
    sdpa, sdpa_log, _ = trainer(model, "bfloat16").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert "eager" not in seen
    # The same losses and updates up to bfloat16 rounding. Eager attention rounds the probabilities to bfloat16
    # before multiplying by V, and Adam magnifies that in modules whose gradients are tiny (this random model's
    # deeper queries), so updates are compared loosely; a wrong mask or position would change the losses.
    assert eager_log.losses == pytest.approx(sdpa_log.losses, rel=1e-3)
    for name, f in eager.factors.items():
        delta_eager, delta_sdpa = delta(f), delta(sdpa.factors[name])
        assert (delta_eager - delta_sdpa).norm() <= 0.25 * delta_sdpa.norm(), name


def test_training_with_the_fused_loss_learns_what_the_models_own_loss_teaches(monkeypatch):
    model, _ = tiny_llama(0, vocab_size=256)
    calls = []
    original = LinearCrossEntropy.apply
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: (calls.append(1), original(*a))[1])
    fused, fused_log, _ = trainer(model, "float32").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert len(calls) == 6  # 3 steps of 2 micro-batches

    monkeypatch.setattr(loss_module, "FUSED_LOSS_MODEL_TYPES", frozenset())
    own, own_log, _ = trainer(model, "float32").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert len(calls) == 6
    assert fused_log.losses == pytest.approx(own_log.losses, rel=1e-5)
    for name, f in fused.factors.items():
        torch.testing.assert_close(delta(f), delta(own.factors[name]), rtol=1e-3, atol=1e-6)


def test_gradient_checkpointing_changes_memory_not_what_a_client_learns(monkeypatch):
    model, _ = tiny_llama(0, vocab_size=256)
    mlp_calls, mlp_forward = [], LlamaMLP.forward
    # Counted in the class: the recomputation in the backward pass does not run module hooks.
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: (mlp_calls.append(1), mlp_forward(self, x))[1])
    plain, plain_log, _ = trainer(model, "float32").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert len(mlp_calls) == 6 * 2  # 3 steps of 2 micro-batches, 2 layers
    checkpointed = trainer(model, "float32")
    checkpointed.gradient_checkpointing = True
    ckpt, ckpt_log, _ = checkpointed.train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert len(mlp_calls) == 12 + 24  # each layer's forward ran again in the backward pass
    assert not model.is_gradient_checkpointing  # switched off again for the next client
    assert ckpt_log.losses == pytest.approx(plain_log.losses, rel=1e-5)
    for name, f in plain.factors.items():
        torch.testing.assert_close(delta(ckpt.factors[name]), delta(f), rtol=1e-3, atol=1e-6)


def test_float32_training_keeps_the_models_attention():
    model, _ = tiny_llama(0, vocab_size=256)
    model.set_attn_implementation("sdpa")
    seen = []
    original = model.set_attn_implementation
    model.set_attn_implementation = lambda impl: (seen.append(impl), original(impl))
    trainer(model, "float32").train(examples(), ClientStart(rank=4, alpha=8, seed=1))
    assert seen == [] and model.config._attn_implementation == "sdpa"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 600), min_size=1, max_size=300), st.integers(1, 16), st.integers(0, 2**31))
def test_length_grouped_batches_cover_every_example_once(lengths, micro, seed):
    batches = length_grouped_batches(lengths, micro, seed)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= micro for b in batches)
    assert batches == length_grouped_batches(lengths, micro, seed)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5])
def test_fast_dropout_drops_at_rate_p_and_rescales_the_rest(p):
    x = torch.rand(1000, 1001) + 1.0  # no zeros of its own, and an odd count (the last 64-bit draw is cut)
    torch.manual_seed(0)
    y = FastDropout(p).train()(x)
    kept = y != 0
    assert y.shape == x.shape
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-5)
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5  # five standard errors
    # Every 16-bit lane of a draw matters: the rate holds in each column position modulo 4.
    for lane in range(4):
        lane_rate = 1 - kept.flatten()[lane::4].float().mean().item()
        assert abs(lane_rate - p) < 5 * (p * (1 - p) * 4 / x.numel()) ** 0.5, lane


def test_fast_dropout_is_seeded_and_passes_gradients_through_its_mask():
    x = torch.randn(64, 48, requires_grad=True)
    layer = FastDropout(0.25).train()
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    again = layer(x)
    torch.manual_seed(4)
    other = layer(x)
    assert torch.equal(first, again) and not torch.equal(first, other)
    first.sum().backward()
    assert torch.allclose(x.grad, (first != 0).float() / 0.75)


def test_fast_dropout_edges():
    x = torch.randn(5, 7)
    assert FastDropout(0.5).eval()(x) is x  # evaluation: the identity
    assert FastDropout(0.0).train()(x) is x
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="dropout probability"):
        FastDropout(1.5)


def test_training_with_dropout_is_deterministic_under_the_seed_and_uses_the_fast_dropout(monkeypatch):
    model, _ = tiny_llama(0, vocab_size=256)
    calls = []
    original = FastDropout.forward
    monkeypatch.setattr(FastDropout, "forward", lambda self, x: (calls.append(self.training), original(self, x))[1])

    def train(seed):
        return LocalTrainer(
            model,
            pad_token_id=0,
            lora=LoraConfig(ranks=[4], dropout=0.2),
            train=TrainConfig(lr=1e-2, max_steps=2, batch_size=4, micro_batch_size=2),
            dtype="float32",
        ).train(examples(), ClientStart(rank=4, alpha=8, seed=seed))

    (first, first_log, _), (again, again_log, _), (other, other_log, _) = train(1), train(1), train(2)
    assert calls and all(calls)  # the LoRA layers dropped through FastDropout, in training mode
    assert first_log.losses == again_log.losses and first_log.losses != other_log.losses
    assert all(torch.equal(first.factors[k]["B"], again.factors[k]["B"]) for k in first.factors)
    assert not all(torch.equal(first.factors[k]["B"], other.factors[k]["B"]) for k in first.factors)
