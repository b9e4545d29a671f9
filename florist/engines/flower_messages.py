"""Flower records <-> florist's jobs and client uploads, and the bytes each message carries.

A ``query.describe`` message carries the run's config; the SuperNode answers with ``node`` (its partition-id,
the client index, and its number of examples). A training message for one client holds:

- ``job`` (ConfigRecord): round, training group, client index, its ``ClientStart`` scalars (rank, alpha, seed), its
  ``ClientMode`` (``trains``, ``shared``, ``keeps``: lists of factor names; ``core``), the names its kept factors are
  looked up under (``keep-from``, "" in a first round) and stored under (``keep-as``), and the run's config as TOML;
- ``init`` (ArrayRecord): the global adapter the client's LoRA starts from (re-init scheme);
- ``shared`` (ArrayRecord): the frozen factors every client holds (``{module}.A`` and/or ``{module}.B``), cut to the
  client's rank, and a core's start (``{module}.R``) where the method gives one;
- ``base-0``, ``base-1``, ... (ArrayRecords): of the updates in the client's base (past global updates under the
  merge scheme, residuals), whose keys the job lists in order (``base-keys``), those the node does not hold yet: the
  node keeps every one it is sent in its ``context.state``, so the newest round's is all a node that took part
  before needs, and one that lost its state says so (``NOT_HELD``) and is sent them all.

The reply holds ``update`` (ArrayRecord: ``{module}.{factor}`` for exactly the factors its mode uploads, of A, B
and R, and no other array; a gradient job's ``{module}.G``, the summed gradient of the base weight), for a job with
an ``upload-threshold`` below 1 ``spectra`` (ArrayRecord: each module's singular values, ``{module}``), and ``meta``
(ConfigRecord: the echo of round, group and client, the example count, scalings, training log). Arrays travel as
float32 numpy arrays, which Flower serialises with ``allow_pickle=False``: nothing is ever pickled.

A reply is untrusted, and a SuperNode reads its job no less carefully: every field of a record is read by one of the
typed readers below (``int_field``, ``float_field``, ``str_field``, ``bool_field``, ``list_field``), which take a
value only of the expected type and range (a bool is no integer, NaN no number, a list no longer than its bound)
and otherwise raise a one-line ``MessageError`` naming the field; a message holding records it should not is refused
too, and so is a reply holding another factor than its mode uploads. ``read_update`` reads an array only after
checking its header against its bytes (a header cannot make the server allocate more than was sent), and refuses a
reply whose arrays hold more than ``max_bytes``. The upload it returns is then completed from what the server sent
and screened (``florist.server.Federation.screen``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from ..aggregation import Adapter, LoraFactors, ModuleAggregate
from ..jobs import (
    FACTORS,
    GRADIENT,
    BaseDelta,
    ClientJob,
    ClientMode,
    ClientReply,
    ClientStart,
    ClientUpload,
    Factors,
    TrainingLog,
    leading,
)

JOB, INIT, SHARED, UPDATE, META, NODE = "job", "init", "shared", "update", "meta", "node"
SPECTRA = "spectra"  # a cut upload's spectra, one vector per module
BASE_PREFIX = "base-"
T = TypeVar("T")

TRAIN = "train"  # a ClientJob: train and reply with the upload
DESCRIBE = "query.describe"  # which client is this SuperNode, and how many examples does it hold


class MessageError(ValueError):
    """A record that does not hold what a florist message must; the message names what is missing."""


MAX_REASON = 300  # characters of a SuperNode's error text kept in the log and the traffic record


def error_reason(reply: Message) -> str:
    """An error reply's reason, on one line and cut short: it is the SuperNode's text. A long one keeps its start and
    its end, where a traceback (Flower's simulation sends the whole of Ray's) names the exception and its message."""
    reason = " ".join(str(reply.error.reason).split()) or f"error code {reply.error.code}"
    if len(reason) <= MAX_REASON:
        return reason
    head = MAX_REASON // 3
    return reason[:head] + " ... " + reason[-(MAX_REASON - head - 5) :]


# --- fields of untrusted records -------------------------------------------------------------------------------------

INT64 = (-(2**63), 2**63 - 1)
MAX_INDEX = 2**31 - 1  # a round, a client index, a rank
MAX_EXAMPLES = 10**12  # the most examples a client may claim: far beyond any client's data
MAX_STEPS = 10**6  # optimizer steps (and losses) one reply may report: about eleven days at a step a second
MAX_TOKENS = 10**15
MAX_SECONDS = 10**9  # about 30 years: summed over any number of clients, still a finite float
MAX_MODULES = 100_000  # adapted modules a reply may name: far beyond any model's linear layers
MAX_TEXT = 1000  # characters of a name in a record: a module, a training group, a client id
SHOWN = 40  # characters of a bad value that an error message shows


def shown(value: object) -> str:
    """A bad value as an error message shows it: short and on one line (repr escapes line breaks)."""
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > SHOWN:
        return f"a {type(value).__name__} of length {len(value)}"
    try:
        text = repr(value)
    except Exception:  # an int of more digits than Python prints, a value whose repr fails
        return f"a {type(value).__name__}"
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."


def field(record: Mapping, key: str, where: str) -> object:
    if key not in record:
        raise MessageError(f"{where}: no {key!r}")
    return record[key]


def as_int(value: object, what: str, lo: int, hi: int) -> int:
    """``value`` if it is an integer (not a bool) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError(f"{what} is {shown(value)}, not an integer")
    if not lo <= value <= hi:
        raise MessageError(f"{what} is {shown(value)}, outside [{lo}, {hi}]")
    return int(value)


