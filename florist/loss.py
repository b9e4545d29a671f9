"""The training loss: next-token cross-entropy, with the LM head and the loss fused for a frozen head.

A causal LM's own loss materialises the logits (tokens × vocabulary) in the compute dtype, copies them to float32,
takes a log-softmax, and in the backward pass builds a dense gradient of zeros, the log-softmax gradient and a cast
back. Over a 49,152-token vocabulary that element-wise work cost about as much CPU time as the LM head's two matrix
products. When the head is a frozen, bias-free linear map (as with LoRA on the attention or MLP projections), the
gradient of the loss with respect to the hidden states is known in the forward pass:
``(softmax(z) - onehot(y)) @ W``. ``LinearCrossEntropy`` computes it there, a block of rows at a time in float32,
writing the probabilities over the logits in place, so the logits are never copied whole to float32 nor kept for
the backward pass, which only scales the saved gradient.

``torch.nn.functional.linear_cross_entropy`` (torch 2.13) does a chunked version of this; on a CPU it was slower
than the plain loss at these shapes and returns a bfloat16 loss under bfloat16 inputs, so it is not used.
"""

from __future__ import annotations

import torch
from torch import nn

from .jobs import LOSS_IGNORED

# Architectures whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no soft-capping, logit scale
# or bias. Others train with the model's own loss.
FUSED_LOSS_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})

ROWS_PER_BLOCK = 16  # a float32 block of 16 × 49,152 logits is 3 MiB: it stays in cache while it is worked on


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``; gradient for ``hidden`` only.

    ``hidden`` (n, d), ``weight`` (vocab, d), ``targets`` (n,) with every value a class index. The products run
    in ``dtype`` (the autocast dtype, or the hidden states' own); the softmax and the loss are float32.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype):
        w = weight.to(dtype)
        logits = hidden.to(dtype) @ w.T
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, logits.shape[0], ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            loss += _softmax_minus_onehot_(logits[rows], targets[rows])
        ctx.save_for_backward((logits @ w).to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), None, None, None


def _softmax_minus_onehot_(block: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Overwrite a block of logits with ``softmax - onehot(targets)``; return the block's summed loss."""
    target_logits = block.gather(1, targets[:, None]).float()
    x = block.float()  # a float32 copy under bfloat16, the block itself under float32
    top = x.amax(dim=1, keepdim=True)
    x.sub_(top).exp_()
    total = x.sum(dim=1, keepdim=True)
    loss = (total.log() + top - target_logits).sum()
    x.div_(total)
    x.scatter_add_(1, targets[:, None], torch.full((len(targets), 1), -1.0, device=x.device))
    if x.data_ptr() != block.data_ptr():
        block.copy_(x)
    return loss


def _unwrapped(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT model, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_loss_applies(model: nn.Module) -> bool:
    """Whether ``causal_lm_loss`` may fuse the LM head of ``model`` (a transformers causal LM, PEFT-wrapped or not)."""
    base = _unwrapped(model)
    head = base.get_output_embeddings()
    return (
        getattr(base.config, "model_type", None) in FUSED_LOSS_MODEL_TYPES
        and type(head) is nn.Linear
        and head.bias is None
        and not head.weight.requires_grad
    )


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], num_items: int) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled positions and divided by ``num_items``.

    The same value as ``model(**batch, num_items_in_batch=num_items).loss``, fused where ``fused_loss_applies``.
    """
    if not fused_loss_applies(model):
        return model(**batch, use_cache=False, num_items_in_batch=num_items).loss
    base = _unwrapped(model)
    out = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    labels = batch["labels"][:, 1:]
    labelled = labels != LOSS_IGNORED
    hidden = out.last_hidden_state[:, :-1][labelled]
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        total = LinearCrossEntropy.apply(hidden, base.get_output_embeddings().weight, labels[labelled], dtype)
    return total / num_items
