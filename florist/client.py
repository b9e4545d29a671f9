"""Local training: one client's LoRA fine-tuning with PEFT on its own examples.

The base model is shared: PEFT injects this client's LoRA layers into it, training runs,
the factors are read out and ``unload`` puts the original layers back. No client ever
holds a copy of the base model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .aggregation import ModuleAggregate
from .config import LoraConfig, TrainConfig
from .jobs import (
    GRADIENT,
    LOSS_IGNORED,
    ClientStart,
    ClientUpload,
    Factors,
    TrainingLog,
    common_a,
    cut_upload,
    leading,
    seed_for,
    upload_of,
)
from .loss import causal_lm_loss
from .models import DTYPES, peft_wrapping, set_activation_checkpointing

# On a CPU under bfloat16 autocast, plain attention (matmul, softmax, matmul) trains faster than SDPA's flash kernel
# at instruction-tuning lengths (in float32 it gains nothing), but keeps every layer's batch × heads × length²
# probabilities for the backward pass. Micro-batches whose probabilities fit this budget use it; longer ones keep
# SDPA, whose memory grows only linearly with length.
EAGER_ATTENTION_BUDGET = 512 * 2**20  # bytes


class FastDropout(nn.Module):
    """Inverted dropout whose mask comes from 16 random bits per element instead of one Bernoulli draw each.

    On a CPU, ``torch.nn.Dropout`` draws every element's Bernoulli separately and took about a tenth of a
    bfloat16 LoRA step; four 16-bit lanes of each 64-bit draw make the same mask several times faster.
    The drop probability is rounded to a multiple of 1/65536 (0.05 becomes 0.04999...) and the scale uses
    the rounded value, so the output stays unbiased. Draws come from torch's global generator, so training
    is as deterministic under a seed as with ``nn.Dropout`` (though the masks differ from its masks).
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.dropped = round(p * 65536)  # of every 65,536 equally likely 16-bit values, this many drop
        self.p = self.dropped / 65536

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        if self.dropped == 65536:
            return torch.zeros_like(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.dropped - 32768
        return torch.where(keep, x, 0.0) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model: nn.Module) -> None:
    """Swap PEFT's ``nn.Dropout`` in every LoRA layer for a FastDropout of the same probability."""
    for _, layer in lora_layers(model):
        for key, dropout in layer.lora_dropout.items():
            if isinstance(dropout, nn.Dropout):
                layer.lora_dropout[key] = FastDropout(dropout.p)


