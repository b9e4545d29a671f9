"""A run's configuration: TOML sections mapped onto dataclasses, with ``section.key=value`` overrides.

Every field has the default ``make run`` uses (the embedded model on the built-in dataset);
the paper's settings are in ``configs/``.
"""

from __future__ import annotations

import dataclasses
import tomllib
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
    partition: str = "dirichlet"  # iid | dirichlet | shards (ignored for a folder of client files)
    alpha: float = 0.5
    template: str = "alpaca"  # alpaca | chat
    cutoff: int = 256
    train_on_inputs: bool = True
    max_examples_per_client: int = 0  # 0: all


@dataclass
class LoraConfig:
    ranks: list[int] = field(default_factory=lambda: [16])  # one rank for all, or one per client
    alpha_per_rank: float = 2.0  # alpha_k = alpha_per_rank * r_k (the paper: alpha 32 at r 16)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = 0.05
    use_rslora: bool = False


@dataclass
class TrainConfig:
    # The defaults teach the embedded model the built-in facts in minutes; the paper's
    # settings (lr 3e-4, batch 128, micro-batch 16, 3 epochs) are in configs/paper/.
    lr: float = 1e-3
    epochs: float = 3.0
    max_steps: int = 0  # >0 overrides epochs
    batch_size: int = 16
    micro_batch_size: int = 8
    weight_decay: float = 0.0


@dataclass
class FederationConfig:
    rounds: int = 1
    clients_per_round: int = 0  # 0: every client every round
    scheme: str = "merge"  # merge | reinit (see the README)
    methods: list[str] = field(default_factory=lambda: ["florist", "flora", "fedit", "flexlora", "ffa"])
    thresholds: str = "0.80:1.00:0.02"  # one tau, a list "0.8,0.9" or a range "0.80:1.00:0.01"
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
    batch_size: int = 16
    heldout_loss: bool = True
    # whose loss is reported: an instruction file (e.g. ../shared/data/dolly/test.json, whole texts), "builtin" (the
    # built-in facts' test questions, answers only), "auto" (builtin when data.train is, else none) or "" (none)
    heldout: str = "auto"
    every_round: bool = True


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
    """Defaults, then the TOML file, then ``section.key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML: {e}") from None
    for item in overrides:
        _apply_override(raw, item)
    config = _build(RunConfig, raw, "")
    validate(config)
    return config


def config_from_toml(text: str, where: str = "config") -> RunConfig:
    """A validated ``RunConfig`` from TOML text, such as ``RunConfig.to_toml()`` wrote (a run sent over the wire)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: invalid TOML: {e}") from None
    config = _build(RunConfig, raw, "")
    validate(config)
    return config


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare string such as a path or a model id
    *sections, leaf = key.strip().split(".")
    node = raw
    for s in sections:
        node = node.setdefault(s, {})
    node[leaf] = parsed


def _build(cls, raw: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; known: {', '.join(fields)}")
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else fields[key].default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            kwargs[key] = _build(type(default), value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, default, path)
    return cls(**kwargs)


def _coerce(value, default, path: str):
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key {path!r} must be true or false; got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list) and isinstance(value, (int, str)):
        return [value]  # a single rank or method where a list is expected
    if default is not None and not isinstance(value, type(default)):
        raise ConfigError(f"config key {path!r} must be {type(default).__name__}; got {value!r}")
    return value


def parse_thresholds(spec: str) -> list[float]:
    """'0.9', '0.8,0.9,1.0' or 'start:stop:step' (inclusive), rounded to 4 decimals."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0:
                raise ValueError
            count = int(round((stop - start) / step)) + 1
            values = [round(start + i * step, 4) for i in range(count)]
        else:
            values = [round(float(x), 4) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"federation.thresholds {spec!r}: expected T, T1,T2,... or start:stop:step") from None
    bad = [t for t in values if not 0.0 < t <= 1.0]
    if not values or bad:
        raise ConfigError(f"federation.thresholds {spec!r}: every tau must be in (0, 1]")
    return sorted(set(values))


def validate(c: RunConfig) -> None:
    from .aggregation import METHODS

    checks = [
        (c.data.clients >= 1, "data.clients must be at least 1"),
        (len(c.lora.ranks) in (1, c.data.clients), f"lora.ranks: give one rank or {c.data.clients} (one per client)"),
        (all(r >= 1 for r in c.lora.ranks), "lora.ranks must be positive"),
        (c.train.batch_size % c.train.micro_batch_size == 0, "train.batch_size must be a multiple of train.micro_batch_size"),
        (c.train.micro_batch_size >= 1, "train.micro_batch_size must be positive"),
        (c.train.epochs > 0 or c.train.max_steps > 0, "train: set epochs > 0 or max_steps > 0"),
        (c.federation.rounds >= 1, "federation.rounds must be at least 1"),
        (c.federation.scheme in ("merge", "reinit"), "federation.scheme must be merge or reinit"),
        (0 <= c.federation.clients_per_round <= c.data.clients, "federation.clients_per_round must be between 0 and data.clients"),
        (c.data.partition in ("iid", "dirichlet", "shards"), "data.partition must be iid, dirichlet or shards"),
        (c.eval.mode in ("answer", "option", "letter"), "eval.mode must be answer, option or letter"),
        (c.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype must be float32, bfloat16 or float16"),
        (bool(c.federation.methods), "federation.methods is empty"),
        (c.engine in ENGINES, f"engine must be {' or '.join(ENGINES)}; got {c.engine!r}"),
        (c.federation.max_update_norm >= 0, "federation.max_update_norm must be 0 (no bound) or positive"),
        (c.federation.max_update_bytes >= 0, "federation.max_update_bytes must be 0 (no limit) or positive"),
        (c.federation.client_timeout >= 0, "federation.client_timeout must be 0 (no limit) or positive"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    unknown = [m for m in c.federation.methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"federation.methods: unknown {unknown[0]!r}; choose from {', '.join(METHODS)}")
    parse_thresholds(c.federation.thresholds)
