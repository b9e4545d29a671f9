"""Flower records <-> florist's jobs and client updates, and the bytes each message carries.

A ``query.describe`` message carries the run's config; the SuperNode answers with ``node`` (its partition-id,
the client index, and its number of examples). A training message for one client holds:

- ``job`` (ConfigRecord): round, training group, client index, its ``ClientStart`` scalars (rank, alpha,
  seed), whether the method moves A (``sends-a``, False for FFA-LoRA), and the run's config as TOML;
- ``init`` (ArrayRecord): the global adapter the client's LoRA starts from (re-init scheme);
- ``frozen-a`` (ArrayRecord): FFA-LoRA's shared frozen A;
- ``base-0``, ``base-1``, ... (ArrayRecords): the past global updates merged into the client's base (merge scheme).

The reply holds ``update`` (ArrayRecord: each module's B, and A unless the method keeps A frozen) and
``meta`` (ConfigRecord: example count, scalings, training log). Arrays travel as float32 numpy arrays,
which Flower serialises with ``allow_pickle=False``: nothing is ever pickled.

A reply is untrusted: ``read_update`` turns whatever is malformed in it into a ``MessageError``, reads an array
only after checking its header against its bytes (a header cannot make the server allocate more than was sent),
and refuses a reply whose arrays hold more than ``max_bytes``. The factors it returns are then screened by the
server (``florist.aggregation.screen_updates``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from ..aggregation import ClientUpdate, LoraFactors, ModuleAggregate
from ..base_weights import Delta
from ..client import ClientStart, TrainingLog
from ..server import ClientJob, ClientResult

JOB, INIT, FROZEN_A, UPDATE, META, NODE = "job", "init", "frozen-a", "update", "meta", "node"
BASE_PREFIX = "base-"

TRAIN = "train"  # a ClientJob: train and reply with the update
DESCRIBE = "query.describe"  # which client is this SuperNode, and how many examples does it hold


class MessageError(ValueError):
    """A record that does not hold what a florist message must; the message names what is missing."""


# --- tensors <-> arrays ----------------------------------------------------------------------------------------------


def _array(t: torch.Tensor) -> Array:
    return Array(np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy()))


def _tensor(a: Array) -> torch.Tensor:
    return torch.from_numpy(a.numpy().copy())


def _checked_tensor(a: object, where: str) -> torch.Tensor:
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
        raise MessageError(f"{where}: its header claims shape {shape} of {dtype}, which the {len(data)} bytes sent do not hold")
    try:
        return _tensor(a)
    except Exception as e:
        raise MessageError(f"{where}: cannot be read ({type(e).__name__}: {e})") from None


def arrays_bytes(content: RecordDict) -> int:
    """The bytes of every array in a message as sent (not as their headers claim)."""
    return sum(len(getattr(a, "data", b"") or b"") for record in content.array_records.values() for a in record.values())


def adapter_record(adapter: Mapping[str, ModuleAggregate | LoraFactors], with_a: bool = True) -> ArrayRecord:
    """``{module}.B`` (and ``{module}.A``) for every module, float32, in the adapter's module order."""
    record = ArrayRecord()
    for name, m in adapter.items():
        if with_a:
            record[f"{name}.A"] = _array(m.A)
        record[f"{name}.B"] = _array(m.B)
    return record


def _factor(record: ArrayRecord, name: str, factor: str, where: str, checked: bool = False) -> torch.Tensor:
    key = f"{name}.{factor}"
    if key not in record:
        raise MessageError(f"{where}: no array {key!r}")
    return _checked_tensor(record[key], f"{where}, array {key!r}") if checked else _tensor(record[key])


def _module_names(record: ArrayRecord) -> list[str]:
    return list(dict.fromkeys(key.rsplit(".", 1)[0] for key in record))


def read_adapter(record: ArrayRecord, where: str) -> Delta:
    return {n: ModuleAggregate(A=_factor(record, n, "A", where), B=_factor(record, n, "B", where)) for n in _module_names(record)}


def frozen_a_record(frozen_a: Mapping[str, torch.Tensor], rank: int) -> ArrayRecord:
    """The rows of FFA-LoRA's shared A that a client of ``rank`` uses (the leading ones)."""
    return ArrayRecord({name: _array(a[:rank]) for name, a in frozen_a.items()})


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


# --- the job (server -> client) --------------------------------------------------------------------------------------


def job_content(job: ClientJob, round_number: int, group: str, sends_a: bool, config_toml: str) -> RecordDict:
    start = job.start
    content = RecordDict(
        {
            JOB: ConfigRecord(
                {
                    "round": round_number,
                    "group": group,
                    "client": job.client,
                    "rank": start.rank,
                    "alpha": float(start.alpha),
                    "seed": start.seed,
                    "sends-a": sends_a,
                    "base-deltas": len(job.base_deltas),
                    "config": config_toml,
                }
            )
        }
    )
    if start.init is not None:
        content[INIT] = adapter_record(start.init)
    if start.frozen_a is not None:
        content[FROZEN_A] = frozen_a_record(start.frozen_a, start.rank)
    for i, delta in enumerate(job.base_deltas):
        content[f"{BASE_PREFIX}{i}"] = adapter_record(delta)
    return content


def job_config(content: RecordDict) -> ConfigRecord:
    if JOB not in content.config_records:
        raise MessageError("training message without a 'job' record")
    return content.config_records[JOB]