def length_grouped_batches(
    lengths: Sequence[int], micro_batch_size: int, seed: int, group: int = 32
) -> list[list[int]]:
    """A seeded shuffle, then examples sorted by length within windows of ``group`` micro-batches.

    Neighbours in a micro-batch have similar lengths, so little of each batch is padding, while
    the order across windows stays random.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    window = micro_batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches += [chunk[i : i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def collate(examples: list[dict], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padded label positions are ``LOSS_IGNORED`` so they carry no loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), LOSS_IGNORED, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class LocalTrainer:
    """Trains one client's LoRA on the shared base model and returns its factors."""

    def __init__(
        self,
        model: nn.Module,
        pad_token_id: int,
        lora: LoraConfig,
        train: TrainConfig,
        dtype: str = "bfloat16",
        device: str = "cpu",
        gradient_checkpointing: bool = False,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.lora = lora
        self.train_config = train
        self.dtype = DTYPES[dtype]
        self.device = device
        self.gradient_checkpointing = gradient_checkpointing

    def train(
        self,
        examples: Sequence[dict],
        start: ClientStart,
        client_id: str = "",
        on_step: Callable[[int, int, float], None] | None = None,
        kept: Factors | None = None,
    ) -> tuple[ClientUpload, TrainingLog, Factors]:
        """Fine-tune this round's LoRA on ``examples`` (tokenized: input_ids, labels) as ``start.mode`` says.

        ``kept``: the factors this client kept from its round before (``ClientMode.keeps``), or None (fresh).
        Returns what the client uploads, its training log, and the factors it keeps for its next round.
        """
        if len(examples) == 0:
            raise ValueError(f"{client_id or 'client'}: no training examples")
        if start.gradient_examples:
            upload, log = self.gradient(examples, start, on_step)
            return upload, log, {}
        began = time.perf_counter()
        torch.manual_seed(start.seed)  # PEFT draws A's init from the global generator
        with peft_wrapping():
            peft_model = peft.get_peft_model(self.model, self._peft_config(start))
        attention = getattr(self.model.config, "_attn_implementation", None)
        try:
            self._initialise(start, kept)
            use_fast_dropout(self.model)
            log = self._fit(peft_model, examples, start.seed, on_step, attention)
            trained, scalings = trained_factors(self.model)
        finally:
            peft_model.unload()  # the shared base gets its original layers back, unmerged
            if attention is not None and self.model.config._attn_implementation != attention:
                self.model.set_attn_implementation(attention)
        log.seconds = time.perf_counter() - began
        mode = start.mode
        keeps = {name: {f: factors[f] for f in sorted(mode.keeps)} for name, factors in trained.items()}
        upload = ClientUpload(upload_of(start, trained), scalings, num_examples=len(examples))
        return cut_upload(upload, start.upload_threshold), log, keeps

    def gradient(
        self, examples: Sequence[dict], start: ClientStart, on_step: Callable[[int, int, float], None] | None = None
    ) -> tuple[ClientUpload, TrainingLog]:
        """The gradient of the loss with respect to every adapted base weight (m × n), summed over the first
        ``start.gradient_examples`` of ``examples``; the upload's example count is the client's, as for training.

        Each micro-batch contributes its token-mean loss times its number of examples, so the sum weighs examples
        alike, as a sum of per-example gradients would. No dropout (the estimate is deterministic) and no update:
        a fresh LoRA (B = 0) is injected only to name the adapted weights as training does, then removed.
        """
        began, log, held = time.perf_counter(), TrainingLog(), len(examples)
        examples = examples[: start.gradient_examples]
        with peft_wrapping():
            peft_model = peft.get_peft_model(self.model, self._peft_config(start))
        layers = lora_layers(self.model)
        try:
            for _, layer in layers:
                layer.base_layer.weight.requires_grad_(True)
            peft_model.eval()
            size = self.train_config.micro_batch_size
            batches = [list(examples[i : i + size]) for i in range(0, len(examples), size)]
            for k, batch in enumerate(batches):
                inputs = collate(batch, self.pad_token_id, self.device)
                loss = causal_lm_loss(peft_model, inputs, num_items=max(labelled_tokens(batch), 1))
                (loss * len(batch)).backward()
                log.steps, log.tokens = k + 1, log.tokens + int(inputs["attention_mask"].sum())
                log.losses.append(float(loss.detach()))
                if on_step:
                    on_step(k + 1, len(batches), log.losses[-1])
            grads = {name: {GRADIENT: layer.base_layer.weight.grad.detach().float().cpu()} for name, layer in layers}
        finally:
            for _, layer in layers:
                layer.base_layer.weight.grad = None
                layer.base_layer.weight.requires_grad_(False)
            peft_model.unload()
        log.seconds = time.perf_counter() - began
        return ClientUpload(grads, {name: 1.0 for name in grads}, num_examples=held), log

    def _peft_config(self, start: ClientStart) -> peft.LoraConfig:
        return peft.LoraConfig(
            r=start.rank,
            lora_alpha=start.alpha,
            # a string is PEFT's regex over whole module names; a list, names or their dotted tails
            target_modules=t if isinstance(t := self.lora.target_modules, str) else list(t),
            lora_dropout=self.lora.dropout,
            use_rslora=self.lora.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
        )

    @torch.no_grad()
    def _initialise(self, start: ClientStart, kept: Factors | None) -> None:
        """Each factor's start (the global adapter, a shared draw, the client's own), and which ones train."""
        mode = start.mode
        for name, layer in lora_layers(self.model):
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if start.init is not None:
                load_global(A, B, start.init[name], layer.scaling["default"])
            elif start.init_seed is not None:  # one draw for every client; the dropout masks stay the client's own
                A.copy_(common_a(start.init_seed, name, *A.shape))
            for f, t in ((start.shared or {}).get(name, {})).items():
                if f != "R":  # a core's start is set once the core is in place
                    (A if f == "A" else B).copy_(leading(f, t, start.rank))
            if kept is not None:
                for f, t in kept.get(name, {}).items():
                    (A if f == "A" else B).copy_(t)
            A.requires_grad_("A" in mode.trains)
            B.requires_grad_("B" in mode.trains)
            if mode.core:
                insert_core(layer, start.rank)
                core = (start.shared or {}).get(name, {}).get("R")
                if core is not None:  # the update's core, scaling folded in, as B is in a global adapter
                    layer.lora_A["default"].R.weight.copy_(leading("R", core, start.rank) / layer.scaling["default"])

    def _fit(self, peft_model, examples, seed: int, on_step, attention: str | None) -> TrainingLog:
        cfg = self.train_config
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        accumulation = cfg.batch_size // cfg.micro_batch_size
        steps_per_epoch = max(1, math.ceil(len(examples) / cfg.batch_size))
        total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / total)  # linear, no warm-up
        if self.gradient_checkpointing:
            set_activation_checkpointing(peft_model, True)
            peft_model.enable_input_require_grads()
        peft_model.train()
        lengths = [len(e["input_ids"]) for e in examples]
        log, stream = TrainingLog(), self._micro_batch_stream(lengths, seed)
        autocast = (
            torch.autocast(device_type=torch.device(self.device).type, dtype=self.dtype)
            if self.dtype != torch.float32
            else nullcontext()
        )
        while log.steps < total:
            group = [next(stream) for _ in range(accumulation)]
            group = [b for b in group if b]
            labelled = labelled_tokens([examples[i] for b in group for i in b])
            step_loss = 0.0
            for batch_idx in group:
                batch = collate([examples[i] for i in batch_idx], self.pad_token_id, self.device)
                self._set_attention(attention, *batch["input_ids"].shape)
                with autocast:
                    loss = causal_lm_loss(peft_model, batch, num_items=max(labelled, 1))
                loss.backward()
                step_loss += float(loss.detach())
                log.tokens += int(batch["attention_mask"].sum())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            log.steps += 1
            log.losses.append(step_loss)
            if on_step:
                on_step(log.steps, total, step_loss)
        peft_model.eval()
        if self.gradient_checkpointing:
            set_activation_checkpointing(peft_model, False)
        return log

    def _set_attention(self, default: str | None, batch: int, width: int) -> None:
        """Plain attention for a low-precision CPU micro-batch whose attention probabilities fit
        EAGER_ATTENTION_BUDGET, else the model's own (only a model loaded with SDPA is switched)."""
        config = self.model.config
        if default != "sdpa" or torch.device(self.device).type != "cpu" or self.dtype == torch.float32:
            return
        layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_attention_heads", None)
        per_element = 4 + self.dtype.itemsize  # float32 probabilities and their copy in the compute dtype
        fits = (
            layers is not None
            and heads is not None
            and layers * batch * heads * width**2 * per_element <= EAGER_ATTENTION_BUDGET
        )
        wanted = "eager" if fits else "sdpa"
        if config._attn_implementation != wanted:
            self.model.set_attn_implementation(wanted)

    def _micro_batch_stream(self, lengths, seed):
        """Micro-batches epoch after epoch, each epoch reshuffled from the client's seed."""
        epoch = 0
        while True:
            epoch_seed = seed_for(seed, "epoch", epoch)
            yield from length_grouped_batches(lengths, self.train_config.micro_batch_size, epoch_seed)
            epoch += 1


