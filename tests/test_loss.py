"""The fused LM-head loss gives the model's own loss and gradients, and steps aside where it does not apply."""

from __future__ import annotations

import peft
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import florist.loss as loss_module
from florist.loss import LinearCrossEntropy, causal_lm_loss, fused_loss_applies
from florist.models import tiny_llama


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 40), d=st.integers(1, 24), vocab=st.integers(2, 300), seed=st.integers(0, 2**16))
def test_linear_cross_entropy_matches_cross_entropy_of_the_logits(n, d, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * 3).requires_grad_()
    weight = torch.randn(vocab, d, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    fused = LinearCrossEntropy.apply(hidden, weight, targets, torch.float32)
    (fused * 0.5).backward()
    fused_grad, hidden.grad = hidden.grad, None
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (plain * 0.5).backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused_grad, hidden.grad, rtol=1e-5, atol=1e-5)


def lora_model(seed: int = 0):
    model, _ = tiny_llama(seed, vocab_size=256)
    torch.manual_seed(seed)
    return peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"
        ),
    )


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # a right-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :5] = -100  # a prompt that carries no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def loss_and_grads(model, data, items: int, dtype: torch.dtype, fused: bool):
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        if fused:
            loss = causal_lm_loss(model, data, items)
        else:
            loss = model(**data, use_cache=False, num_items_in_batch=items).loss
    loss.backward()
    return loss.detach().float(), lora_grads(model)


def test_causal_lm_loss_equals_the_models_own_loss_and_gradients():
    model, data = lora_model(), batch()
    with torch.no_grad():  # B away from zero, so the LoRA A factors get gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    items = int((data["labels"][:, 1:] != -100).sum())
    assert fused_loss_applies(model)
    exact_loss, exact = loss_and_grads(model, data, items, torch.float32, fused=False)
    fused_loss, fused = loss_and_grads(model, data, items, torch.float32, fused=True)
    torch.testing.assert_close(fused_loss, exact_loss, rtol=1e-5, atol=1e-6)
    assert fused.keys() == exact.keys() and len(exact) == 8
    for name in exact:
        assert exact[name].abs().max() > 0, name
        torch.testing.assert_close(fused[name], exact[name], rtol=1e-4, atol=1e-6 * exact[name].abs().max().item())

    # Under bfloat16 autocast neither is exact: the fused loss must be as close to float32 as the model's own.
    own_loss, own = loss_and_grads(model, data, items, torch.bfloat16, fused=False)
    fused_loss, fused = loss_and_grads(model, data, items, torch.bfloat16, fused=True)
    assert abs(fused_loss - exact_loss) <= 2 * abs(own_loss - exact_loss) + 1e-3 * exact_loss
    for name in exact:
        own_error = (own[name] - exact[name]).norm() / exact[name].norm()
        fused_error = (fused[name] - exact[name]).norm() / exact[name].norm()
        assert fused_error <= 2 * own_error + 1e-3, (name, fused_error, own_error)


def test_a_trainable_or_unknown_head_falls_back_to_the_models_own_loss(monkeypatch):
    model, data = lora_model(), batch()
    items = int((data["labels"][:, 1:] != -100).sum())
    expected = model(**data, use_cache=False, num_items_in_batch=items).loss
    calls = []
    monkeypatch.setattr(LinearCrossEntropy, "apply", lambda *a: calls.append(a))

    model.get_base_model().get_output_embeddings().weight.requires_grad_(True)
    assert not fused_loss_applies(model)
    torch.testing.assert_close(causal_lm_loss(model, data, items), expected)
    model.get_base_model().get_output_embeddings().weight.requires_grad_(False)

    monkeypatch.setattr(loss_module, "FUSED_LOSS_MODEL_TYPES", frozenset({"gemma2"}))
    assert not fused_loss_applies(model)
    torch.testing.assert_close(causal_lm_loss(model, data, items), expected)
    assert calls == []


def test_a_micro_batch_with_nothing_labelled_has_zero_loss_and_zero_gradients():
    model, data = lora_model(), batch()
    data["labels"][:] = -100
    loss = causal_lm_loss(model, data, num_items=1)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)
