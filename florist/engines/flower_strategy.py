"""A florist method as a standard Flower strategy, for any ServerApp: ``FederatedLoRA``.

It is Flower's ``FedAvg`` in everything but the aggregation, so it drops into an app built like Flower's
flowertune-llm template, driven by ``Strategy.start(grid, initial_arrays, num_rounds, timeout, ...)``:

- ``configure_train`` sends every sampled node the global adapter in the template's layout,
  ``RecordDict({"arrays": ArrayRecord(peft state dict), "config": ConfigRecord({..., "server-round": r})})``;
- the template's ClientApp loads it (``set_peft_model_state_dict``), trains, and replies
  ``{"arrays": ArrayRecord(get_peft_model_state_dict(model)), "metrics": MetricRecord({"num-examples": n, ...})}``;
- ``aggregate_train`` reads each reply's PEFT ``lora_A`` / ``lora_B`` weights with florist's untrusted-array
  reader, screens every update on its own (``florist.aggregation.screen_updates``: the modules and shapes of the
  adapter it was sent, at most its rank, finite, an optional norm bound), aggregates the accepted ones with the
  method's declaration (``florist.methods``) and returns the new global adapter as PEFT arrays.

The global adapter goes back at the rank the clients train at (the rank of the adapter they were sent, per module),
since a PEFT model loads a state dict of its own shapes only. A method's result of rank p is brought there:

- p = r: as it is;
- p < r (FLoRIST at a low τ): its p components, then r - p fresh ones, A's rows drawn as PEFT draws a new lora_A
  (uniform in ±1/sqrt(n), seeded by round) and B's columns zero: the update is unchanged, and the extra components
  can still learn (a zero row of A with a zero column of B gets no gradient, ever);
- p > r (FLoRA's stack, FLoRIST at τ near 1): its best rank-r approximation (Eckart–Young: the top r singular
  components of B·A, from the factors' stacked SVD), logged with the share of the update's energy it keeps.

B is sent divided by PEFT's scaling at the clients' rank (``lora_alpha / r``, or ``/ sqrt(r)`` under rsLoRA), so the
loaded adapter's update is the aggregate itself. The strategy names no method: which one runs, and with which value
of its swept parameter, is the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..adapters import LORA_KEY, PEFT_PREFIX
from ..aggregation import Adapter, AggregationError, ClientUpdate, LoraFactors, screen_updates
from ..aggregation.svd import stacked_svd, truncation
from ..jobs import BOTH_FACTORS, seed_for
from ..methods import aggregate, get_method
from .flower_messages import MAX_EXAMPLES, MessageError, as_float, checked_tensor, error_reason, shown


@dataclass(frozen=True)
class PeftLayout:
    """Where each module's pair sits in a PEFT state dict (its ``lora_A`` and ``lora_B`` keys), and its shapes."""

    keys: dict[str, tuple[str, str]]  # module -> (lora_A key, lora_B key), in the state dict's order
    shapes: dict[str, tuple[int, int]]  # module -> the (out, in) shape of the weight it adapts
    ranks: dict[str, int]

    @classmethod
    def of(cls, arrays: ArrayRecord, where: str = "the global adapter") -> PeftLayout:
        """The layout of a PEFT LoRA state dict; a ``ValueError`` naming the key for anything but plain LoRA pairs."""
        pairs: dict[str, dict[str, str]] = {}
        for key in arrays:
            match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
            if match is None:
                raise ValueError(f"{where}: array {key} is not a lora_A/lora_B weight; florist aggregates plain LoRA")
            pairs.setdefault(match["module"], {})[match["factor"]] = key
        keys, shapes, ranks = {}, {}, {}
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(
                    f"{where}, module {module}: has lora_{next(iter(pair))} but not both lora_A and lora_B"
                )
            a, b = (tuple(int(d) for d in arrays[pair[f]].shape) for f in "AB")
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
                raise ValueError(f"{where}, module {module}: lora_A is {a} and lora_B {b}, not a LoRA pair")
            keys[module], shapes[module], ranks[module] = (pair["A"], pair["B"]), (b[0], a[1]), a[0]
        if not keys:
            raise ValueError(f"{where}: holds no LoRA weights")
        return cls(keys, shapes, ranks)

    def read(self, record: ArrayRecord, where: str, scaling: Callable[[int], float]) -> dict[str, LoraFactors]:
        """A reply's pairs, each with ``scaling(its rank)``: exactly the layout's keys, arrays read as untrusted."""
        expected = {k for pair in self.keys.values() for k in pair}
        extra = [key for key in record if key not in expected]
        if extra:
            raise MessageError(f"{where}: array {shown(extra[0])} is not in the adapter it was sent")
        modules = {}
        for module, (key_a, key_b) in self.keys.items():
            for key in (key_a, key_b):
                if key not in record:
                    raise MessageError(f"{where}: no array {shown(key)}")
            A = checked_tensor(record[key_a], f"{where}, array {shown(key_a)}")
            B = checked_tensor(record[key_b], f"{where}, array {shown(key_b)}")
            if A.ndim != 2 or A.shape[0] < 1:
                raise MessageError(f"{where}, array {shown(key_a)}: shape {tuple(A.shape)} is no r × n lora_A")
            if A.shape[0] > self.ranks[module]:
                raise MessageError(
                    f"{where}, module {module}: rank {A.shape[0]}, above the rank {self.ranks[module]} it was sent"
                )
            modules[module] = LoraFactors(A=A, B=B, scaling=scaling(A.shape[0]))
        return modules


