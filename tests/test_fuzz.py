"""Fuzzing the two doors untrusted bytes and tensors come in by: the adapter reader and the aggregation front.

Every input, however malformed, must end in a result that is well formed or in the module's own one-line error
(``AdapterError`` from ``read_adapter``, ``AggregationError``/``ValueError`` from ``aggregate``/``prepare``):
never another exception, a crash or a hang. Each example runs under a hypothesis deadline and a hard alarm.
``pytest tests/test_fuzz.py --hypothesis-show-statistics`` reports how many inputs each test tried.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import struct
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from florist.adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, read_adapter
from florist.aggregation import (
    AggregationError,
    AggregationResult,
    ClientUpdate,
    LoraFactors,
    prepare,
    screen_updates,
)
from florist.methods import METHODS, aggregate

FUZZ = settings(
    deadline=timedelta(seconds=5),  # generous on a loaded machine; a hang is the alarm's to catch
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs on every run: a failure here is a bug to fix, never a flake
    max_examples=int(os.environ.get("FLORIST_FUZZ_EXAMPLES", "300")),  # per test; raise it for a deeper run
)
ALARM_SECONDS = 60


@contextlib.contextmanager
def no_hang(seconds: int = ALARM_SECONDS):
    """Fail an example that runs for ``seconds`` instead of letting it block the suite."""

    def expired(signum, frame):
        raise TimeoutError(f"an example ran for over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- adapter files ---------------------------------------------------------------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
TORCH_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
HEADER_DTYPES = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I8",
    "I32",
    "I64",
    "U8",
    "BOOL",
    "F8_E4M3",
    "F8_E5M2",
    "C64",
    "F128",
    "",
    "f32",
    "XYZ",
]
SIZES = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F64": 8,
    "I8": 1,
    "I32": 4,
    "I64": 8,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "C64": 8,
}


def tensor_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int, special: float | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    if special is not None and t.numel():
        t.view(-1)[0] = special
    return t.to(dtype)


shapes_2d = st.tuples(st.integers(0, 6), st.integers(0, 6))
any_shape = st.one_of(
    shapes_2d, st.tuples(st.integers(0, 5)), st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3))
)


def rarely(draw, strategy, usual, one_in: int = 8):
    """``usual`` most of the time, a draw from ``strategy`` one time in ``one_in``."""
    return draw(strategy) if draw(st.integers(0, one_in - 1)) == 0 else usual


@st.composite
def lora_tensors(draw) -> dict[str, torch.Tensor]:
    """Tensors under PEFT's keys: mostly well-formed pairs, with wrong dtypes, ranks, dims and names mixed in."""
    tensors = {}
    rank = draw(st.integers(1, 4))
    for name in draw(st.lists(st.sampled_from(MODULES), min_size=1, max_size=2, unique=True)):
        m, n, r = draw(st.integers(1, 6)), draw(st.integers(1, 6)), rarely(draw, st.integers(0, 5), rank)
        shapes = {"A": (r, n), "B": (m, rarely(draw, st.integers(0, 5), r))}
        for factor in rarely(draw, st.sampled_from(["A", "B"]), "AB"):
            shape = rarely(draw, any_shape, shapes[factor])
            dtype = rarely(draw, st.sampled_from(TORCH_DTYPES), torch.float32, one_in=3)
            special = rarely(draw, st.sampled_from([math.nan, math.inf, 1e30]), None)
            suffix = rarely(draw, st.sampled_from([".default", ".x.y", "x"]), "")
            key = f"base_model.model.{name}.lora_{factor}{suffix}.weight"
            tensors[key] = tensor_of(dtype, shape, draw(st.integers(0, 2**16)), special)
    if draw(st.integers(0, 15)) == 0:
        tensors[draw(st.sampled_from(["base_model.model.lm_head.weight", "lora_A.weight", "x"]))] = torch.zeros(2, 2)
    return tensors


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
pattern_keys = st.sampled_from(["q_proj", "v_proj", "layers.0.self_attn.q_proj", "(", "[", "*", ".*", "q_proj$", ""])


def plain_config(rank: int) -> dict:
    return {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }


