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
"""

from __future__ import annotations

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


def adapter_record(adapter: Mapping[str, ModuleAggregate | LoraFactors], with_a: bool = True) -> ArrayRecord:
    """``{module}.B`` (and ``{module}.A``) for every module, float32, in the adapter's module order."""
    record = ArrayRecord()
    for name, m in adapter.items():
        if with_a:
            record[f"{name}.A"] = _array(m.A)
        record[f"{name}.B"] = _array(m.B)
    return record


def _factor(record: ArrayRecord, name: str, factor: str, where: str) -> torch.Tensor:
    key = f"{name}.{factor}"
    if key not in record:
        raise MessageError(f"{where}: no array {key!r}")
    return _tensor(record[key])


def _module_names(record: ArrayRecord) -> list[str]:
    return list(dict.fromkeys(key.rsplit(".", 1)[0] for key in record))


def read_adapter(record: ArrayRecord, where: str) -> Delta:
    return {n: ModuleAggregate(A=_factor(record, n, "A", where), B=_factor(record, n, "B", where)) for n in _module_names(record)}


def frozen_a_record(frozen_a: Mapping[str, torch.Tensor], rank: int) -> ArrayRecord:
    """The rows of FFA-LoRA's shared A that a client of ``rank`` uses (the leading ones)."""
    return ArrayRecord({name: _array(a[:rank]) for name, a in frozen_a.items()})


def payload_bytes(record: ArrayRecord, keys=None) -> int:
    """Bytes of the array data (elements x item size), without Flower's framing: what the adapter costs on the wire."""
    return sum(
        int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
        for key, a in record.items()
        if keys is None or key in keys
    )


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


def read_update(content: RecordDict, job: ClientJob) -> ClientResult:
    """The client's result; under FFA-LoRA its A is the frozen one the server sent (the client keeps it fixed)."""
    if UPDATE not in content.array_records or META not in content.config_records:
        raise MessageError(f"client {job.client}: reply without 'update' and 'meta' records")
    record, meta = content.array_records[UPDATE], content.config_records[META]
    where = f"client {job.client}'s update"
    modules = {}
    for name, scaling in zip(meta["modules"], meta["scalings"]):
        B = _factor(record, name, "B", where)
        if f"{name}.A" in record:
            A = _factor(record, name, "A", where)
        elif job.start.frozen_a is not None and name in job.start.frozen_a:
            A = job.start.frozen_a[name][: job.start.rank].to(torch.float32).clone()
        else:
            raise MessageError(f"{where}: no array '{name}.A' and no frozen A for it")
        modules[name] = LoraFactors(A=A, B=B, scaling=float(scaling))
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