def read_job(content: RecordDict) -> ClientJob:
    """The ``ClientJob`` a training message describes (the config TOML stays in ``job_config(content)``)."""
    job = job_config(content)
    where = f"round {job['round']} client {job['client']}"
    arrays = content.array_records
    init = read_adapter(arrays[INIT], f"{where}: init") if INIT in arrays else None
    frozen_a = {n: _tensor(a) for n, a in arrays[FROZEN_A].items()} if FROZEN_A in arrays else None
    deltas = tuple(read_adapter(arrays[f"{BASE_PREFIX}{i}"], f"{where}: base delta {i}") for i in range(int(job["base-deltas"])))
    start = ClientStart(rank=int(job["rank"]), alpha=float(job["alpha"]), seed=int(job["seed"]), init=init, frozen_a=frozen_a)
    return ClientJob(int(job["client"]), start, deltas)


# --- the update (client -> server) -----------------------------------------------------------------------------------


def update_content(job: ConfigRecord, update: ClientUpdate, log: TrainingLog) -> RecordDict:
    """The client's factors (B only when the method keeps A frozen), scalings and training log, echoing the job."""
    names = list(update.modules)
    meta = ConfigRecord(
        {
            "round": job["round"],
            "group": job["group"],
            "client": job["client"],
            "client-id": update.client_id,
            "num-examples": update.num_examples,
            "modules": names,
            "scalings": [float(update.modules[n].scaling) for n in names],
            "steps": log.steps,
            "tokens": log.tokens,
            "losses": [float(x) for x in log.losses],
            "seconds": float(log.seconds),
        }
    )
    return RecordDict({UPDATE: adapter_record(update.modules, with_a=bool(job["sends-a"])), META: meta})


def read_update(content: RecordDict, job: ClientJob, max_bytes: int = 0) -> ClientResult:
    """The client's result; under FFA-LoRA its A is the frozen one the server sent (the client keeps it fixed).

    Anything malformed raises ``MessageError``, as does a reply whose arrays hold more than ``max_bytes`` (0: no limit).
    """
    where = f"client {job.client}'s update"
    if UPDATE not in content.array_records or META not in content.config_records:
        raise MessageError(f"client {job.client}: reply without 'update' and 'meta' records")
    size = arrays_bytes(content)
    if max_bytes and size > max_bytes:
        raise MessageError(f"{where}: its arrays hold {size} bytes, over federation.max_update_bytes={max_bytes}")
    try:
        return _read_update(content, job, where)
    except MessageError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise MessageError(f"{where}: malformed reply ({type(e).__name__}: {' '.join(str(e).split())})") from None


def _read_update(content: RecordDict, job: ClientJob, where: str) -> ClientResult:
    record, meta = content.array_records[UPDATE], content.config_records[META]
    names, scalings = list(meta["modules"]), list(meta["scalings"])
    if len(names) != len(scalings) or len(set(names)) != len(names):
        raise MessageError(f"{where}: {len(names)} module names (some repeated?) for {len(scalings)} scalings")
    frozen = job.start.frozen_a
    modules = {}
    for name, scaling in zip(names, scalings):
        B = _factor(record, name, "B", where, checked=True)
        if frozen is not None:  # the method keeps A fixed: the server's A, whatever the reply holds
            if name not in frozen:
                raise MessageError(f"{where}: module {name!r} has no frozen A")
            A = frozen[name][: job.start.rank].to(torch.float32).clone()
        else:
            A = _factor(record, name, "A", where, checked=True)
        modules[str(name)] = LoraFactors(A=A, B=B, scaling=float(scaling))
    update = ClientUpdate(modules, num_examples=int(meta["num-examples"]), client_id=str(meta["client-id"]))
    log = TrainingLog(steps=int(meta["steps"]), tokens=int(meta["tokens"]), losses=[float(x) for x in meta["losses"]],
                      seconds=float(meta["seconds"]))
    return ClientResult(job.client, update, log)


# --- traffic ---------------------------------------------------------------------------------------------------------


def downlink_bytes(content: RecordDict) -> dict[str, int]:
    """What a training message carries, by purpose, counted from its arrays.

    ``adapter``: the newest global adapter for this client (the init, or the last merged update), counted as
    ``florist.communication`` counts a download: B, and A only where the method moves A.
    ``resent_state``: what a stateful client would already hold: the older merged updates, and the A of the
    newest adapter when the method keeps A frozen (the client was sent it as ``frozen-a`` a round earlier).
    ``frozen_a``: FFA-LoRA's shared A for this round (one seed would do in a deployment that derives it locally).
    """
    job = job_config(content)
    arrays = content.array_records
    sends_a = bool(job["sends-a"])
    merged = [f"{BASE_PREFIX}{i}" for i in range(int(job["base-deltas"]))]
    newest = INIT if INIT in arrays else (merged[-1] if merged else None)
    adapter = 0
    if newest is not None:
        record = arrays[newest]
        adapter = payload_bytes(record, [k for k in record if k.endswith(".B") or sends_a])
    total = sum(payload_bytes(r) for r in arrays.values())
    frozen = payload_bytes(arrays[FROZEN_A]) if FROZEN_A in arrays else 0
    return {"adapter": adapter, "resent_state": total - adapter - frozen, "frozen_a": frozen, "total": total}


def uplink_bytes(content: RecordDict) -> dict[str, int]:
    """The reply's arrays: the client's factors as ``florist.communication`` counts an upload."""
    adapter = payload_bytes(content.array_records[UPDATE]) if UPDATE in content.array_records else 0
    return {"adapter": adapter, "total": sum(payload_bytes(r) for r in content.array_records.values())}