@st.composite
def fuzzed_configs(draw, rank: int) -> bytes:
    """A plain LoRA config whose r fits the tensors, with fields replaced by arbitrary JSON, or not JSON at all."""
    config = plain_config(rank)
    for key in draw(
        st.lists(
            st.sampled_from(
                [
                    "peft_type",
                    "r",
                    "lora_alpha",
                    "rank_pattern",
                    "alpha_pattern",
                    "use_rslora",
                    "use_dora",
                    "bias",
                    "init_lora_weights",
                    "modules_to_save",
                    "target_modules",
                ]
            ),
            max_size=2,
        )
    ):
        config[key] = draw(json_values)
    if draw(st.booleans()):
        config["rank_pattern"] = draw(st.dictionaries(pattern_keys, st.integers(-1, 5) | json_values, max_size=2))
        config["alpha_pattern"] = draw(st.dictionaries(pattern_keys, st.floats() | json_values, max_size=2))
    text = json.dumps(config).encode()
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return text[: draw(st.integers(0, len(text)))]  # truncated JSON
    if kind == 1:
        return json.dumps(draw(json_values)).encode()  # JSON, but not a config
    if kind == 2:
        return draw(st.binary(max_size=64))
    return text


def header_file(header: object, data: bytes, declared_length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if declared_length is None else declared_length) + raw + data


@st.composite
def handmade_files(draw) -> bytes:
    """A safetensors header written by hand: any dtype string, absurd shapes (10^12 elements), offsets that lie."""
    header: dict = {}
    offset = 0
    for name in draw(st.lists(st.sampled_from(MODULES), max_size=2, unique=True)):
        for factor in "AB":
            dtype = draw(st.sampled_from(HEADER_DTYPES))
            shape = draw(
                st.one_of(
                    st.lists(st.integers(0, 8), min_size=0, max_size=3),
                    st.just([10**6, 10**6]),  # 10^12 elements
                    st.lists(st.sampled_from([-1, 2**63, 2**64 + 1, 10**12]), min_size=1, max_size=2),
                )
            )
            size = math.prod(shape) * SIZES.get(dtype, 4) if all(isinstance(d, int) and d >= 0 for d in shape) else 8
            end = offset + size if draw(st.booleans()) else draw(st.integers(-4, 2**64 + 4))
            header[f"base_model.model.{name}.lora_{factor}.weight"] = {
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [offset, end],
            }
            offset = end if isinstance(end, int) and 0 <= end < 2**20 else offset
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.sampled_from([{"format": "pt"}, {"format": 1}, [1], "x", None]))
    data_length = min(offset, 2**16) if draw(st.booleans()) else draw(st.integers(0, 256))
    data = draw(st.binary(min_size=min(data_length, 256), max_size=min(data_length, 256))) + bytes(
        max(0, data_length - 256)
    )
    declared = draw(st.sampled_from([None, None, None, 0, 7, 2**32, 2**63, 2**64 - 1]))
    body: object = header if draw(st.integers(0, 9)) else draw(json_values | st.binary(max_size=32))
    return header_file(body, data, declared)


@st.composite
def mutated_files(draw) -> bytes:
    """A valid safetensors file, then truncated, with bytes overwritten, or its header length replaced."""
    raw = bytearray(save(draw(lora_tensors())))
    kind = draw(st.sampled_from(["truncate", "flip", "length", "append", "intact"]))
    if kind == "truncate":
        del raw[draw(st.integers(0, len(raw) - 1)) :]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    elif kind == "length":
        raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    elif kind == "append":
        raw += draw(st.binary(min_size=1, max_size=64))
    return bytes(raw)


def kind_of(message: str) -> str:
    """The gist of an error message, for the statistics: its last clause without names and numbers."""
    gist = message.rsplit(": ", 1)[-1] if ": " in message else message
    return re.sub(r"[\d.]+|'[^']*'|\([^)]*\)", "#", gist)[:48]


def write_dir(path, config: bytes, weights: bytes) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_bytes(config)
    (path / WEIGHTS_NAME).write_bytes(weights)


