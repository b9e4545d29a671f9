"""The methods florist compares, each declared once in its own file, and the one registry that finds them.

    >>> from florist.methods import aggregate
    >>> result = aggregate("florist", updates, value=0.9)  # value: the swept parameter, FLoRIST's τ
    >>> result.modules["model.layers.0.self_attn.q_proj"].rank

To add a method, subclass ``Method`` in a new file: a file in this package is found by itself (``BUILTIN``); a
package of your own declares an entry point in the group ``florist.methods`` (``name = "pkg.module:Class"``), or
calls ``register(MyMethod())`` before the run. docs/architecture.md walks through one.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from importlib.metadata import entry_points

from ..aggregation import AggregationError, AggregationResult, ClientUpdate, check_result, prepare
from .base import Method, Option, RoundContext, Style, Sweep, branch_label, format_value


def builtin_methods() -> tuple[type[Method], ...]:
    """Every ``Method`` subclass declared in a module of this package (but ``base``), in module order."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and cls.name
        ]
    return tuple(found)


BUILTIN: tuple[type[Method], ...] = builtin_methods()
ENTRY_POINTS = "florist.methods"

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name; a second method of one name is refused (it would shadow the first)."""
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method's name is an identifier, not {method.name!r}")
    held = METHODS.get(method.name)
    if held is not None and type(held) is not type(method):
        raise ValueError(f"two methods are named {method.name!r}: {type(held).__name__} and {type(method).__name__}")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


for _cls in BUILTIN:
    register(_cls())
for _entry in entry_points(group=ENTRY_POINTS):
    register(_entry.load()())


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise AggregationError(f"unknown method {name!r}; choose from {', '.join(m.name for m in in_order())}")
    return METHODS[name]


def in_order(names: Sequence[str] | None = None) -> list[Method]:
    """The methods (all, or those named) in the order tables show them."""
    chosen = METHODS.values() if names is None else [get_method(n) for n in names]
    return sorted(chosen, key=lambda m: (m.order, m.name))


def aggregate(
    method: str | Method,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float] | None = None,
    value: float | None = None,
) -> AggregationResult:
    """Validate the updates, aggregate them and check the result. ``weights`` default to the example counts n_k / N.

    ``value``: the method's swept parameter (FLoRIST's τ; None: its default). Ends in a result whose every tensor is
    finite, or an ``AggregationError`` naming the client (or the method).
    """
    m = get_method(method) if isinstance(method, str) else method
    prepared, w = prepare(updates, weights)
    names = [u.client_id or f"client {k}" for k, u in enumerate(prepared)]
    result = m.aggregate(prepared, w, value, context=None) if m.uses_context else m.aggregate(prepared, w, value)
    return check_result(result, clients=names)


__all__ = [
    "BUILTIN",
    "METHODS",
    "Method",
    "Option",
    "RoundContext",
    "Style",
    "Sweep",
    "aggregate",
    "branch_label",
    "format_value",
    "get_method",
    "in_order",
    "register",
    "unregister",
]
