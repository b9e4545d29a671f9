"""What the server and a client say to each other: a client's mode and start, its job, what it uploads, its result.

Both the server loop and the local trainer import this module, and both engines carry its types: the in-process
simulator by reference, the Flower engine as records (``florist.engines.flower_messages``).

A LoRA pair stands for the update ``s·B·A``; a method may put a small r × r matrix R between the two (the
update is then ``s·B·R·A``). A ``ClientMode`` says, for one round, which of A, B and R a client trains, which
it holds frozen at a draw shared by every client, and which stay on the client and are never uploaded. What a
client uploads is the trained factors it does not keep; the server completes them into a ``LoraFactors`` from
what it sent (``completed_factors``), so a client can never change a factor it was told to hold fixed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .aggregation import Adapter, ClientUpdate, LoraFactors
from .aggregation.truncation import truncated_pair

FACTORS = ("A", "B", "R")
GRADIENT = "G"  # a gradient job's upload: per module, the summed gradient of the frozen base weight (m × n)
LOSS_IGNORED = -100  # the label PyTorch's cross entropy skips: prompt tokens and padding

Factors = dict[str, dict[str, Tensor]]  # module name -> {"A": ..., "B": ..., "R": ...}


@dataclass(frozen=True)
class ClientMode:
    """Which LoRA parameters a client trains in a round, and from what they start.

    ``trains``: the factors that train (of A, B and R; R only with ``core``). ``shared``: the factors every client
    holds frozen at one draw from the run's seed, which the server sends (FFA-LoRA's A). ``keeps``: the factors that
    stay on the client, start from its own copy of the round before and are never uploaded. ``core``: an r × r
    matrix R sits between B and A, starting at zero (or at the job's shared R). Every other factor starts as the
    run's scheme says: fresh (PEFT's init) under ``merge``, the global adapter under ``reinit``. ``common_init``: a
    fresh LoRA is one draw for every client of the round (as when a server sends its model out), where by default
    each client draws its own.
    """

    trains: frozenset[str] = frozenset({"A", "B"})
    shared: frozenset[str] = frozenset()
    keeps: frozenset[str] = frozenset()
    core: bool = False
    common_init: bool = False

    def __post_init__(self):
        for what in ("trains", "shared", "keeps"):
            object.__setattr__(self, what, frozenset(getattr(self, what)))
        if not self.trains or not self.trains <= set(FACTORS):
            raise ValueError(f"a client mode trains some of A, B and R, not {sorted(self.trains)}")
        if ("R" in self.trains) != self.core:
            raise ValueError("a client mode trains R exactly when it has a core (core=True)")
        if not self.shared <= {"A", "B"} or self.shared & self.trains:
            raise ValueError(f"shared factors are frozen A or B, not {sorted(self.shared)}")
        if not self.keeps <= {"A", "B"} or self.keeps & self.shared:
            raise ValueError(f"kept factors are A or B that are not shared, not {sorted(self.keeps)}")

    @property
    def uploads(self) -> frozenset[str]:
        """What a client sends up: what it trained, less what it keeps."""
        return self.trains - self.keeps

    def describe(self) -> str:
        """ "trains A, B; uploads A, B" """
        parts = [f"trains {', '.join(sorted(self.trains))}"]
        if self.shared:
            parts.append(f"{', '.join(sorted(self.shared))} shared and frozen")
        if self.keeps:
            parts.append(f"keeps {', '.join(sorted(self.keeps))} on the client")
        if self.common_init:
            parts.append("starts from one common draw")
        parts.append(f"uploads {', '.join(sorted(self.uploads))}")
        return "; ".join(parts)


BOTH_FACTORS = ClientMode()


@dataclass(frozen=True)
class ClientStart:
    """How a client's LoRA starts this round.

    ``init``: the global adapter to start from (re-init scheme; scaling folded into B), or None for a fresh LoRA.
    ``shared``: per module, the frozen factors every client holds (rank >= this client's: it takes the leading
    rows of A, columns of B). ``keep_from``/``keep_as``: under which names the client's kept factors are looked up
    (None: the first round, fresh) and stored after training (the branches that go on from this training).
    ``init_seed``: the seed of a fresh LoRA's draw when it is common to every client (``ClientMode.common_init``);
    None: ``seed``, the client's own. ``report_kept``: send the kept factors too, beside the upload, so that the
    server can score each client's personalised model; they are a measurement of the simulation, not traffic: no
    rule aggregates them and the accounting leaves them out. ``gradient_examples``: above 0, the job trains nothing
    and uploads, per module, the gradient of the base weight summed over the client's first that many examples
    (``Method.gradient_examples``, a method that starts its shared factors from the first full-gradient step).
    A shared ``R`` holds a core's start as the update's core (scaling folded in): the client divides it by its own.
    ``upload_threshold``: below 1, the client uploads each module's update cut to the fewest components whose energy
    reaches it, in the cut form, with the update's spectrum (``florist.aggregation.truncation``); 1: the whole pair.
    """

    rank: int
    alpha: float
    seed: int
    mode: ClientMode = BOTH_FACTORS
    init: Adapter | None = None
    shared: Factors | None = None
    keep_from: str | None = None
    keep_as: tuple[str, ...] = ()
    report_kept: bool = False
    init_seed: int | None = None
    gradient_examples: int = 0
    upload_threshold: float = 1.0


@dataclass
class TrainingLog:
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    seconds: float = 0.0


@dataclass(frozen=True)
class BaseDelta:
    """One update in a client's frozen base (a past global update merged in, a residual), named for good by ``key``
    (its branch, round and part), so that a client holding it from an earlier round need not be sent it again.
    ``load`` gives the adapter: the server reads a past round's from its run directory only when it is needed."""

    key: str
    load: Callable[[], Adapter]

    @classmethod
    def of(cls, key: str, adapter: Adapter) -> BaseDelta:
        return cls(key, lambda: adapter)