def labelled_tokens(examples: Sequence[dict]) -> int:
    """The tokens whose next-token loss counts, over ``examples`` (each label after the first that is not ignored)."""
    return sum(sum(1 for t in e["labels"][1:] if t != LOSS_IGNORED) for e in examples)


def lora_layers(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


class CoreLinear(nn.Module):
    """A frozen A followed by a trainable r × r matrix R, in the place of PEFT's lora_A: the update is s·B·R·A."""

    def __init__(self, lora_A: nn.Linear, rank: int):
        super().__init__()
        self.A = lora_A
        self.A.weight.requires_grad_(False)
        self.R = nn.Linear(rank, rank, bias=False, device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        nn.init.zeros_(self.R.weight)  # the update starts where the frozen factors leave it: at zero

    @property
    def weight(self) -> torch.Tensor:  # what PEFT and florist read as lora_A's weight
        return self.A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.R(self.A(x))


def insert_core(layer: LoraLayer, rank: int) -> None:
    layer.lora_A["default"] = CoreLinear(layer.lora_A["default"], rank)


def trained_factors(model: nn.Module) -> tuple[Factors, dict[str, float]]:
    """Every LoRA layer's A and B (and R with a core) as float32 CPU tensors, and its scaling, keyed by the adapted
    module's name in the base model."""
    factors, scalings = {}, {}
    for name, layer in lora_layers(model):
        lora_A = layer.lora_A["default"]
        held = {"A": lora_A.weight, "B": layer.lora_B["default"].weight}
        if isinstance(lora_A, CoreLinear):
            held["R"] = lora_A.R.weight
        factors[name] = {f: t.detach().float().cpu().clone() for f, t in held.items()}
        scalings[name] = float(layer.scaling["default"])
    return factors, scalings


def load_global(A: torch.Tensor, B: torch.Tensor, module: ModuleAggregate, scaling: float) -> None:
    """Start from the global adapter: its top-r components, or all of them with the rest left fresh.

    B gets the global B divided by this client's scaling, so scaling * B @ A equals the global update.
    Components beyond the global rank keep PEFT's fresh init (random A, zero B): the update is
    unchanged, and unlike zero-padded rows they can still learn.
    """
    p = min(A.shape[0], module.rank)
    A[:p].copy_(module.A[:p].to(A.dtype))
    B[:, :p].copy_((module.B[:, :p] / scaling).to(B.dtype))
    B[:, p:].zero_()
