"""The instruction schema every loader produces and the built-in dataset is written in: four string columns,
``""`` where a source has no such field."""

from __future__ import annotations

COLUMNS = ("instruction", "input", "output", "category")