@dataclass(frozen=True)
class ClientJob:
    """One client's training this round: its data index, where its LoRA starts, and the base it trains on: W0 plus
    every one of ``base_deltas``, in order."""

    client: int
    start: ClientStart
    base_deltas: tuple[BaseDelta, ...] = ()
    group: str = ""  # the training group: branches that share this round's client training

    def base_adapters(self) -> list[Adapter]:
        return [d.load() for d in self.base_deltas]


@dataclass
class ClientUpload:
    """What a client sends after training: per module its uploaded factors (``mode.uploads``) and its scaling, and
    for an upload cut at ``ClientStart.upload_threshold`` each module's whole spectrum (else empty)."""

    factors: Factors
    scalings: dict[str, float]
    num_examples: int
    spectra: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ClientReply:
    """A client's answer to a job, as an engine hands it to the server: its upload and its training log."""

    client: int
    upload: ClientUpload
    log: TrainingLog
    group: str = ""  # the job's training group


@dataclass
class RoundReplies:
    """What an engine returns for one round's jobs: the replies it got, and why each other job has none."""

    replies: list[ClientReply] = field(default_factory=list)
    failures: dict[tuple[str, int], str] = field(default_factory=dict)  # (group, client) -> reason

    def of_group(self, group: str) -> RoundReplies:
        return RoundReplies(
            [r for r in self.replies if r.group == group], {k: v for k, v in self.failures.items() if k[0] == group}
        )


@dataclass
class ClientResult:
    """A reply as the server keeps it: the upload completed into factors (``completed_factors``), the log, and each
    module's spectrum where the upload was cut (``ClientUpload.spectra``)."""

    client: int
    update: ClientUpdate
    log: TrainingLog
    spectra: dict[str, Tensor] = field(default_factory=dict)


class KeptFactors:
    """The factors clients keep between rounds (``ClientMode.keeps``), on the client side of an engine.

    Keyed by client and by the name the job gives (``ClientStart.keep_as``): the server never sees them.
    """

    def __init__(self):
        self._kept: dict[tuple[int, str], Factors] = {}

    def get(self, client: int, start: ClientStart) -> Factors | None:
        return None if start.keep_from is None else self._kept.get((client, start.keep_from))

    def put(self, client: int, start: ClientStart, kept: Factors) -> None:
        for name in start.keep_as:
            self._kept[(client, name)] = kept


SEED_PURPOSES = ("sampling", "client", "shared", "epoch", "fresh components", "common init")


