"""A run's configuration: TOML sections mapped onto dataclasses, with ``section.key=value`` overrides.

Every field has the default ``make run`` uses (the embedded model on the built-in dataset);
the paper's settings are in ``configs/``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import tomllib
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass
class ModelConfig:
    name: str | None = None  # None: the embedded default (SmolLM2-135M-Instruct)
    dtype: str = "bfloat16"  # compute dtype for training and evaluation; base weights stay float32
    device: str = "cpu"
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    train: str = "builtin"  # "builtin", a hub id, a JSON/JSONL file, or a folder of client_K.json files
    clients: int = 8
    partition: str = "dirichlet"  # iid | dirichlet | shards (a folder of client files: only with resplit)
    alpha: float = 0.5
    resplit: bool = False  # a folder of client files: pool its files and split them over `clients` by `partition`
    template: str = "alpaca"  # alpaca | chat
    cutoff: int = 256
    train_on_inputs: bool = True
    max_examples_per_client: int = 0  # 0: all


@dataclass
class LoraConfig:
    ranks: list[int] = field(default_factory=lambda: [16])  # one rank for all, or one per client
    alpha_per_rank: float = 2.0  # alpha_k = alpha_per_rank * r_k (the paper: alpha 32 at r 16)
    # As PEFT reads them: a list of names, each a module's full name or its dotted tail ("v_proj", "self_attn.v_proj"),
    # or one string, a regex that must match a module's full name, or "all-linear"
    target_modules: str | list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.05
    use_rslora: bool = False


@dataclass
class TrainConfig:
    # The defaults teach the embedded model the built-in facts in a few minutes (make run): one epoch at a high lr,
    # whole batches (on a CPU one micro-batch of 16 trains about 1.7x as fast as two of 8); the paper's settings
    # (lr 3e-4, batch 128, micro-batch 16, 3 epochs) are in configs/paper/.
    lr: float = 2e-3
    epochs: float = 1.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 16
    micro_batch_size: int = 16
    weight_decay: float = 0.0


@dataclass
class FederationConfig:
    rounds: int = 1
    clients_per_round: int = 0  # 0: every client every round
    scheme: str = "merge"  # merge | reinit (see docs/methods.md)
    methods: list[str] = field(default_factory=lambda: ["florist", "flora", "fedit", "flexlora", "ffa"])
    thresholds: str = "0.80:1.00:0.10"  # one tau, a list "0.8,0.9" or a range "0.80:1.00:0.01"
    # each client uploads the fewest components of its update whose energy reaches this (1: the whole pair); one
    # value, a list or a range as for thresholds, each its own branch of every method
    upload_thresholds: str = "1"
    florist_e_tolerance: float = 0.01  # FLoRIST-E: least download within this accuracy of the best
    min_clients: int = 1
    max_update_norm: float = 0.0  # refuse a client module whose ||s B A||_F exceeds this (0: no bound)
    max_update_bytes: int = 2**31  # Flower: refuse a reply whose arrays hold more bytes than this (0: no limit)
    client_timeout: float = 0.0  # seconds a client may train in a round before it is left out (0: no limit)


def heldout_source(heldout: str, train: str) -> str:
    """``eval.heldout`` with "auto" resolved: the built-in answers for the built-in data, else none ("")."""
    if heldout == "auto":
        return "builtin" if train == "builtin" else ""
    return heldout


@dataclass
class EvalConfig:
    questions: str = "builtin"  # "builtin", an MMLU-format JSON file, or "none"
    # answer: each option's text as the answer to the bare question, which shows taught facts
    # best; letter: the answer letter after the lettered prompt (MMLU's standard); option: the
    # option's text after the lettered prompt
    mode: str = "answer"
    limit: int = 0  # 0: every question
    batch_size: int = 32
    heldout_loss: bool = True
    # whose loss is reported: an instruction file (e.g. ../shared/data/dolly/test.json, whole texts), "builtin" (the
    # built-in facts' test questions, answers only), "auto" (builtin when data.train is, else none) or "" (none)
    heldout: str = "auto"
    every: int = 1  # score every k-th round, and always the last


ENGINES = ("inprocess", "flower")


@dataclass
class RunConfig:
    seed: int = 0
    output: str = "runs/default"
    engine: str = "inprocess"  # inprocess | flower (Flower's simulation engine, one SuperNode per client)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # each method's options, [method.<name>] tables of the method's own keys (see ``florist methods``)
    method: dict[str, dict[str, Any]] = field(default_factory=dict)

    def client_ranks(self) -> list[int]:
        ranks = self.lora.ranks
        return ranks * self.data.clients if len(ranks) == 1 else list(ranks)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(_drop_none(self.to_dict()))


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then ``section.key=value`` overrides; validated.

    A bad value is refused with a ``ConfigError`` naming the file and the key, before anything is loaded.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: cannot read the config file: {getattr(e, 'strerror', None) or e}") from None
    for item in overrides:
        _apply_override(raw, item)
    return _validated(raw, "" if path is None else f"{path}: ")


def config_from_toml(text: str, where: str = "config", *, client: bool = False) -> RunConfig:
    """A validated ``RunConfig`` from TOML text, such as ``RunConfig.to_toml()`` wrote (a run sent over the wire).

    ``client``: read on a client, which trains by the job's mode and neither knows nor needs the server's methods:
    the keys only the server reads (``SERVER_KEYS``: which methods run and their swept values) are not checked
    against the methods registered here.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    return _validated(raw, f"{where}: ", client)