def at_rank(A: torch.Tensor, B: torch.Tensor, rank: int, generator: torch.Generator):
    """The update ``B @ A`` as a pair of rank ``rank``, and the share of its energy (squared Frobenius norm) kept:
    padded with fresh components (random A rows, zero B columns) below it, its best approximation above it."""
    p = A.shape[0]
    if p == rank:
        return A, B, 1.0
    if p < rank:
        n = A.shape[1]
        fresh = (torch.rand(rank - p, n, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(n)
        return torch.cat([A, fresh.to(A.dtype)]), torch.cat([B, B.new_zeros(B.shape[0], rank - p)], dim=1), 1.0
    U, S, Vh = stacked_svd(B.double(), A.double())
    kept = truncation(U, S, Vh, rank)
    energy = S.square().sum()
    return kept.A, kept.B, float(S[:rank].square().sum() / energy) if energy > 0 else 1.0


class FederatedLoRA(FedAvg):
    """FedAvg with a florist method's aggregation of LoRA adapters; see the module's docstring.

    ``method``: a name of ``florist.methods`` whose clients train both factors (``florist methods`` lists them);
    ``value``: its swept parameter (FLoRIST's τ; None: the method's default, and None for a method without one);
    ``lora_alpha`` and ``use_rslora``: the clients' LoRA config, which gives each pair its scaling;
    ``max_update_norm``: a bound on every client's ``||s B A||_F`` per module (0: none); ``seed``: the draw of the
    fresh components a result below the clients' rank is padded with. Everything else is ``FedAvg``'s (the sampling,
    the record keys, federated evaluation).
    """

    def __init__(
        self,
        method: str,
        value: float | None = None,
        *,
        lora_alpha: float,
        use_rslora: bool = False,
        max_update_norm: float = 0.0,
        seed: int = 0,
        **fedavg,
    ):
        super().__init__(**fedavg)
        self.method = get_method(method)
        self.value = self._checked_value(value)
        self.lora_alpha = as_float(lora_alpha, "lora_alpha", 0.0)
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha is {lora_alpha!r}: the clients' LoRA alpha is a positive number")
        self.use_rslora, self.max_update_norm, self.seed = use_rslora, max_update_norm, seed
        self._check_mode(1)
        self._check_no_residual()
        self._sent: PeftLayout | None = None

    def _checked_value(self, value: float | None) -> float | None:
        sweep = self.method.sweep
        if sweep is None:
            if value is not None:
                raise ValueError(f"method {self.method.name!r} has no swept parameter; leave value at None")
            return None
        if value is None:
            return sweep.default
        number = as_float(value, f"method {self.method.name!r}: value")
        _, problem = sweep.parse(repr(number))
        if problem:
            raise ValueError(f"method {self.method.name!r}: value {value!r} as {sweep.name} {problem}")
        return number

    def _check_mode(self, server_round: int) -> None:
        mode = self.method.mode(server_round)
        if mode != BOTH_FACTORS:
            raise ValueError(
                f"method {self.method.name!r} in round {server_round}: {mode.describe()}, but a flowertune-llm "
                "ClientApp trains and sends both A and B"
            )

    def _check_no_residual(self) -> None:
        """Refuse a method whose result carries a residual for the clients' base weights (FedEx-LoRA's): FedAvg's
        messages hold one adapter, so the clients would train from a model that lacks it. Found by aggregating two
        small pairs, so that no method needs naming here."""
        g = torch.Generator().manual_seed(0)
        probe = [
            ClientUpdate({"probe": LoraFactors(torch.randn(1, 3, generator=g), torch.randn(3, 1, generator=g))}, 1)
            for _ in range(2)
        ]
        try:
            result = aggregate(self.method, probe, value=self.value)
        except AggregationError:
            return  # a rule that needs more than two free pairs (a shared A): it has modes the check above refuses
        if result.residual is not None:
            raise ValueError(
                f"method {self.method.name!r} adds a residual to every client's base weights, which FedAvg's messages "
                'cannot carry; run it with florist\'s own Flower app (florist run, engine = "flower")'
            )

    def scaling(self, rank: int) -> float:
        """PEFT's scaling of a pair of rank ``rank`` under the clients' LoRA config."""
        return self.lora_alpha / (math.sqrt(rank) if self.use_rslora else rank)

    def summary(self) -> None:
        log(INFO, "\t├──> florist method: %s (%s)", self.method.label(self.value), self.method.summary)
        log(
            INFO,
            "\t├──> LoRA alpha %g%s, update norm bound %g",
            self.lora_alpha,
            ", rsLoRA" * self.use_rslora,
            self.max_update_norm,
        )
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's messages, the global adapter in them; its layout is what every reply is held to."""
        self._check_mode(server_round)
        self._sent = PeftLayout.of(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global adapter at the clients' rank from the replies that pass every check (None, None if none do
        or they cannot be aggregated: ``Strategy.start`` then keeps the previous one), and the round's metrics."""
        if self._sent is None:
            raise RuntimeError(f"round {server_round}: aggregate_train without configure_train")
        updates, contents, unread = self._read_replies(server_round, replies)
        accepted, reasons = screen_updates(updates, self._sent.shapes, max_norm=self.max_update_norm)
        for k, reason in reasons.items():
            log(WARNING, "round %d: %s is left out: %s", server_round, updates[k].client_id, reason)
        if not accepted:
            log(WARNING, "round %d: no update passed the checks; the global adapter stays as it was", server_round)
            return None, None
        try:
            result = aggregate(self.method, [updates[k] for k in accepted], value=self.value)
        except AggregationError as e:
            log(WARNING, "round %d: %s; the global adapter stays as it was", server_round, e)
            return None, None
        metrics = self._train_metrics([contents[k] for k in accepted])
        arrays, ranks = self._peft_arrays(server_round, result.modules)
        metrics.update({**ranks, "clients": len(accepted), "left-out": len(reasons) + unread})
        return arrays, metrics

    def _read_replies(self, server_round: int, replies: Iterable[Message]) -> tuple[list[ClientUpdate], list, int]:
        """Every reply's update and content, the first reply per message; those that cannot be read are logged and
        counted."""
        updates, contents, seen, unread = [], [], set(), 0
        for reply in replies:
            if reply.metadata.reply_to_message_id in seen:
                continue
            seen.add(reply.metadata.reply_to_message_id)
            try:
                updates.append(self._update(reply))
            except MessageError as e:
                log(WARNING, "round %d: node %d is left out: %s", server_round, reply.metadata.src_node_id, e)
                unread += 1
                continue
            contents.append(reply.content)
        return updates, contents, unread

    def _update(self, reply: Message) -> ClientUpdate:
        """A reply as a client update: its PEFT arrays as pairs, weighted by its ``weighted_by_key`` metric."""
        node = reply.metadata.src_node_id
        where = f"node {node}'s reply"
        if reply.has_error():
            raise MessageError(f"{where} is an error: {error_reason(reply)}")
        content = reply.content
        if self.arrayrecord_key not in content.array_records:
            raise MessageError(f"{where}: no array record {self.arrayrecord_key!r}")
        metric_records = list(content.metric_records.values())
        if len(metric_records) != 1 or self.weighted_by_key not in metric_records[0]:
            raise MessageError(f"{where}: not one metric record holding {self.weighted_by_key!r}")
        weight = as_float(
            metric_records[0][self.weighted_by_key], f"{where}: {self.weighted_by_key}", 0.0, MAX_EXAMPLES
        )
        modules = self._sent.read(content.array_records[self.arrayrecord_key], where, self.scaling)
        return ClientUpdate(modules, weight, f"node {node}")

    def _peft_arrays(self, server_round: int, adapter: Adapter) -> tuple[ArrayRecord, dict[str, float]]:
        """The aggregate as the PEFT arrays the clients load (each module at its rank, B over PEFT's scaling), and
        the aggregate's mean rank and the least share of a module's energy that bringing it to rank r kept."""
        generator = torch.Generator().manual_seed(seed_for(self.seed, "fresh components", server_round))
        arrays, ranks, energies = ArrayRecord(), [], []
        for module, (key_a, key_b) in self._sent.keys.items():
            m, r = adapter[module], self._sent.ranks[module]
            A, B, energy = at_rank(m.A, m.B, r, generator)
            arrays[key_a] = Array(np.ascontiguousarray(A.detach().to("cpu", torch.float32).numpy()))
            arrays[key_b] = Array(np.ascontiguousarray((B / self.scaling(r)).detach().to("cpu", torch.float32).numpy()))
            ranks.append(m.rank)
            energies.append(energy)
        truncated = [e for p, r, e in zip(ranks, self._sent.ranks.values(), energies) if p > r]
        log(
            INFO,
            "round %d: %s aggregated to ranks %d to %d, brought to the clients' rank%s",
            server_round,
            self.method.label(self.value),
            min(ranks),
            max(ranks),
            f" ({len(truncated)} modules truncated, keeping at least {100 * min(truncated):.1f}% of their energy)"
            if truncated
            else "",
        )
        return arrays, {"global-rank-mean": sum(ranks) / len(ranks), "energy-kept-min": min(energies)}

    def _train_metrics(self, contents: list) -> MetricRecord:
        """FedAvg's weighted mean of the accepted replies' metrics; none when they do not combine (a reply's metrics
        are the client's to name, and need not agree with the others')."""
        try:
            return self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        except (TypeError, ValueError, KeyError, ZeroDivisionError) as e:
            log(WARNING, "the clients' training metrics cannot be combined (%s: %s)", type(e).__name__, e)
            return MetricRecord()