def assert_read_ends_cleanly(path, max_bytes: int | None = None) -> None:
    """``read_adapter`` gives well-formed pairs or one ``AdapterError`` naming the directory; what it gives, the
    aggregation front then takes or refuses with an ``AggregationError``."""
    kwargs = {} if max_bytes is None else {"max_bytes": max_bytes}
    with no_hang():
        try:
            factors, _ = read_adapter(path, **kwargs)
        except AdapterError as e:
            message = str(e)
            assert message.startswith(str(path)) and "\n" not in message, message
            event(f"read_adapter refused: {kind_of(message)}")
            return
        for name, f in factors.items():
            assert f.A.ndim == f.B.ndim == 2 and f.A.is_floating_point() and f.B.is_floating_point(), name
            assert f.B.shape[1] == f.A.shape[0] and math.isfinite(f.scaling) and f.scaling > 0, name
        try:
            result = aggregate("fedit", [ClientUpdate(factors, 1, "fuzzed")])
        except AggregationError as e:
            assert str(e).startswith("fuzzed"), str(e)
            event(f"read, then refused by aggregation: {kind_of(str(e))}")
            return
        assert_well_formed(result)
        event("read and aggregated")


def rank_of(tensors: dict[str, torch.Tensor]) -> int:
    return next((t.shape[0] for k, t in tensors.items() if "lora_A" in k and t.ndim), 1)


@FUZZ
@given(tensors=lora_tensors())
def test_files_of_any_tensors_are_read_or_refused(tmp_path_factory, tensors):
    path = tmp_path_factory.getbasetemp() / "fuzz-tensors"
    write_dir(path, json.dumps(plain_config(rank_of(tensors))).encode(), save(tensors))
    assert_read_ends_cleanly(path)


@FUZZ
@given(data=st.data())
def test_any_config_is_read_or_refused(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz-config"
    tensors = {
        f"base_model.model.{name}.lora_{f}.weight": torch.ones(shape)
        for name in MODULES
        for f, shape in (("A", (2, 4)), ("B", (3, 2)))
    }
    write_dir(path, data.draw(fuzzed_configs(2)), save(tensors))
    assert_read_ends_cleanly(path)


@FUZZ
@given(weights=mutated_files())
def test_truncated_and_corrupted_files_are_refused(tmp_path_factory, weights):
    path = tmp_path_factory.getbasetemp() / "fuzz-mutated"
    write_dir(path, json.dumps(plain_config(2)).encode(), weights)
    assert_read_ends_cleanly(path)


@FUZZ
@given(weights=handmade_files() | st.binary(max_size=128))
def test_handmade_headers_are_refused_or_read(tmp_path_factory, weights):
    path = tmp_path_factory.getbasetemp() / "fuzz-handmade"
    write_dir(path, json.dumps(plain_config(2)).encode(), weights)
    assert_read_ends_cleanly(path)


@FUZZ
@given(tensors=lora_tensors(), slack=st.integers(-64, 64))
def test_the_size_limit_holds_at_every_size(tmp_path_factory, tensors, slack):
    path = tmp_path_factory.getbasetemp() / "fuzz-limit"
    weights = save(tensors)
    write_dir(path, json.dumps(plain_config(rank_of(tensors))).encode(), weights)
    limit = max(0, len(weights) + slack)
    assert_read_ends_cleanly(path, max_bytes=limit)
    if limit < len(weights):
        with pytest.raises(AdapterError, match=f"{len(weights)} bytes, over the limit of {limit}"):
            read_adapter(path, max_bytes=limit)


# --- the aggregation front -------------------------------------------------------------------------------------------

BAD_NUMBERS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e200, 10**400, True, "2", None, -3]


def with_factor(u: ClientUpdate, name: str, **changes) -> ClientUpdate:
    f = u.modules[name]
    return ClientUpdate(
        {**u.modules, name: LoraFactors(**{"A": f.A, "B": f.B, "scaling": f.scaling, **changes})},
        u.num_examples,
        u.client_id,
    )