def seed_for(run_seed: int, purpose: str, round_number: int = 0, client: int = 0) -> int:
    """Every seed a run draws, from the run's seed and what it is for: ``sampling`` (a round's clients), ``client``
    (a client's LoRA init in a round: the same for every branch, so training can be shared), ``shared`` (a round's
    shared frozen factors), ``epoch`` (a client's data order in one epoch, from its client seed), ``fresh components``
    (the new components ``FederatedLoRA`` adds to bring a global adapter up to the clients' rank), ``common init``
    (a round's one fresh LoRA draw for every client, ``ClientMode.common_init``).

    A 63-bit hash of all four, so seeds of different purposes, rounds or clients do not collide (a linear formula
    such as ``seed * P + round * Q + client`` repeats once ``client`` reaches ``Q``); any seed torch, numpy's
    ``SeedSequence`` and ``random.Random`` take.
    """
    if purpose not in SEED_PURPOSES:
        raise ValueError(f"no seed is drawn for {purpose!r}; purposes: {', '.join(SEED_PURPOSES)}")
    key = f"florist/{purpose}/{run_seed}/{round_number}/{client}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def shared_factors(shapes: Mapping[str, tuple[int, int]], mode: ClientMode, rank: int, seed: int) -> Factors:
    """The frozen factors a mode shares, drawn from ``seed`` like PEFT's init of A, U(-1/sqrt(n), 1/sqrt(n)).

    A is rank × n, B is m × rank (its bound 1/sqrt(rank)). Clients of smaller rank take the leading rows of A and
    columns of B, so heterogeneous ranks share one draw.
    """
    g = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for name in sorted(shapes):
        m, n = shapes[name]
        out[name] = {}
        if "A" in mode.shared:
            out[name]["A"] = (torch.rand(rank, n, generator=g) * 2 - 1) / math.sqrt(n)
        if "B" in mode.shared:
            out[name]["B"] = (torch.rand(m, rank, generator=g) * 2 - 1) / math.sqrt(rank)
    return out


def common_a(seed: int, name: str, rank: int, n: int) -> Tensor:
    """A fresh A that every client of a round draws alike (``ClientMode.common_init``), from PEFT's init distribution
    of A, U(-1/sqrt(n), 1/sqrt(n)).

    Nested across ranks: row j comes from the j-th draw of a generator seeded by ``seed`` and the module's name, so a
    client of rank r holds the leading r rows of a larger client's A, and averaging a row averages like with like.
    """
    g = torch.Generator().manual_seed(seed ^ int.from_bytes(hashlib.blake2b(name.encode(), digest_size=7).digest()))
    return torch.stack([(torch.rand(n, generator=g) * 2 - 1) / math.sqrt(n) for _ in range(rank)])


def leading(factor: str, t: Tensor, rank: int) -> Tensor:
    """A shared factor cut to a client's rank: A's leading rows, B's leading columns, R's leading block."""
    return t[:rank] if factor == "A" else t[:, :rank] if factor == "B" else t[:rank, :rank]


def upload_of(start: ClientStart, trained: Factors) -> Factors:
    """The factors a client uploads, from everything it trained and holds (A, B, and R with a core): its mode's
    uploads, and the factors it keeps when the job asks to see them (``ClientStart.report_kept``)."""
    sent = start.mode.uploads | (start.mode.keeps if start.report_kept else frozenset())
    return {name: {f: trained[name][f] for f in sorted(sent)} for name in trained}


def completed_factors(
    start: ClientStart, name: str, sent: Mapping[str, Tensor], scaling: float, shape: tuple[int, int]
) -> LoraFactors:
    """One module's pair as the server takes it: the uploaded factors, and for the others what the server sent.

    A shared factor is the server's draw; a frozen factor that started from the global adapter is the global one;
    with a core, B·R travels as the pair's B over the shared A. A factor the client keeps is the one it reported
    (``ClientStart.report_kept``), else unknown to the server and taken as zero at the module's ``shape`` (m, n);
    either way the method's rule may use it only for the client's personalised adapter. Raises KeyError for a
    factor the server cannot supply.
    """
    mode, r = start.mode, start.rank
    shared = (start.shared or {}).get(name, {})
    known: dict[str, Tensor] = {}
    for f in ("A", "B"):
        if f in mode.uploads:
            known[f] = sent[f]
        elif f in shared:
            known[f] = leading(f, shared[f], r).float().clone()
        elif start.init is not None and name in start.init and f not in mode.keeps:
            g = start.init[name]
            known[f] = (g.A[:r] if f == "A" else g.B[:, :r] / scaling).float().clone()
    if mode.core:
        known["B"] = known["B"] @ sent["R"]
    m, n = shape
    for f in mode.keeps:
        known[f] = sent[f] if start.report_kept else torch.zeros((r, n) if f == "A" else (m, r))
    return LoraFactors(A=known["A"], B=known["B"], scaling=scaling)


def cut_upload(upload: ClientUpload, threshold: float) -> ClientUpload:
    """A whole-pair upload cut, module by module, to the fewest components whose energy reaches ``threshold``, with
    each module's spectrum (``truncated_pair``); at 1 the upload as it is."""
    if threshold >= 1.0:
        return upload
    factors, spectra = {}, {}
    for name, held in upload.factors.items():
        pair = LoraFactors(A=held["A"], B=held["B"], scaling=upload.scalings[name])
        cut, spectra[name] = truncated_pair(pair, threshold)
        factors[name] = {"A": cut.A, "B": cut.B}
    return ClientUpload(factors, dict(upload.scalings), upload.num_examples, spectra)
