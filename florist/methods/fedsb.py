"""Fed-SB: clients train only an r × r matrix R between two factors every client holds frozen; averaging R is exact.

Singhal, Ponkshe, Vartak, Varshney, Vepakomma, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
Performance in (Private) Federated LoRA Fine-Tuning", 2025 (arXiv 2502.15436), on LoRA-SB (arXiv 2411.19557). The
update is s·B R A with B (m × r) and A (r × n) fixed for the whole run and shared by every client; only R trains,
and the server averages it, R̄ = Σ w_k R_k, which is exact: Σ w_k s B R_k A = s B R̄ A. r² numbers a module travel
each way, however many clients there are, so the paper runs larger ranks than LoRA's (r = 120 to 200): the ``rank``
option sets Fed-SB's own rank (0: the run's ``lora.ranks``).

How it is run here, and what differs from the paper:
- B, A and R start as LoRA-SB starts them (``florist.aggregation.lorasb``): from the truncated SVD of Adam's first
  full fine-tuning step, -lr · sign(g), B = U_r, A = V_rᵀ and R = diag(σ_r) / s, so that s B R A is that step's
  best rank-r approximation. The paper's g is summed over a small sample (0.1%) of the pooled training data,
  which the authors' code computes before it splits the data among clients; no federated server holds that
  sample, so here each client sums the gradient of W0 over its first ``init_examples`` examples and sends it up
  once, dense (m × n a module), and the server adds them, takes the sign and the SVD, and sends B, A and R's
  start down once. That one-off traffic is counted in round 1 (``start_upload_params``). ``init_examples = 0``
  draws B and A from the run's seed instead (PEFT's uniform bounds) with R at zero: the ablation without
  LoRA-SB's start, which costs no gradient round;
- each round merges the round's s B R̄ A into the base and trains a fresh R = 0 under the same B and A. That is the
  same model and the same gradients as going on from R̄ (the model W0 + s B (R̄ + R) A is the same function), and
  what travels is still R̄ alone; the authors' code sets α = r (s = 1), florist keeps the run's α and divides R's
  start by s;
- data weights n_k / N (the authors' code averages uniformly over equal splits); heterogeneous ranks (not in the
  paper) take the leading r_k columns of B and rows of A, and R_k zero-padded to the largest rank.
"""

from __future__ import annotations

from ..aggregation import AggregationResult
from ..aggregation.ffa import average_b
from ..aggregation.lorasb import first_step_start
from ..jobs import ClientMode
from .base import Method, Option, Style

CORE = ClientMode(trains={"R"}, shared={"A", "B"}, core=True)


class FedSB(Method):
    name = "fedsb"
    display = "Fed-SB"
    order = 6
    summary = "Trains an r×r core R between fixed shared factors and averages it: exact, r² a module each way."
    exact = True
    scheme = "merge"  # a fresh R each round over the merged s B R̄ A: the same model as going on from R̄
    style = Style(marker="P", colour="#ff7f0e")
    paper = "Singhal, Ponkshe, Vartak, Varshney, Vepakomma, 2025 (arXiv 2502.15436)"
    options = (
        Option("rank", 0, "Fed-SB's rank r (0: the run's lora.ranks); the paper runs 120 to 200", low=0),
        Option(
            "init_examples",
            4,
            "examples each client sums W0's gradient over for LoRA-SB's start (0: random frozen B, A and R = 0)",
            low=0,
        ),
    )

    def mode(self, round_number: int) -> ClientMode:
        return CORE

    def shared_round(self, round_number: int) -> int:
        return 1  # B and A are fixed for the whole run

    def gradient_examples(self, round_number: int) -> int:
        return self.init_examples if round_number == 1 else 0

    def shared_start(self, gradient, rank, lr):
        if lr <= 0:
            raise ValueError(f"LoRA-SB's start needs the clients' learning rate, got {lr}")
        out = {}
        for name in sorted(gradient):
            B, R, A = first_step_start(gradient[name], rank, lr)
            out[name] = {"A": A, "B": B, "R": R}
        return out

    def client_rank(self, rank, history, client) -> int:
        return self.rank or rank

    def check(self, ranks, module_shapes) -> str:
        if not self.rank:
            return ""
        small = [(name, shape) for name, shape in module_shapes.items() if self.rank > min(shape)]
        if small:
            name, shape = small[0]
            return f"rank {self.rank} (method.fedsb.rank) is above module {name}'s {shape[0]} x {shape[1]}"
        return ""

    def aggregate(self, updates, weights, value=None) -> AggregationResult:
        # each client's pair is (A, B R_k) over the shared A: averaging B R_k is B R̄, checked against one A
        return AggregationResult(self.name, average_b(updates, weights), weights=list(weights))