def poked(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = value
    return t


# One defect each: what it does to one client's update (k) at one module (name); ``x`` is a drawn parameter.
DEFECTS = {
    "NaN in A": lambda u, name, x: with_factor(u, name, A=poked(u.modules[name].A, math.nan)),
    "Inf in B": lambda u, name, x: with_factor(u, name, B=poked(u.modules[name].B, -math.inf)),
    "huge factors": lambda u, name, x: with_factor(u, name, A=u.modules[name].A * 1e20, B=u.modules[name].B * 1e20),
    "huge scaling, zero B": lambda u, name, x: with_factor(u, name, B=u.modules[name].B * 0, scaling=1e40),
    "fine product, factors beyond float32": lambda u, name, x: with_factor(
        u, name, A=u.modules[name].A.double() * 1e-150, B=u.modules[name].B.double() * 1e150
    ),
    "large update": lambda u, name, x: with_factor(u, name, B=u.modules[name].B * 1e3),
    "tiny factors": lambda u, name, x: with_factor(u, name, A=u.modules[name].A * 1e-30),
    "higher rank": lambda u, name, x: with_factor(
        u, name, A=torch.cat([u.modules[name].A] * 3), B=torch.cat([u.modules[name].B] * 3, dim=1)
    ),
    "ranks of B and A differ": lambda u, name, x: with_factor(u, name, B=u.modules[name].B[:, :-1]),
    "rank 0": lambda u, name, x: with_factor(u, name, A=u.modules[name].A[:0], B=u.modules[name].B[:, :0]),
    "wrong weight shape": lambda u, name, x: with_factor(u, name, A=torch.ones(u.modules[name].rank, 7)),
    "empty weight": lambda u, name, x: with_factor(u, name, A=u.modules[name].A[:, :0]),
    "1-D A": lambda u, name, x: with_factor(u, name, A=u.modules[name].A.reshape(-1)),
    "not a tensor": lambda u, name, x: with_factor(u, name, B=u.modules[name].B.tolist()),
    "dtype": lambda u, name, x: with_factor(u, name, A=u.modules[name].A.to(x["dtype"])),
    "scaling": lambda u, name, x: with_factor(u, name, scaling=x["number"]),
    "num_examples": lambda u, name, x: ClientUpdate(u.modules, x["number"], u.client_id),
    "zero examples": lambda u, name, x: ClientUpdate(u.modules, 0, u.client_id),
    "missing module": lambda u, name, x: ClientUpdate(
        {n: f for n, f in u.modules.items() if n != name}, u.num_examples, u.client_id
    ),
    "extra module": lambda u, name, x: ClientUpdate({**u.modules, "k": u.modules[name]}, u.num_examples, u.client_id),
    "no modules": lambda u, name, x: ClientUpdate({}, u.num_examples, u.client_id),
    "not a pair": lambda u, name, x: ClientUpdate(
        {**u.modules, name: (u.modules[name].A, u.modules[name].B)}, u.num_examples, u.client_id
    ),
    "float64": lambda u, name, x: with_factor(u, name, A=u.modules[name].A.double(), B=u.modules[name].B.double()),
    "half precision": lambda u, name, x: with_factor(
        u, name, A=u.modules[name].A.half(), B=u.modules[name].B.bfloat16()
    ),
}
PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BAD_DTYPES = [torch.int64, torch.int8, torch.bool, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64]


@st.composite
def client_updates(draw, max_clients: int = 4, shapes: dict | None = None) -> list[ClientUpdate]:
    """Well-formed updates (heterogeneous ranks, random values) with up to three defects applied, and their labels."""
    shapes = shapes or {name: draw(st.tuples(st.integers(1, 6), st.integers(1, 6))) for name in ("q", "v")}
    updates = []
    for k in range(draw(st.integers(1, max_clients)) if draw(st.integers(0, 9)) else 0):
        rank = draw(st.integers(1, 4))
        modules = {
            name: LoraFactors(
                A=tensor_of(torch.float32, (rank, n), draw(st.integers(0, 2**16)), None),
                B=tensor_of(torch.float32, (m, rank), draw(st.integers(0, 2**16)), None),
                scaling=draw(st.sampled_from([0.5, 1.0, 2.0])),
            )
            for name, (m, n) in shapes.items()
        }
        updates.append(ClientUpdate(modules, draw(st.integers(1, 50)), f"client {k}"))
    for defect in draw(st.lists(st.sampled_from(sorted(DEFECTS)), max_size=3)) if updates else []:
        k, name = draw(st.integers(0, len(updates) - 1)), draw(st.sampled_from(sorted(shapes)))
        f = updates[k].modules.get(name)
        if not (
            isinstance(f, LoraFactors)
            and all(
                isinstance(t, torch.Tensor) and t.ndim == 2 and t.numel() and t.dtype in PLAIN_FLOATS
                for t in (f.A, f.B)
            )
        ):
            continue  # an earlier defect took this pair apart
        x = {"dtype": draw(st.sampled_from(BAD_DTYPES)), "number": draw(st.sampled_from(BAD_NUMBERS))}
        updates[k] = DEFECTS[defect](updates[k], name, x)
        event(f"defect: {defect}")
    return updates


def assert_well_formed(result: AggregationResult) -> None:
    assert isinstance(result, AggregationResult) and result.modules
    for adapter in [result.modules, *(result.per_client or [])]:
        for name, m in adapter.items():
            assert m.A.ndim == m.B.ndim == 2 and m.B.shape[1] == m.A.shape[0] >= 1, name
            assert torch.isfinite(m.A).all() and torch.isfinite(m.B).all(), name


def assert_clear_error(e: ValueError) -> None:
    message = str(e)
    assert message and "\n" not in message and "Traceback" not in message, message


weight_lists = st.none() | st.none() | st.lists(st.floats(0, 10) | st.sampled_from(BAD_NUMBERS), max_size=5)


@FUZZ
@given(
    updates=client_updates(),
    weights=weight_lists,
    method=st.sampled_from(sorted(METHODS)),
    value=st.sampled_from([None, 0.9, 0.5, 1.0, 0.0, -1.0, 1.5, math.nan]),
)
def test_aggregate_returns_a_finite_adapter_or_names_what_is_wrong(updates, weights, method, value):
    with no_hang():
        try:
            result = aggregate(method, updates, weights=weights, value=value)
        except ValueError as e:  # AggregationError, or FLoRIST's threshold check
            assert_clear_error(e)
            event(f"refused: {kind_of(str(e))}")
            return
    assert_well_formed(result)
    event("aggregated")


@FUZZ
@given(
    updates=client_updates(),
    weights=weight_lists,
    max_rank=st.none() | st.integers(0, 4),
    max_norm=st.sampled_from([0.0, 0.0, 1e-3, 1.0, 100.0]),
)
def test_prepare_accepts_only_what_the_methods_can_use(updates, weights, max_rank, max_norm):
    with no_hang():
        try:
            prepared, w = prepare(updates, weights, max_rank=max_rank, max_norm=max_norm)
        except AggregationError as e:
            assert_clear_error(e)
            event(f"refused: {kind_of(str(e))}")
            return
    event("prepared")
    assert len(prepared) == len(w) == len(updates) and math.isclose(sum(w), 1.0)
    assert all(w_k >= 0 for w_k in w)
    assert {t.dtype for u in prepared for f in u.modules.values() for t in (f.A, f.B)} <= {torch.float32, torch.float64}
    for method in ("fedit", "flora", "florist", "flexlora"):
        assert_well_formed(aggregate(method, prepared, weights=w))


SERVER_SHAPES = {"q": (4, 5), "v": (3, 5)}


@FUZZ
@given(updates=client_updates(max_clients=5, shapes=SERVER_SHAPES), data=st.data())
def test_screening_never_lets_a_bad_update_through(updates, data):
    """Each update is judged on its own against the server's shapes; whatever is accepted aggregates."""
    expected = SERVER_SHAPES
    max_ranks = data.draw(st.lists(st.integers(3, 4), min_size=len(updates), max_size=len(updates)))
    max_norm = data.draw(st.sampled_from([0.0, 0.5, 50.0]))
    with no_hang():
        accepted, rejected = screen_updates(updates, expected, max_ranks=max_ranks, max_norm=max_norm)
    assert sorted(accepted + list(rejected)) == list(range(len(updates)))
    for k, reason in rejected.items():
        assert reason.startswith(f"client {k}") and "\n" not in reason, reason
    event(f"{len(accepted)} accepted, {len(rejected)} rejected")
    kept = [updates[k] for k in accepted]
    for k in accepted:
        u = updates[k]
        assert set(u.modules) == set(expected)
        assert all(f.shape == expected[n] and 1 <= f.rank <= max_ranks[k] for n, f in u.modules.items())
    if kept and sum(u.num_examples for u in kept) > 0:
        for method in ("fedit", "flora", "florist", "flexlora"):
            assert_well_formed(aggregate(method, kept))


# --- Flower replies --------------------------------------------------------------------------------------------------

config_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.booleans(),
    st.lists(st.integers(-5, 5), max_size=3),
    st.lists(st.floats(), max_size=3),
    st.lists(st.text(max_size=4), max_size=3),
)
NUMPY_DTYPES = ["<f4", "<f8", "<f2", "<i8", "|b1", "<c8", "|u1", ">f4"]


