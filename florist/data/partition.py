"""Split one instruction dataset over N clients with flwr-datasets' partitioners, seeded and reproducible.

- ``iid``: a seeded shuffle, then N equal contiguous parts.
- ``dirichlet``: for every category, client shares drawn from Dirichlet(alpha) (FLoRA/FLoRIST's non-IID split,
  alpha 0.5); a smaller alpha concentrates each category on fewer clients. Rows of a category are dealt out in their
  dataset order, so neighbouring rows (such as several phrasings of one fact) mostly go to the same client.
- ``shards``: rows sorted by category, cut into equal shards, ``shards_per_client`` random shards to each client.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Sequence

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner
from rich.table import Table

from ..progress import datasets_bars
from ..tables import TableColumn, fitted_table
from .instructions import DataError, client_files, is_client_folder, load_file, load_instructions

SCHEMES = ("iid", "dirichlet", "shards")


def _partitioner(
    ds: datasets.Dataset,
    num_clients: int,
    scheme: str,
    alpha: float,
    seed: int,
    column: str,
    min_size: int,
    shards_per_client: int,
) -> tuple[Partitioner, datasets.Dataset]:
    if scheme == "iid":
        # IidPartitioner cuts contiguous blocks; the seeded shuffle is what makes them IID.
        return IidPartitioner(num_partitions=num_clients), ds.shuffle(seed=seed)
    if column not in ds.column_names:
        raise DataError(f"{scheme} split needs column {column!r}; the dataset has {', '.join(ds.column_names)}")
    if scheme == "dirichlet":
        if not (alpha > 0 and math.isfinite(alpha)):  # an infinite alpha draws NaN shares
            raise DataError(f"alpha must be positive and finite, got {alpha}")
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=column,
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        ), ds
    if scheme == "shards":
        if shards_per_client < 1:
            raise DataError(f"shards per client must be at least 1, got {shards_per_client}")
        # Shards of ceil(rows / shards) rows, the last one shorter, so that no row is dropped.
        shard_size = math.ceil(len(ds) / (num_clients * shards_per_client))
        return ShardPartitioner(
            num_partitions=num_clients,
            partition_by=column,
            shard_size=shard_size,
            keep_incomplete_shard=True,
            shuffle=True,
            seed=seed,
        ), ds
    raise DataError(f"unknown partition scheme {scheme!r}; choose from {', '.join(SCHEMES)}")


def partition(
    ds: datasets.Dataset,
    num_clients: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    column: str = "category",
    min_size: int = 1,
    shards_per_client: int = 2,
) -> list[datasets.Dataset]:
    """``num_clients`` Datasets, the same ones for the same arguments.

    ``min_size`` (dirichlet): the Dirichlet draw is repeated, up to 10 times, until every client has at least this
    many rows; then it fails with an error. No scheme returns an empty client.
    """
    args = (num_clients, scheme, alpha, seed, column, min_size, shards_per_client)
    return _split(ds, args, range(num_clients))


def partition_of(
    ds: datasets.Dataset,
    num_clients: int,
    client: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    column: str = "category",
    min_size: int = 1,
    shards_per_client: int = 2,
) -> datasets.Dataset:
    """Client ``client``'s part alone, equal to ``partition(...)[client]``: a SuperNode of a 1,000-client run cuts out
    its own part without building the other 999 (a Dataset each, about a millisecond apiece)."""
    if not 0 <= client < num_clients:
        raise DataError(f"client {client} is out of range for {num_clients} clients")
    args = (num_clients, scheme, alpha, seed, column, min_size, shards_per_client)
    return _split(ds, args, [client])[0]


def _split(ds: datasets.Dataset, args: tuple, wanted: Sequence[int]) -> list[datasets.Dataset]:
    """The parts ``wanted`` of the split that ``args`` (``_partitioner``'s, after the dataset) name; each partitioner
    draws the whole split, seeded, before it cuts one part."""
    num_clients, scheme = args[:2]
    if num_clients < 1:
        raise DataError(f"the number of clients must be at least 1, got {num_clients}")
    if num_clients > len(ds):
        raise DataError(f"{len(ds)} rows cannot fill {num_clients} clients")
    partitioner, source = _partitioner(ds, *args)
    partitioner.dataset = source
    try:
        with datasets_bars(False), warnings.catch_warnings():  # no bars for the partitioners' small steps
            # Each Dirichlet retry warns before the draws either succeed or raise; a failure becomes a DataError below.
            warnings.filterwarnings(
                "ignore",
                message="The specified min_partition_size",
                module=r"flwr_datasets\.partitioner\.dirichlet_partitioner",
            )
            # The shards partitioner sorts with datasets, whose sort passes pyarrow an argument pyarrow 25 deprecates:
            # the call is datasets', not florist's.
            warnings.filterwarnings(
                "ignore",
                message="Specifying null_placement in SortOptions is deprecated",
                category=FutureWarning,
                module=r"pyarrow\.compute",
            )
            clients = [partitioner.load_partition(k) for k in wanted]
    except ValueError as e:
        raise DataError(
            f"{scheme} split of {len(ds)} rows over {num_clients} clients failed: {e} "
            f"(try a larger alpha, fewer clients or a smaller min size)"
        ) from None
    for k, client in zip(wanted, clients):
        if len(client) == 0:
            raise DataError(f"{scheme} split leaves client {k} empty; use fewer clients or another scheme")
    return clients


def load_clients(
    spec: str,
    num_clients: int | None = None,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    column: str = "category",
    resplit: bool = False,
) -> list[datasets.Dataset]:
    """Client datasets from a data spec: a folder of client files as it is (``resplit``: its files pooled and split
    like any other source), anything else loaded and partitioned (``num_clients`` defaults to 8, the paper's
    setting). ``seed`` also draws the facts of ``builtin``."""
    if num_clients is not None and num_clients < 1:  # before a folder's count is compared with it
        raise DataError(f"the number of clients must be at least 1, got {num_clients}")
    if not resplit and is_client_folder(spec):
        return [load_file(f) for f in _client_files(spec, num_clients)]
    clients = 8 if num_clients is None else num_clients
    return partition(load_instructions(spec, seed), clients, scheme, alpha, seed, column)


def load_client(
    spec: str,
    num_clients: int,
    client: int,
    scheme: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    column: str = "category",
    resplit: bool = False,
) -> datasets.Dataset:
    """One client's dataset, equal to ``load_clients(...)[client]``: of a folder only that client's file is read
    (unless ``resplit``)."""
    if num_clients < 1:
        raise DataError(f"the number of clients must be at least 1, got {num_clients}")
    if not 0 <= client < num_clients:
        raise DataError(f"client {client} is out of range: the run has data.clients={num_clients}")
    if not resplit and is_client_folder(spec):
        return load_file(_client_files(spec, num_clients)[client])
    return partition_of(load_instructions(spec, seed), num_clients, client, scheme, alpha, seed, column)


def _client_files(spec: str, num_clients: int | None) -> list:
    """A client folder's files, as many as the clients asked for (None: any number)."""
    files = client_files(spec)
    if num_clients is not None and num_clients != len(files):
        raise DataError(f"{spec} holds {len(files)} client files, but {num_clients} clients were asked for")
    return files


# ---------------------------------------------------------------------------------------------------------------------
# Describing a split


def category_counts(clients: Sequence[datasets.Dataset], column: str = "category") -> list[Counter[str]]:
    """Rows per category, per client (one empty category when the column is missing)."""
    return [Counter(c[column]) if column in c.column_names else Counter({"": len(c)}) for c in clients]


def heterogeneity(clients: Sequence[datasets.Dataset], column: str = "category") -> float:
    """Mean total-variation distance between each client's category mix and the whole: 0 when every client mirrors
    the whole, approaching 1 when clients hold disjoint categories."""
    counts = category_counts(clients, column)
    whole = sum(counts, Counter())
    total = sum(whole.values())
    distances = []
    for c in counts:
        n = sum(c.values())
        distances.append(0.5 * sum(abs(c[k] / n - whole[k] / total) for k in whole))
    return sum(distances) / len(distances)


def summary_table(
    clients: Sequence[datasets.Dataset], column: str = "category", title: str | None = None, width: int = 80
) -> Table:
    """Rows, share and category mix of each client, in a table at most ``width`` columns wide."""
    counts = category_counts(clients, column)
    total = sum(sum(c.values()) for c in counts)
    caption = f"heterogeneity (mean TV distance to the whole): {heterogeneity(clients, column):.2f}"
    columns = [TableColumn("client"), TableColumn("rows"), TableColumn("share"), TableColumn("categories")]
    columns.append(TableColumn(f"largest {column} shares", justify="left", prose=True))
    rows = []
    for k, c in enumerate(counts):
        n = sum(c.values())
        mix = ", ".join(f"{name or '(none)'} {count / n:.0%}" for name, count in c.most_common(3))
        rows.append([str(k), str(n), f"{n / total:.1%}", str(len(c)), mix])
    rows.append(["all", str(total), "100%", str(len(sum(counts, Counter()))), ""])
    return fitted_table(columns, rows, width, title=title, caption=caption, rule_after={len(rows) - 2})