def _validated(raw: dict, prefix: str, client: bool = False) -> RunConfig:
    try:
        config = _build(RunConfig, raw, "")
        validate(config, client)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    return config


def override_value(text: str) -> Any:
    """A value as an override writes it: TOML (1, 0.5, true, "s", [1, 2]), or a bare string such as a path or a
    model id; a ConfigError for text holding more than one value."""
    try:
        document = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if list(document) != ["v"]:
        raise ConfigError("expected one value after '='")
    return document["v"]


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = override_value(text)
    except ConfigError as e:
        raise ConfigError(f"override {item!r}: {e}") from None
    *sections, leaf = key.strip().split(".")
    node, where = raw, []
    for s in sections:
        where.append(s)
        node = node.setdefault(s, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: config key {'.'.join(where)!r} is a value, not a section")
    node[leaf] = value


def _build(cls, raw: dict, where: str):
    """``cls`` from a TOML table: unknown keys refused, every value of the declared type of its field."""
    fields = [f.name for f in dataclasses.fields(cls)]
    kinds = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; known: {', '.join(fields)}")
        if typing.get_origin(kinds[key]) is dict:
            kwargs[key] = _tables(value, path)
        elif dataclasses.is_dataclass(kinds[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; got {_shown(value)}")
            kwargs[key] = _build(kinds[key], value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, kinds[key], path)
    return cls(**kwargs)


def _tables(value: Any, path: str) -> dict[str, dict[str, Any]]:
    """A table of tables of scalars (``[method.fedex] residual = "factors"``); what each key means is checked later."""
    if not isinstance(value, dict):
        raise ConfigError(f"config key {path!r} is a section of tables; got {_shown(value)}")
    for name, table in value.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config key {path}.{name!r} is a table of options; got {_shown(table)}")
        for key, v in table.items():
            if isinstance(v, (dict, list)):
                raise ConfigError(f"config key '{path}.{name}.{key}' must be a single value; got {_shown(v)}")
    return {name: dict(table) for name, table in value.items()}


# How each scalar type is named in messages, alone and as a list's elements.
_KIND_NAMES: dict[type, tuple[str, str]] = {
    bool: ("true or false", "true or false values"),
    int: ("an integer", "integers"),
    float: ("a finite number", "finite numbers"),
    str: ("a string", "strings"),
}


def _coerce(value: Any, kind: Any, path: str) -> Any:
    """``value`` as the declared ``kind`` (a scalar type, ``list[scalar]`` or a union of those), else a ConfigError
    naming ``path``, with the index of a list's bad element. A scalar where a list is declared is a list of one."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        options = [k for k in typing.get_args(kind) if k is not type(None)]  # TOML has no null
        shaped = [k for k in options if (typing.get_origin(k) is list) == isinstance(value, list)]
        if not shaped or not (isinstance(value, list) or _fits(value, shaped[0])):
            raise ConfigError(f"config key {path!r} must be {_describe(kind)}; got {_shown(value)}")
        return _coerce(value, shaped[0], path)
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        if isinstance(value, list):
            return [_coerce(v, element, f"{path}[{i}]") for i, v in enumerate(value)]
        if _fits(value, element):
            return [_coerce(value, element, path)]  # a single rank or method where a list is expected
        raise ConfigError(f"config key {path!r} must be {_describe(kind)}; got {_shown(value)}")
    if not _fits(value, kind):
        raise ConfigError(f"config key {path!r} must be {_describe(kind)}; got {_shown(value)}")
    if kind is float:
        value = float(value)
        if not math.isfinite(value):  # TOML has nan and inf
            raise ConfigError(f"config key {path!r} must be {_describe(kind)}; got {value}")
    return value


def _fits(value: Any, kind: type) -> bool:
    """Whether a scalar ``value`` is of ``kind``: bools are not numbers, integers are floats."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        return " or ".join(_describe(k) for k in typing.get_args(kind) if k is not type(None))
    if typing.get_origin(kind) is list:
        return f"a list of {_KIND_NAMES[typing.get_args(kind)[0]][1]}"
    return _KIND_NAMES[kind][0]


def _shown(value: Any) -> str:
    """A value as a one-line message shows it: short, and a table or list called what it is."""
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool):
        return str(value).lower()  # as TOML writes it
    return f"a list {reprlib.repr(value)}" if isinstance(value, list) else reprlib.repr(value)


# ---------------------------------------------------------------------------------------------------------------------
# What each field's value must be, beyond its type: declared once per key, checked by ``validate``

Rule = Callable[[Any], str]  # what is wrong with a value of the field's type, or "" when nothing is


@dataclass(frozen=True)
class Each:
    """A rule for every element of a list field; a bad element is named by its index."""

    rule: Rule


def at_least(low: float) -> Rule:
    return lambda v: "" if v >= low else f"must be at least {low}"


def between(low: float, high: float) -> Rule:
    return lambda v: "" if low <= v <= high else f"must be between {low} and {high}"


def positive(v: float) -> str:
    return "" if v > 0 else "must be positive"


def fraction(v: float) -> str:
    return "" if 0 <= v < 1 else "must be in [0, 1)"


def non_empty(v: str | list) -> str:
    return "" if len(v) else "must not be empty"


def unique(v: list) -> str:
    twice = [x for x, n in Counter(v).items() if n > 1]
    return f"lists {twice[0]!r} twice" if twice else ""


def one_of(choices: Callable[[], tuple[str, ...]]) -> Rule:
    # The choices are read when a value is checked: some are declared in modules that are slow to import.
    return lambda v: "" if v in choices() else f"must be one of {', '.join(choices())}"


def _methods() -> tuple[str, ...]:
    from .methods import METHODS

    return tuple(METHODS)


def _templates() -> tuple[str, ...]:
    from .data.instructions import TEMPLATES

    return TEMPLATES


def _partitions() -> tuple[str, ...]:
    from .data.partition import SCHEMES

    return SCHEMES


def target_modules_problem(v: str | list[str]) -> str:
    """PEFT's two forms: a list of module names (full or dotted tails), or a regex matched against full names."""
    if isinstance(v, list):
        return non_empty(v) or ("lists an empty module name" if any(not t.strip() for t in v) else "")
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a regex ({e})"
    return non_empty(v)


SEED_LIMIT = 2**32 - 1  # numpy's (datasets' shuffles and partitions) largest seed


def _taus_problem(spec: object) -> str:
    from .methods.base import parse_taus

    return "must be a string" if not isinstance(spec, str) else parse_taus(spec)[1]


FIELD_RULES: dict[str, tuple[Rule | Each, ...]] = {
    "seed": (between(0, SEED_LIMIT),),
    "output": (non_empty,),
    "engine": (one_of(lambda: ENGINES),),
    "model.dtype": (one_of(lambda: ("float32", "bfloat16", "float16")),),
    "data.train": (non_empty,),
    "data.clients": (at_least(1),),
    "data.partition": (one_of(_partitions),),
    "data.alpha": (positive,),
    "data.template": (one_of(_templates),),
    "data.cutoff": (at_least(2),),  # a token to predict needs one before it
    "data.max_examples_per_client": (at_least(0),),
    "lora.ranks": (non_empty, Each(at_least(1))),
    "lora.alpha_per_rank": (positive,),
    "lora.target_modules": (target_modules_problem,),
    "lora.dropout": (fraction,),  # 1 would drop every input of the adapters: nothing trains
    "train.lr": (positive,),
    "train.epochs": (at_least(0),),
    "train.max_steps": (at_least(0),),
    "train.batch_size": (at_least(1),),
    "train.micro_batch_size": (at_least(1),),
    "train.weight_decay": (at_least(0),),
    "federation.rounds": (at_least(1),),
    "federation.clients_per_round": (at_least(0),),
    "federation.scheme": (one_of(lambda: ("merge", "reinit")),),
    "federation.methods": (non_empty, Each(one_of(_methods)), unique),
    "federation.upload_thresholds": (_taus_problem,),
    "federation.florist_e_tolerance": (between(0, 1),),
    "federation.min_clients": (at_least(1),),
    "federation.max_update_norm": (at_least(0),),
    "federation.max_update_bytes": (at_least(0),),
    "federation.client_timeout": (at_least(0),),
    "eval.questions": (non_empty,),
    "eval.mode": (one_of(lambda: ("answer", "option", "letter")),),
    "eval.limit": (at_least(0),),
    "eval.batch_size": (at_least(1),),
    "eval.every": (at_least(1),),
}


def upload_taus(c: RunConfig) -> list[float]:
    """The run's upload thresholds (``federation.upload_thresholds``), ascending; [1.0]: clients send whole pairs."""
    from .methods.base import parse_taus

    return parse_taus(c.federation.upload_thresholds)[0]


def check_upload_cuts(c: RunConfig) -> None:
    """Upload thresholds below 1 alone (1 not among them) need every method of the run to be one whose clients can
    cut their uploads; with 1 among them, a method that cannot runs at 1 only."""
    from .methods import METHODS

    if 1.0 in upload_taus(c):
        return
    for name in c.federation.methods:
        problem = METHODS[name].upload_cut_problem(c.federation.rounds)
        if problem:
            raise ConfigError(
                f"config key 'federation.upload_thresholds' holds no 1, but {name} cannot cut its uploads: {problem}; "
                "leave it out of federation.methods or add 1 to upload_thresholds"
            )


SERVER_KEYS = frozenset({"federation.methods"})  # checked against the methods registered where the server runs


def check_fields(c: RunConfig, skip: frozenset[str] = frozenset()) -> None:
    """Every field with a rule in ``FIELD_RULES`` against it (but those in ``skip``); the first broken one is a
    ConfigError naming its key."""
    for key, rules in FIELD_RULES.items():
        if key in skip:
            continue
        value = c
        for part in key.split("."):
            value = getattr(value, part)
        for rule in rules:
            items = list(enumerate(value)) if isinstance(rule, Each) else [(None, value)]
            for index, item in items:
                problem = rule.rule(item) if isinstance(rule, Each) else rule(item)
                if problem:
                    where = key if index is None else f"{key}[{index}]"
                    raise ConfigError(f"config key {where!r} {problem}; got {_shown(item)}")


def check_swept_values(c: RunConfig) -> None:
    """Each method's swept values (FLoRIST's τ under ``federation.thresholds``), read by the method's own parser."""
    from .methods import METHODS

    for method in METHODS.values():
        if method.sweep is None:
            continue
        value: Any = c
        for part in method.sweep.config_key.split("."):
            value = getattr(value, part, None)
        if not isinstance(value, str):
            continue  # a method registered for another config: its key is not this run's
        _, problem = method.sweep.parse(value)
        if problem:
            raise ConfigError(f"config key {method.sweep.config_key!r} {problem}; got {_shown(value)}")


def check_method_options(c: RunConfig) -> None:
    """Each ``[method.<name>]`` table names a registered method and only options it declares, at values it takes."""
    from .methods import METHODS

    for name, values in c.method.items():
        if name not in METHODS:
            raise ConfigError(f"config key 'method.{name}' names no method; methods: {', '.join(METHODS)}")
        try:
            METHODS[name].configured(values)
        except ValueError as e:
            raise ConfigError(f"config key 'method.{name}': {e}") from None


def check_engine(c: RunConfig) -> None:
    """A method the run's engine cannot run (``Method.engine_problem``) is refused, naming what to do instead."""
    from .methods import METHODS

    for name in c.federation.methods:
        problem = METHODS[name].engine_problem(c.engine) if name in METHODS else ""
        if problem:
            raise ConfigError(f"federation.methods: {name} {problem}")


def validate(c: RunConfig, client: bool = False) -> None:
    """Every field against its rule, then the rules that tie fields together (a ``client`` skips the server's keys:
    which methods run, their swept values and their options)."""
    check_fields(c, SERVER_KEYS if client else frozenset())
    if not client:
        check_swept_values(c)
        check_method_options(c)
        check_upload_cuts(c)
        check_engine(c)
    taking_part = c.federation.clients_per_round or c.data.clients
    checks = [
        (
            len(c.lora.ranks) in (1, c.data.clients),
            f"lora.ranks: give one rank or {c.data.clients} (one per client); got {len(c.lora.ranks)}",
        ),
        (
            c.train.batch_size % c.train.micro_batch_size == 0,
            f"train.batch_size {c.train.batch_size} must be a multiple of train.micro_batch_size "
            f"{c.train.micro_batch_size}",
        ),
        (c.train.epochs > 0 or c.train.max_steps > 0, "train: set epochs > 0 or max_steps > 0"),
        (
            c.federation.clients_per_round <= c.data.clients,
            f"federation.clients_per_round {c.federation.clients_per_round} is above data.clients {c.data.clients}",
        ),
        (
            c.federation.min_clients <= taking_part,
            f"federation.min_clients {c.federation.min_clients} is above the {taking_part} clients taking part in a "
            "round (federation.clients_per_round, or data.clients when it is 0)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