@st.composite
def flower_arrays(draw):
    """An array as a reply may carry it: any dtype and shape, raw bytes, or a .npy header that lies about its size."""
    from flwr.app import Array

    kind = draw(st.sampled_from(["ndarray", "ndarray", "bytes", "lying header"]))
    if kind == "ndarray":
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        return Array(np.zeros(shape, dtype=draw(st.sampled_from(NUMPY_DTYPES))))
    if kind == "bytes":
        return Array(dtype="<f4", shape=(2, 2), stype="numpy.ndarray", data=draw(st.binary(max_size=200)))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 64, 10**6, 2**40]), min_size=1, max_size=3)))
    header = (
        f"{{'descr': '{draw(st.sampled_from(NUMPY_DTYPES))}', 'fortran_order': False, 'shape': {shape}, }}".encode()
    )
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + draw(st.binary(max_size=64))
    return Array(dtype="<f4", shape=shape, stype="numpy.ndarray", data=data)


@FUZZ
@given(data=st.data(), frozen=st.booleans(), max_bytes=st.sampled_from([0, 0, 100, 10**6]))
def test_flower_replies_are_read_or_refused(data, frozen, max_bytes):
    """Whatever a SuperNode replies, ``read_update`` gives an upload the server then completes and screens (each job
    accepted or left out with its reason), or one ``MessageError``."""
    from florist.engines.flower_messages import (
        MessageError,
        job_config,
        job_content,
        read_update,
        update_content,
        uplink_bytes,
    )
    from florist.jobs import BOTH_FACTORS, ClientJob, ClientMode, ClientStart, ClientUpload, RoundReplies, TrainingLog
    from florist.server import Federation, RoundHooks, RoundSettings, TrainingGroup, UpdateChecks

    shapes = {"q": (8, 6), "v": (4, 6)}
    mode = ClientMode(trains={"B"}, shared={"A"}) if frozen else BOTH_FACTORS
    shared = {n: {"A": torch.ones(4, i)} for n, (o, i) in shapes.items()} if frozen else None
    job = ClientJob(1, ClientStart(2, 4.0, 1, mode=mode, shared=shared), group="g")
    trained = {n: {"A": torch.ones(2, i), "B": torch.ones(o, 2)} for n, (o, i) in shapes.items()}
    honest = ClientUpload(
        {n: {f: t for f, t in held.items() if f in mode.uploads} for n, held in trained.items()},
        {n: 2.0 for n in shapes},
        5,
    )
    content = update_content(job_config(job_content(job, 1, "")), honest, TrainingLog(losses=[1.0]))
    record, meta = content.array_records["update"], content.config_records["meta"]
    for _ in range(data.draw(st.integers(1, 3))):
        change = data.draw(st.sampled_from(["array", "array", "drop array", "extra array", "meta", "drop meta"]))
        if change == "array" or change == "extra array":
            key = (
                data.draw(st.sampled_from(sorted(record)))
                if change == "array"
                else data.draw(st.sampled_from(["x", "q.C", "k.A"]))
            )
            record[key] = data.draw(flower_arrays())
            if data.draw(st.integers(0, 9)) == 0:  # and declares a dtype and shape that mean nothing
                record[key].__dict__.update(
                    dtype=data.draw(st.sampled_from(["garbage", "<f4", "O"])), shape=(-1, 2**70)
                )
        elif change == "drop array" and len(record) > 1:
            del record[data.draw(st.sampled_from(sorted(record)))]
        elif change == "meta":
            meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(config_values)
        elif change == "drop meta":
            del meta[data.draw(st.sampled_from(sorted(meta)))]
        event(f"changed: {change}")
    with no_hang():
        try:
            result = read_update(content, job, max_bytes)
        except MessageError as e:
            assert_clear_error(e)
            event(f"refused: {kind_of(str(e))}")
            return
        server = Federation(
            None,
            [],
            RoundSettings(ranks=[2, 2], alpha_per_rank=2.0, scheme="merge", seed=0),
            UpdateChecks(shapes),
            RoundHooks(log=lambda message: None),
        )
        screened = server.screen(1, TrainingGroup("g", [], [job]), RoundReplies([result]))
        assert uplink_bytes(content)["total"] >= 0  # the traffic record counts any reply it was given
    assert len(screened.accepted) + len(screened.rejected) == 1
    assert all(reason and "\n" not in reason for reason in screened.rejected.values()), screened.rejected
    event("read, then " + ("accepted" if screened.accepted else f"rejected: {kind_of(screened.rejected['1'])}"))


