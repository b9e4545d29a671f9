"""Generated client updates with the shapes of real models, for demos, benchmarks and tests.

Each client's update is a shared low-rank direction (what every client learns) plus a weaker
direction of its own (what only its data teaches), with decaying singular values, so the
stacked spectrum looks like trained adapters': a few strong components and a long tail.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .aggregation import ClientUpdate, LoraFactors

# layers, hidden size, v_proj output size (kv heads x head dim); q_proj is hidden x hidden
MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "tinyllama": (22, 2048, 256),
    "llama-3.2-1b": (16, 2048, 512),
    "llama-7b": (32, 4096, 4096),
}
PAPER_HETEROGENEOUS_RANKS = (64, 32, 16, 16, 8, 8, 4, 4)


def module_shapes(model: str) -> dict[str, tuple[int, int]]:
    """q_proj and v_proj of every layer, as PEFT names them, with their (out, in) shapes."""
    layers, hidden, v_out = MODEL_SHAPES[model]
    shapes = {}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj"] = (hidden, hidden)
        shapes[f"model.layers.{i}.self_attn.v_proj"] = (v_out, hidden)
    return shapes


def _orthonormal(rows: int, cols: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=dtype))
    return q


def synthetic_updates(
    shapes: dict[str, tuple[int, int]],
    ranks: Sequence[int],
    seed: int = 0,
    alpha_per_rank: float = 2.0,
    shared_fraction: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> list[ClientUpdate]:
    """One update per entry of ``ranks``; scaling alpha/r with alpha = ``alpha_per_rank`` * r as in the paper."""
    g = torch.Generator().manual_seed(seed)
    r_max = max(ranks)
    shared = {
        name: (_orthonormal(m, r_max, g, dtype), _orthonormal(n, r_max, g, dtype)) for name, (m, n) in shapes.items()
    }
    decay = torch.exp(-torch.arange(r_max, dtype=dtype) / 4)
    updates = []
    for k, r in enumerate(ranks):
        scaling = alpha_per_rank  # alpha = alpha_per_rank * r, so alpha / r
        n_shared = max(1, int(r * shared_fraction))
        modules = {}
        for name, (m, n) in shapes.items():
            U0, V0 = shared[name]
            Uk, Vk = _orthonormal(m, r, g, dtype), _orthonormal(n, r, g, dtype)
            B = torch.cat([U0[:, :n_shared] * decay[:n_shared], 0.4 * Uk[:, n_shared:] * decay[: r - n_shared]], dim=1)
            A = torch.cat([V0[:, :n_shared].T, Vk[:, n_shared:].T], dim=0)
            modules[name] = LoraFactors(A=A.contiguous(), B=(B / scaling).contiguous(), scaling=scaling)
        updates.append(
            ClientUpdate(
                modules, num_examples=int(torch.randint(500, 4000, (1,), generator=g)), client_id=f"client {k}"
            )
        )
    return updates


def frozen_a_updates(updates: Sequence[ClientUpdate], seed: int = 0) -> list[ClientUpdate]:
    """The same clients under FFA-LoRA: A frozen at a shared seeded init, B the best fit to each client's update.

    With A fixed, the B minimising ||B A0 - s B_k A_k||_F is s B_k A_k A0^T (A0 A0^T)^-1; what the
    update has outside A0's row space is lost, which is the price FFA-LoRA pays for exact averaging.
    """
    g = torch.Generator().manual_seed(seed)
    r_max = max(f.rank for u in updates for f in u.modules.values())
    first = updates[0].modules
    shared = {name: torch.randn(r_max, f.shape[1], generator=g, dtype=f.A.dtype) for name, f in first.items()}
    out = []
    for u in updates:
        modules = {}
        for name, f in u.modules.items():
            A0 = shared[name][: f.rank]
            B = (f.B @ (f.A @ A0.T)) @ torch.linalg.inv(A0 @ A0.T)
            modules[name] = LoraFactors(A=A0.clone(), B=B, scaling=f.scaling)
        out.append(ClientUpdate(modules, u.num_examples, u.client_id))
    return out
