"""Instruction data for federated fine-tuning: load, prompt, tokenize, split over clients.

>>> clients = load_clients("builtin", num_clients=8, scheme="dirichlet", alpha=0.5, seed=0)
>>> train = tokenize_dataset(clients[0], tokenizer, cutoff=512)
"""

from __future__ import annotations

from .builtin import builtin_heldout, builtin_heldout_answers, builtin_train
from .instructions import (
    BUILTIN,
    DATASET_ALIASES,
    DataError,
    build_prompt,
    client_files,
    is_client_folder,
    load_client_folder,
    load_instructions,
    normalize_row,
    tokenize_dataset,
)
from .partition import SCHEMES, heterogeneity, load_client, load_clients, partition, partition_of, summary_table
from .schema import COLUMNS

__all__ = [
    "BUILTIN",
    "COLUMNS",
    "DATASET_ALIASES",
    "SCHEMES",
    "DataError",
    "build_prompt",
    "builtin_heldout",
    "builtin_heldout_answers",
    "builtin_train",
    "client_files",
    "heterogeneity",
    "is_client_folder",
    "load_client",
    "load_client_folder",
    "load_clients",
    "load_instructions",
    "normalize_row",
    "partition",
    "partition_of",
    "summary_table",
    "tokenize_dataset",
]