# --- Flower descriptions ---------------------------------------------------------------------------------------------

BAD_CLIENT_INDICES = [-1, -(2**63), 2**63 - 1, 99, True, False, 1.0, 0.5, math.nan, math.inf, "0", b"0", [0], [], ""]
BAD_COUNTS = [-1, -(2**63), 2**63 - 1, True, False, 2.0, math.nan, -math.inf, "5", b"5", [5], [], ""]
HOSTILE_DESCRIPTIONS = [
    "error",
    "bad partition-id",
    "bad num-examples",
    "too many examples",
    "missing field",
    "no node record",
    "extra field",
    "extra record",
    "wrong sender",
]


def described(question, client: int, num_examples: int):
    """The reply of an honest SuperNode of ``client`` holding ``num_examples`` examples."""
    from flwr.app import Message

    from florist.engines.flower_messages import description_content

    return Message(description_content(client, num_examples), reply_to=question)


class DescribingGrid:
    """SuperNodes that answer a ``query.describe`` with the replies ``answers[node](question)`` makes; no others."""

    def __init__(self):
        self.answers: dict = {}
        self.asked: list[int] = []
        self._replies: dict[str, list] = {}

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"question-{len(self.asked)}"
            self.asked.append(m.metadata.dst_node_id)
            self._replies[m.metadata.message_id] = self.answers[m.metadata.dst_node_id](m)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [r for i in list(message_ids) for r in self._replies.pop(i, [])]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@st.composite