def as_float(value: object, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """``value`` as a float if it is a finite number (not a bool) in ``[lo, hi]``; an integer is taken as one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MessageError(f"{what} is {shown(value)}, not a number")
    try:
        x = float(value)
    except OverflowError:  # an integer beyond float range
        raise MessageError(f"{what} is {shown(value)}, beyond float range") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        bounds = f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) or math.isfinite(hi) else ""
        raise MessageError(f"{what} is {shown(x)}, not a finite number{bounds}")
    return x


def as_str(value: object, what: str, max_len: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise MessageError(f"{what} is {shown(value)}, not a string")
    if len(value) > max_len:
        raise MessageError(f"{what} is a string of {len(value)} characters, over {max_len}")
    return str(value)


def as_bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise MessageError(f"{what} is {shown(value)}, not true or false")
    return bool(value)


def as_list(value: object, what: str, item: Callable[[object, str], T], max_len: int) -> list[T]:
    """``value``'s items, each read by ``item(x, name)``, if it is a list of at most ``max_len`` items."""
    if not isinstance(value, (list, tuple)):
        raise MessageError(f"{what} is {shown(value)}, not a list")
    if len(value) > max_len:
        raise MessageError(f"{what} has {len(value)} items, over {max_len}")
    return [item(x, f"{what}[{i}]") for i, x in enumerate(value)]


def int_field(record: Mapping, key: str, where: str, lo: int, hi: int) -> int:
    return as_int(field(record, key, where), f"{where}: {key}", lo, hi)


def float_field(record: Mapping, key: str, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    return as_float(field(record, key, where), f"{where}: {key}", lo, hi)


def str_field(record: Mapping, key: str, where: str, max_len: int = MAX_TEXT) -> str:
    return as_str(field(record, key, where), f"{where}: {key}", max_len)


def bool_field(record: Mapping, key: str, where: str) -> bool:
    return as_bool(field(record, key, where), f"{where}: {key}")


def list_field(record: Mapping, key: str, where: str, item: Callable[[object, str], T], max_len: int) -> list[T]:
    return as_list(field(record, key, where), f"{where}: {key}", item, max_len)


def only_records(content: RecordDict, where: str, configs: Collection[str] = (), arrays: Collection[str] = ()) -> None:
    """Refuse a message holding any record but the config records ``configs`` and array records ``arrays``."""
    extra = (
        [f"config record {shown(k)}" for k in content.config_records if k not in configs]
        + [f"array record {shown(k)}" for k in content.array_records if k not in arrays]
        + [f"metric record {shown(k)}" for k in content.metric_records]
    )
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise MessageError(f"{where}: an unexpected {extra[0]}{more}")


# --- tensors <-> arrays ----------------------------------------------------------------------------------------------


def _array(t: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()))


def _tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(a.numpy().copy())


def checked_tensor(a: object, where: str) -> torch.Tensor:
    """An untrusted array: a floating point .npy whose header's shape accounts for exactly the bytes sent."""
    data = getattr(a, "data", None)
    if not isinstance(a, Array) or not isinstance(data, bytes):
        raise MessageError(f"{where}: not an array")
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = header(stream)
    except Exception as e:  # numpy raises ValueError, SyntaxError, ... on a broken header
        raise MessageError(f"{where}: not a readable .npy array ({type(e).__name__})") from None
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise MessageError(f"{where}: dtype {dtype}, expected float16, float32 or float64")
    if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(data) - stream.tell():
        raise MessageError(
            f"{where}: its header claims shape {shape} of {dtype}, which the {len(data)} bytes sent do not hold"
        )
    try:
        return _tensor(a)
    except Exception as e:
        raise MessageError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None


def arrays_bytes(content: RecordDict) -> int:
    """The bytes of every array in a message as sent (not as their headers claim)."""
    return sum(
        len(getattr(a, "data", b"") or b"") for record in content.array_records.values() for a in record.values()
    )


def adapter_record(adapter: Mapping[str, ModuleAggregate | LoraFactors]) -> ArrayRecord:
    """``{module}.A`` and ``{module}.B`` for every module, float32, in the adapter's module order."""
    record = ArrayRecord()
    for name, m in adapter.items():
        record[f"{name}.A"] = _array(m.A)
        record[f"{name}.B"] = _array(m.B)
    return record


def factors_record(factors: Factors) -> ArrayRecord:
    """``{module}.{factor}`` for every factor of every module, float32."""
    return ArrayRecord({f"{name}.{f}": _array(t) for name, held in factors.items() for f, t in sorted(held.items())})


def _factor(record: ArrayRecord, name: str, factor: str, where: str, checked: bool = False) -> torch.Tensor:
    key = f"{name}.{factor}"
    if key not in record:
        raise MessageError(f"{where}: no array {shown(key)}")
    return checked_tensor(record[key], f"{where}, array {shown(key)}") if checked else _tensor(record[key])


def module_names(record: ArrayRecord) -> list[str]:
    """The modules an adapter or factors record holds arrays of (``{module}.{factor}``), in its order."""
    return list(dict.fromkeys(key.rsplit(".", 1)[0] for key in record))


def adapter_from_record(record: ArrayRecord, where: str) -> Adapter:
    return {
        n: ModuleAggregate(A=_factor(record, n, "A", where, True), B=_factor(record, n, "B", where, True))
        for n in module_names(record)
    }


def read_factors(
    record: ArrayRecord, names: Collection[str], factors: Collection[str], where: str, what: str, checked: bool = True
) -> Factors:
    """Exactly ``factors`` of every module in ``names``; an array of any other name is refused (``what`` says which
    factors were expected, for the error)."""
    expected = {f"{n}.{f}" for n in names for f in factors}
    extra = [key for key in record if key not in expected]
    if extra:
        listed = ", ".join(sorted(factors)) or "none"
        raise MessageError(f"{where}: array {shown(extra[0])} is none of {what} ({listed} per module)")
    return {n: {f: _factor(record, n, f, where, checked) for f in sorted(factors)} for n in names}


def payload_bytes(record: ArrayRecord, keys=None) -> int:
    """Bytes of the array data (elements x item size), without Flower's framing: what the adapter costs on the wire."""
    return sum(_data_bytes(a) for key, a in record.items() if keys is None or key in keys)


def _data_bytes(a: Array) -> int:
    try:
        dims, itemsize = [int(d) for d in a.shape], np.dtype(a.dtype).itemsize
    except (TypeError, ValueError):
        dims, itemsize = [-1], 0
    if any(d < 0 for d in dims):  # a reply's array whose declared dtype or shape means nothing: count what came
        return len(a.data)
    return math.prod(dims) * itemsize


# --- the description (SuperNode -> server) ---------------------------------------------------------------------------


def description_content(client: int, num_examples: int) -> RecordDict:
    return RecordDict({NODE: ConfigRecord({"partition-id": client, "num-examples": num_examples})})


def read_description(
    content: RecordDict, where: str, num_clients: int, max_examples: int = MAX_EXAMPLES
) -> tuple[int, int]:
    """The client a SuperNode says it is and the examples it says it holds: a ``node`` record of exactly those two
    fields, a client index of the run and a count within ``max_examples``; anything else raises ``MessageError``."""
    if NODE not in content.config_records:
        raise MessageError(f"{where}: no {NODE!r} record")
    only_records(content, where, configs=[NODE])
    node = content.config_records[NODE]
    extra = [k for k in node if k not in ("partition-id", "num-examples")]
    if extra:
        raise MessageError(f"{where}: an unexpected field {shown(extra[0])}")
    return (
        int_field(node, "partition-id", where, 0, num_clients - 1),
        int_field(node, "num-examples", where, 0, max_examples),
    )


# --- the job (server -> client) --------------------------------------------------------------------------------------

MAX_KEEP_NAMES = 10_000  # branches a client's kept factors may go on under: far beyond any run's


MAX_BASE_KEYS = 10**6  # updates a client's base may name: a million rounds of one branch
MAX_BASE_KEY = 2 * MAX_TEXT  # characters of one: a branch's label, its round and a part


def job_content(job: ClientJob, round_number: int, config_toml: str, held: Collection[str] = ()) -> RecordDict:
    """A training message: the job's fields, its run's config, and its arrays; of the updates in the client's base,
    every one's key but the arrays only of those not in ``held`` (what the node was sent before and kept)."""
    """The training message for ``job``: its start, its mode, the arrays it starts from, and the run's config."""
    start, mode = job.start, job.start.mode
    content = RecordDict(
        {
            JOB: ConfigRecord(
                {
                    "round": round_number,
                    "group": job.group,
                    "client": job.client,
                    "rank": start.rank,
                    "alpha": float(start.alpha),
                    "seed": start.seed,
                    "trains": sorted(mode.trains),
                    "shared": sorted(mode.shared),
                    "keeps": sorted(mode.keeps),
                    "core": mode.core,
                    "common-init": mode.common_init,
                    "keep-from": start.keep_from or "",
                    "keep-as": list(start.keep_as),
                    "report-kept": start.report_kept,
                    "init-seed": -1 if start.init_seed is None else start.init_seed,
                    "gradient-examples": start.gradient_examples,
                    "upload-threshold": float(start.upload_threshold),
                    "base-keys": [d.key for d in job.base_deltas],
                    "config": config_toml,
                }
            )
        }
    )
    if start.init is not None:
        content[INIT] = adapter_record(start.init)
    if start.shared is not None:
        content[SHARED] = factors_record(
            {n: {f: leading(f, t, start.rank) for f, t in held.items()} for n, held in start.shared.items()}
        )
    for i, delta in enumerate(job.base_deltas):
        if delta.key not in held:
            content[f"{BASE_PREFIX}{i}"] = adapter_record(delta.load())
    return content


def job_config(content: RecordDict) -> ConfigRecord:
    if JOB not in content.config_records:
        raise MessageError("message without a 'job' record")
    return content.config_records[JOB]


def _as_factor(value: object, what: str) -> str:
    name = as_str(value, what, max_len=1)
    if name not in FACTORS:
        raise MessageError(f"{what} is {shown(name)}, not one of {', '.join(FACTORS)}")
    return name


def read_mode(job: ConfigRecord, where: str) -> ClientMode:
    """The ``ClientMode`` a job record names; one that ``ClientMode`` itself refuses is a ``MessageError`` too."""
    lists = {
        key: list_field(job, key, where, _as_factor, max_len=len(FACTORS)) for key in ("trains", "shared", "keeps")
    }
    core, common = bool_field(job, "core", where), bool_field(job, "common-init", where)
    try:
        return ClientMode(
            trains=lists["trains"], shared=lists["shared"], keeps=lists["keeps"], core=core, common_init=common
        )
    except ValueError as e:
        raise MessageError(f"{where}: {e}") from None


def read_job(content: RecordDict) -> ClientJob:
    """The ``ClientJob`` a training message describes (the config TOML stays in ``job_config(content)``)."""
    job = job_config(content)
    client = int_field(job, "client", "the training job", 0, MAX_INDEX)
    where = f"round {int_field(job, 'round', 'the training job', 1, MAX_INDEX)} client {client}'s job"
    mode = read_mode(job, where)
    arrays = content.array_records
    keys = list_field(job, "base-keys", where, lambda v, what: as_str(v, what, MAX_BASE_KEY), MAX_BASE_KEYS)
    merged = [f"{BASE_PREFIX}{i}" for i in range(len(keys))]
    held = list(arrays[SHARED]) if SHARED in arrays else []
    sent = set(mode.shared) | ({"R"} if mode.core and any(key.endswith(".R") for key in held) else set())
    only_records(content, where, configs=[JOB], arrays=[INIT, *([SHARED] if sent else []), *merged])
    if mode.shared and SHARED not in arrays:
        raise MessageError(f"{where}: no array record {SHARED!r} for the factors its mode shares")
    shared = (
        read_factors(arrays[SHARED], module_names(arrays[SHARED]), sent, where, "the factors its mode shares")
        if sent
        else None
    )
    deltas = []
    for key, name in zip(keys, merged):
        if name in arrays:
            deltas.append(BaseDelta.of(key, adapter_from_record(arrays[name], f"{where}, {name}")))
        else:
            deltas.append(BaseDelta(key, _not_sent(key)))
    keep_from = str_field(job, "keep-from", where)
    start = ClientStart(
        rank=int_field(job, "rank", where, 1, MAX_INDEX),
        alpha=float_field(job, "alpha", where, 0.0),
        seed=int_field(job, "seed", where, *INT64),
        mode=mode,
        init=adapter_from_record(arrays[INIT], f"{where}, init") if INIT in arrays else None,
        shared=shared,
        keep_from=keep_from or None,
        keep_as=tuple(list_field(job, "keep-as", where, as_str, max_len=MAX_KEEP_NAMES)),
        report_kept=bool_field(job, "report-kept", where),
        init_seed=None if (init_seed := int_field(job, "init-seed", where, -1, INT64[1])) < 0 else init_seed,
        gradient_examples=int_field(job, "gradient-examples", where, 0, MAX_EXAMPLES),
        upload_threshold=upload_threshold(job, where),
    )
    return ClientJob(client, start, tuple(deltas), group=str_field(job, "group", where))


class BaseNotHeld(MessageError):
    """A job names a base update its message does not carry, and the node does not hold it (its state was lost)."""


NOT_HELD = "does not hold base update"  # how a node's error reply says so: the server then sends the whole base


def _not_sent(key: str) -> Callable[[], Adapter]:
    def load() -> Adapter:
        raise BaseNotHeld(f"this node {NOT_HELD} {key!r}, which the message leaves out as sent before")

    return load


def sent_base_keys(content: RecordDict) -> set[str]:
    """The keys of the base updates a training message carries (the others the node should hold)."""
    keys = job_config(content)["base-keys"]
    return {k for i, k in enumerate(keys) if f"{BASE_PREFIX}{i}" in content.array_records}


def upload_threshold(job: ConfigRecord, where: str) -> float:
    """A job's upload threshold, in (0, 1]; a job from a server that predates it (no field) asks for whole pairs."""
    if "upload-threshold" not in job:
        return 1.0
    threshold = float_field(job, "upload-threshold", where, 0.0, 1.0)
    if threshold <= 0.0:
        raise MessageError(f"{where}: upload-threshold is {threshold}, expected a number in (0, 1]")
    return threshold


# --- the upload (client -> server) -----------------------------------------------------------------------------------


def update_content(job: ConfigRecord, upload: ClientUpload, log: TrainingLog) -> RecordDict:
    """The client's uploaded factors, scalings, example count and training log, echoing the job."""
    names, where = list(upload.factors), "the training job"
    meta = ConfigRecord(
        {
            "round": int_field(job, "round", where, 1, MAX_INDEX),
            "group": str_field(job, "group", where),
            "client": int_field(job, "client", where, 0, MAX_INDEX),
            "num-examples": upload.num_examples,
            "modules": names,
            "scalings": [float(upload.scalings[n]) for n in names],
            "steps": log.steps,
            "tokens": log.tokens,
            "losses": [float(x) for x in log.losses],
            "seconds": float(log.seconds),
        }
    )
    content = RecordDict({UPDATE: factors_record(upload.factors), META: meta})
    if upload.spectra:
        content[SPECTRA] = ArrayRecord({name: _array(S) for name, S in upload.spectra.items()})
    return content


def read_echo(content: RecordDict) -> tuple[int, str, int]:
    """The round, training group and client a reply says it answers (``meta``'s echo of the job)."""
    if META not in content.config_records:
        raise MessageError("reply without a 'meta' record")
    meta, where = content.config_records[META], "reply"
    return (
        int_field(meta, "round", where, 1, MAX_INDEX),
        str_field(meta, "group", where),
        int_field(meta, "client", where, 0, MAX_INDEX),
    )


def check_echo(content: RecordDict, round_number: int, group: str, client: int) -> None:
    """Refuse a reply whose echo of the job (round, training group, client) is not the job's."""
    echo = read_echo(content)
    if echo != (round_number, group, client):
        raise MessageError(
            f"reply for round {echo[0]} group {echo[1]!r:.60} client {echo[2]} answers the job for "
            f"round {round_number} group {group!r} client {client}"
        )


def read_update(
    content: RecordDict, job: ClientJob, max_bytes: int = 0, num_examples: int | None = None
) -> ClientReply:
    """The client's reply to ``job``: exactly the factors its mode uploads (``job.start.mode.uploads``), per module;
    for a gradient job (``ClientStart.gradient_examples``) exactly one summed gradient ``G`` per module.

    Anything malformed raises ``MessageError``, as does a reply whose arrays hold more than ``max_bytes`` (0: no limit),
    one holding a factor its mode does not upload (a forged shared A, a kept factor) or lacking one it does, and,
    when ``num_examples`` is given (what the client's SuperNode said it holds), one that claims another count.
    """
    where = f"client {job.client}'s update"
    if UPDATE not in content.array_records or META not in content.config_records:
        raise MessageError(f"client {job.client}: reply without 'update' and 'meta' records")
    size = arrays_bytes(content)
    if max_bytes and size > max_bytes:
        raise MessageError(f"{where}: its arrays hold {size} bytes, over federation.max_update_bytes={max_bytes}")
    start_cut = job.start.upload_threshold < 1.0
    only_records(content, where, configs=[META], arrays=[UPDATE, *([SPECTRA] if start_cut else [])])
    record, meta = content.array_records[UPDATE], content.config_records[META]
    start = job.start
    uploads = start.mode.uploads | (start.mode.keeps if start.report_kept else frozenset())
    if start.gradient_examples:
        uploads = frozenset({GRADIENT})
    names = list_field(meta, "modules", where, as_str, max_len=MAX_MODULES)
    scalings = list_field(meta, "scalings", where, as_float, max_len=MAX_MODULES)
    if len(names) != len(scalings) or len(set(names)) != len(names):
        raise MessageError(f"{where}: {len(names)} module names (some repeated?) for {len(scalings)} scalings")
    factors = read_factors(record, names, uploads, where, "the factors its mode uploads")
    examples = int_field(meta, "num-examples", where, 0, MAX_EXAMPLES)
    if num_examples is not None and examples != num_examples:
        raise MessageError(f"{where}: num-examples is {examples}, but its SuperNode said it holds {num_examples}")
    losses = list_field(meta, "losses", where, lambda x, what: as_float(x, what, 0.0), max_len=MAX_STEPS)
    log = TrainingLog(
        steps=int_field(meta, "steps", where, 0, MAX_STEPS),
        tokens=int_field(meta, "tokens", where, 0, MAX_TOKENS),
        losses=losses,
        seconds=float_field(meta, "seconds", where, 0.0, MAX_SECONDS),
    )
    spectra = read_spectra(content, names, where) if start_cut else {}
    upload = ClientUpload(factors, dict(zip(names, scalings)), num_examples=examples, spectra=spectra)
    return ClientReply(job.client, upload, log, job.group)


def read_spectra(content: RecordDict, names: Collection[str], where: str) -> dict[str, torch.Tensor]:
    """A cut upload's spectra: exactly one array per module it sends (``florist.server.cut_problem`` then checks that
    each is the spectrum of what was sent)."""
    if SPECTRA not in content.array_records:
        raise MessageError(f"{where}: its job asked for a cut upload, and it sent no {SPECTRA!r} record")
    record = content.array_records[SPECTRA]
    extra = [key for key in record if key not in set(names)]
    if extra:
        raise MessageError(f"{where}: spectrum {shown(extra[0])} is of no module it sends")
    missing = [n for n in names if n not in record]
    if missing:
        raise MessageError(f"{where}: no spectrum for module {shown(missing[0])}")
    return {n: checked_tensor(record[n], f"{where}, spectrum {shown(n)}") for n in names}


# --- traffic ---------------------------------------------------------------------------------------------------------


def downlink_bytes(content: RecordDict) -> dict[str, int]:
    """What a training message carries, by purpose, counted from its arrays.

    ``adapter``: the newest global adapter for this client (the init, or the last merged update), counted as
    ``florist.communication`` counts the download of a method that sends its clients the factors they upload
    (``Method.downloads``' default): the factors of this job's ``mode.uploads``, a core R as rank² numbers.
    ``resent_state``: what the client held before in a deployment that kept it: the older base updates the message
    carries (to a node that sat rounds out or lost its state), and the factors of the newest adapter that its mode
    does not upload. ``shared``: the round's shared frozen factors (one seed would do
    in a deployment that draws them on the client).
    """
    job = job_config(content)
    arrays = content.array_records
    uploads = read_mode(job, "the training job").uploads
    merged = [f"{BASE_PREFIX}{i}" for i in range(len(job["base-keys"])) if f"{BASE_PREFIX}{i}" in arrays]
    newest = INIT if INIT in arrays else (merged[-1] if merged else None)
    adapter = _download_bytes(arrays[newest], uploads) if newest is not None else 0
    total = sum(payload_bytes(r) for r in arrays.values())
    shared = payload_bytes(arrays[SHARED]) if SHARED in arrays else 0
    return {"adapter": adapter, "resent_state": total - adapter - shared, "shared": shared, "total": total}


def _download_bytes(record: ArrayRecord, factors: frozenset[str]) -> int:
    """The named factors of an adapter record, as ``florist.communication.factor_params`` counts them, in bytes."""
    total = 0
    for name in module_names(record):
        a, b = record[f"{name}.A"], record[f"{name}.B"]
        itemsize = np.dtype(a.dtype).itemsize
        sizes = {"A": _data_bytes(a), "B": _data_bytes(b), "R": int(a.shape[0]) ** 2 * itemsize}
        total += sum(sizes[f] for f in factors)
    return total


def uplink_bytes(content: RecordDict) -> dict[str, int]:
    """The reply's arrays: the client's factors as ``florist.communication`` counts an upload."""
    adapter = payload_bytes(content.array_records[UPDATE]) if UPDATE in content.array_records else 0
    return {"adapter": adapter, "total": sum(payload_bytes(r) for r in content.array_records.values())}