def hostile_describers(draw, node: int, clients: int, missing: list[int], max_examples: int, ids: list[int]):
    """SuperNode ``node``'s answer that the run cannot use: but for one thing, a description taking a free client."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

    kind = draw(st.sampled_from(HOSTILE_DESCRIPTIONS))
    fields = {"partition-id": draw(st.sampled_from(missing)), "num-examples": draw(st.integers(0, max_examples))}
    records: dict = {}
    if kind == "bad partition-id":
        fields["partition-id"] = draw(st.sampled_from(BAD_CLIENT_INDICES + [clients, clients + 1]))
    elif kind == "bad num-examples":
        fields["num-examples"] = draw(st.sampled_from(BAD_COUNTS))
    elif kind == "too many examples":
        fields["num-examples"] = draw(st.integers(max_examples + 1, 2**63 - 1))
    elif kind == "missing field":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif kind == "extra field":
        fields[draw(st.sampled_from(["client", "partition", "num-examples ", "x" * 100]))] = draw(config_values)
    elif kind == "extra record":
        extra = [
            ConfigRecord({"partition-id": 0}),
            MetricRecord({"num-examples": 5}),
            ArrayRecord({"a": Array(np.zeros(2))}),
        ]
        records[draw(st.sampled_from(["meta", "update", "x"]))] = draw(st.sampled_from(extra))
    sender = draw(st.sampled_from([i for i in ids if i != node] + [2**64 - 1])) if kind == "wrong sender" else None
    traceback = "Traceback (most recent call last):\n  File ...\n" + "x" * 5000
    error = Error(code=draw(st.integers(0, 2**31)), reason=draw(st.text(max_size=20) | st.just(traceback)))

    def answer(question):
        if kind == "error":
            return [Message(error, reply_to=question)]
        content = RecordDict({**({} if kind == "no node record" else {"node": ConfigRecord(fields)}), **records})
        reply = Message(content, reply_to=question)
        if sender is not None:
            reply.metadata.__dict__["_src_node_id"] = sender
        return [reply]

    return kind, answer


@pytest.fixture(scope="module")
def node_directory():
    """``NodeDirectory``, imported before any example runs: the first import of the Flower engine takes seconds."""
    from florist.engines.flower import NodeDirectory

    return NodeDirectory


@FUZZ
@given(data=st.data(), clients=st.integers(2, 6), max_examples=st.sampled_from([50, 10**12]))
def test_hostile_supernode_descriptions_are_refused_and_the_honest_ones_mapped(
    node_directory, data, clients, max_examples
):
    """Whatever a SuperNode answers to ``query.describe``, ``NodeDirectory`` maps the honest ones to their clients and
    sizes, refuses every other with a log line naming it, and never lets one take, resize or fill a client's place."""
    from flwr.supercore.task_identity import TaskIdentity

    from florist.server import RoundFailed

    honest_clients = data.draw(st.lists(st.integers(0, clients - 1), unique=True, max_size=clients - 1))
    missing = [k for k in range(clients) if k not in honest_clients]
    n_bad, n_late = data.draw(st.integers(1, 6)), data.draw(st.integers(0, 3)) if honest_clients else 0
    n_ids = len(honest_clients) + n_bad + n_late + 1
    ids = data.draw(st.lists(st.integers(1, 2**63), unique=True, min_size=n_ids, max_size=n_ids))
    honest = dict(zip(honest_clients, ids))  # client -> node
    sizes = {k: data.draw(st.integers(0, max_examples - 1)) for k in honest_clients}
    bad_ids, late_ids, restarted = ids[len(honest) : len(honest) + n_bad], ids[len(honest) + n_bad : -1], ids[-1]
    grid = DescribingGrid()

    def honest_answer(client):
        noise = data.draw(st.sampled_from([None, None, "second reply", "stray reply"]))

        def answer(question):
            replies = [described(question, client, sizes[client])]
            if noise is not None:  # a second reply, or one to a question never asked, that would take a free client
                replies.append(described(question, missing[0], 1))
                if noise == "stray reply":
                    replies[-1].metadata.__dict__["_reply_to_message_id"] = "never asked"
            return replies

        return answer

    with pytest.MonkeyPatch.context() as mp, no_hang():
        for key, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            mp.setattr(TaskIdentity, key, value)
        for client, node in honest.items():
            grid.answers[node] = honest_answer(client)
        kinds = {}
        for node in bad_ids:
            kinds[node], grid.answers[node] = data.draw(hostile_describers(node, clients, missing, max_examples, ids))
        lines: list[str] = []
        nodes = node_directory(grid, "seed = 0\n", clients, lines.append, max_examples=max_examples)
        nodes.refresh(timeout=5)
        for node in late_ids:  # join later: valid descriptions of clients that already have a SuperNode
            client = data.draw(st.sampled_from(honest_clients))
            size = data.draw(st.sampled_from([sizes[client], sizes[client] + 1]))
            kinds[node] = "a second node for a client"
            grid.answers[node] = lambda q, c=client, n=size: [described(q, c, n)]
        nodes.refresh(timeout=5)
        if honest:  # a client's SuperNode goes offline and another comes up for it, with its size or another
            client, node = data.draw(st.sampled_from(sorted(honest.items())))
            size = data.draw(st.sampled_from([sizes[client], sizes[client] + 1]))
            del grid.answers[node]
            grid.answers[restarted] = lambda q: [described(q, client, size)]
            if size == sizes[client]:
                honest[client] = restarted
            else:  # the client keeps its first size, and has no SuperNode now
                kinds[restarted] = "another size for a client"
                del honest[client]
                missing = sorted(missing + [client])
            nodes.refresh(timeout=5)
        else:
            ids.remove(restarted)
        with pytest.raises(RoundFailed, match=re.escape(f"(missing clients: {missing})")):
            nodes.wait(clients, timeout=0)  # the bad nodes fill no client's place: the wait cannot end complete

    assert nodes.node_of == honest
    assert nodes.sizes == [sizes.get(k, 0) for k in range(clients)]
    assert all("\n" not in line and len(line) < 600 for line in lines), lines
    for node, kind in kinds.items():
        assert any(line.startswith(f"SuperNode {node} is refused: ") for line in lines), (kind, lines)
        event(f"refused: {kind}")
    for client, node in honest.items():
        assert f"client {client}: SuperNode {node}, {sizes[client]} examples" in lines
        assert not any(line.startswith(f"SuperNode {node} is refused") for line in lines), lines
    assert sorted(grid.asked) == sorted(ids)  # every node asked once: a refused one is not asked again
