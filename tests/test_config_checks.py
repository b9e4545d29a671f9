"""A config mistake is refused with a one-line ConfigError that names its key, in well under a second, before any model
loads: wrong types anywhere, values out of range, fields that contradict each other, taus and methods that would give
two branches one name, devices this machine lacks, and target modules the model does not have."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import re
import typing
from unittest import mock

import peft
import pytest
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, T5Config

import florist.models as models
import florist.run as run_module
import florist.setup as run_setup
from florist.base_weights import adapted_module_names
from florist.config import ENGINES, ConfigError, RunConfig, config_from_toml, load_config
from florist.methods import METHODS, branch_label
from florist.methods.florist import MAX_TAUS, parse_taus
from florist.results import ResultRow, to_markdown
from florist.server import make_branches

CHECKS = settings(
    deadline=None,  # each example asserts its own time limit, which is the behaviour under test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs on every run: a failure here is a bug to fix, never a flake
    max_examples=200,
)


@contextlib.contextmanager
def no_weights_loaded():
    """A refusal precedes every expensive step: inside this block, loading any model's weights fails the test."""

    def loading(*args, **kwargs):
        raise AssertionError("model weights were loaded before the refusal")

    from transformers import AutoModelForCausalLM, PreTrainedModel

    with (
        mock.patch.object(models, "load_model", loading),
        mock.patch.object(run_setup, "load_model", loading),
        mock.patch.object(AutoModelForCausalLM, "from_pretrained", loading),
        mock.patch.object(PreTrainedModel, "from_pretrained", loading),
    ):
        yield


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Fail the test if anything loads model weights (or converts the embedded model)."""

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded while checking a config")

    monkeypatch.setattr(models, "load_model", loaded)
    monkeypatch.setattr(run_setup, "load_model", loaded)
    monkeypatch.setattr(models, "_convert_gguf", loaded)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", loaded)


def leaf_kinds(cls=RunConfig, prefix: str = ""):
    """Every config key and the type its dataclass declares (the method tables' keys are each method's own)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if typing.get_origin(hints[f.name]) is dict:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_kinds(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


KINDS = dict(leaf_kinds())


def nested(key: str, value) -> dict:
    *sections, leaf = key.split(".")
    table = {leaf: value}
    for section in reversed(sections):
        table = {section: table}
    return table


def refused(key: str, value, match: str | None = None) -> str:
    """The ConfigError for ``key = value`` written in a TOML config; it must name the key, fit one line, come fast."""
    text = tomli_w.dumps(nested(key, value))
    with no_weights_loaded(), pytest.raises(ConfigError) as error:
        config_from_toml(text, "run.toml")
    message = str(error.value)
    assert f"config key '{key}'" in message or f"config key '{key}[" in message, message
    assert "\n" not in message and message.startswith("run.toml: ")
    if match:
        assert match in message, message
    return message


# --- wrong types, for every key --------------------------------------------------------------------------------------

SCALARS = {
    bool: st.booleans(),
    int: st.integers(-(2**63), 2**63 - 1),
    float: st.floats(allow_nan=False, allow_infinity=False),
    str: st.text(max_size=6),
}
TABLES = st.dictionaries(st.text("abc", min_size=1, max_size=3), st.integers(0, 9), max_size=2)
DATES = st.dates(min_value=datetime.date(1, 1, 1))
ACCEPTED = {bool: {bool}, int: {int}, float: {int, float}, str: {str}}  # an int is a float, a bool is no number


def other_scalars(kind: type):
    return st.one_of(*[s for k, s in SCALARS.items() if k not in ACCEPTED[kind]], TABLES, DATES)


def wrong_values(kind):
    """Values of any type but ``kind``: other scalars, tables, dates, lists where a scalar belongs, lists holding
    one element of a wrong type where a list belongs."""
    origin, args = typing.get_origin(kind), [k for k in typing.get_args(kind) if k is not type(None)]
    if origin is list:
        return st.one_of(other_scalars(args[0]), bad_lists(args[0]))
    scalar, lists = kind, []
    if args:  # a union: str | None, str | list[str]
        (scalar,) = [k for k in args if typing.get_origin(k) is not list]
        lists = [typing.get_args(k)[0] for k in args if typing.get_origin(k) is list]
    wrong_lists = [bad_lists(element) for element in lists] or [st.lists(SCALARS[scalar], max_size=2)]
    return st.one_of(other_scalars(scalar), *wrong_lists)


def bad_lists(element: type):
    good = st.lists(SCALARS[element], max_size=2)
    bad = st.one_of(other_scalars(element), st.lists(SCALARS[element], max_size=1))
    return st.tuples(good, bad, st.integers(0, 2)).map(lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2] :])


@CHECKS
@given(st.sampled_from(sorted(KINDS)).flatmap(lambda key: st.tuples(st.just(key), wrong_values(KINDS[key]))))
def test_a_value_of_the_wrong_type_is_refused_naming_its_key(case):
    key, value = case
    refused(key, value)


# --- values out of range, for every key that has a range -------------------------------------------------------------

NON_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
NEGATIVE = st.integers(-(2**63), -1)
NON_POSITIVE = st.integers(-(2**63), 0)
NEGATIVE_FLOATS = st.floats(max_value=0, exclude_max=True) | NON_FINITE
NON_POSITIVE_FLOATS = st.floats(max_value=0) | NON_FINITE
NOT_IN = lambda choices: st.text(max_size=8).filter(lambda s: s not in choices)  # noqa: E731
TOO_MANY_TAUS = ",".join(str((i + 1) / (MAX_TAUS + 1)) for i in range(MAX_TAUS + 1))
BAD_TAUS = st.one_of(
    st.sampled_from(
        [
            "",
            ",",
            "a",
            "0.9,x",
            "0:1",
            "0.1:1:0.1:2",
            "nan",
            "inf",
            "0.5,nan",
            "0.1:inf:0.1",
            "0.1:1:nan",
            "1:0.5:0.1",
            "0.1:1:0",
            "0.1:1:-0.1",
            "0,0.5",
            "1.5",
            "-0.1:1:0.1",
            "0.5:1.1:0.1",
            TOO_MANY_TAUS,
        ]
    ),
    st.floats(0, 1, exclude_min=True).map(lambda t: f"{t!r},{t!r}"),  # one tau twice
    st.floats(0, 1, exclude_min=True).map(lambda t: f"{t!r},{t:.20f}"),  # the same tau written two ways
    st.floats(allow_nan=False).filter(lambda t: not 0 < t <= 1).map(repr),
    st.integers(MAX_TAUS + 1, 10**12).map(lambda n: f"0.000000000001:1:{1 / n!r}"),  # a range of too many taus
)

BAD_VALUES = {
    "seed": NEGATIVE | st.integers(2**32, 2**63 - 1),
    "output": st.just(""),
    "engine": NOT_IN(ENGINES),
    "model.dtype": NOT_IN(("float32", "bfloat16", "float16")),
    "data.train": st.just(""),
    "data.clients": NON_POSITIVE,
    "data.partition": NOT_IN(("iid", "dirichlet", "shards")),
    "data.alpha": NON_POSITIVE_FLOATS,
    "data.template": NOT_IN(("alpaca", "chat")),
    "data.cutoff": st.integers(-(2**63), 1),
    "data.max_examples_per_client": NEGATIVE,
    "lora.ranks": st.just([])
    | st.tuples(st.lists(st.integers(1, 64), max_size=2), NON_POSITIVE).map(lambda t: t[0] + [t[1]]),
    "lora.alpha_per_rank": NON_POSITIVE_FLOATS,
    "lora.target_modules": st.sampled_from([[], [""], ["q_proj", " "], "", "(", "[a", "*", "q_proj)"]),
    "lora.dropout": st.floats(min_value=1) | NEGATIVE_FLOATS,
    "train.lr": NON_POSITIVE_FLOATS,
    "train.epochs": NEGATIVE_FLOATS,
    "train.max_steps": NEGATIVE,
    "train.batch_size": NON_POSITIVE,
    "train.micro_batch_size": NON_POSITIVE,
    "train.weight_decay": NEGATIVE_FLOATS,
    "federation.rounds": NON_POSITIVE,
    "federation.clients_per_round": NEGATIVE,
    "federation.scheme": NOT_IN(("merge", "reinit")),
    "federation.methods": st.one_of(
        st.just([]),
        st.sampled_from(sorted(METHODS)).map(lambda m: ["fedit", m, m]),
        NOT_IN(METHODS).map(lambda m: ["fedit", m]),
    ),
    "federation.thresholds": BAD_TAUS,
    "federation.upload_thresholds": BAD_TAUS,
    "federation.florist_e_tolerance": st.floats(min_value=1, exclude_min=True) | NEGATIVE_FLOATS,
    "federation.min_clients": NON_POSITIVE,
    "federation.max_update_norm": NEGATIVE_FLOATS,
    "federation.max_update_bytes": NEGATIVE,
    "federation.client_timeout": NEGATIVE_FLOATS,
    "eval.questions": st.just(""),
    "eval.mode": NOT_IN(("answer", "option", "letter")),
    "eval.limit": NEGATIVE,
    "eval.batch_size": NON_POSITIVE,
    "eval.every": NON_POSITIVE,
}
# Any string is a valid model name ("" is the default), heldout spec ("" is none) and device as far as the file goes
# (whether this machine has the device is checked before the model loads, below).
FREE_FORM = {"model.name", "model.device", "eval.heldout"}


def test_every_key_that_is_not_free_form_has_values_it_refuses():
    assert set(BAD_VALUES) == {k for k, kind in KINDS.items() if kind is not bool} - FREE_FORM


@CHECKS
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda key: st.tuples(st.just(key), BAD_VALUES[key])))
def test_a_value_out_of_range_is_refused_naming_its_key(case):
    key, value = case
    refused(key, value)


@pytest.mark.parametrize("key", sorted(k for k, kind in KINDS.items() if kind is float))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused_wherever_a_number_is_read(key, value):
    refused(key, value, match="finite")


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.clients=4", "federation.min_clients=5"], "federation.min_clients"),
        (["data.clients=8", "federation.clients_per_round=3", "federation.min_clients=4"], "federation.min_clients"),
        (["data.clients=2", "federation.clients_per_round=3"], "federation.clients_per_round"),
        (["data.clients=3", "lora.ranks=[4, 2]"], "lora.ranks"),
        (["data.clients=2", "lora.ranks=[4, 2, 2]"], "lora.ranks"),
        (["train.batch_size=6", "train.micro_batch_size=4"], "train.batch_size"),
        (["train.epochs=0", "train.max_steps=0"], "max_steps"),
    ],
)
def test_fields_that_contradict_each_other_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_the_edges_of_every_cross_field_rule_are_accepted():
    config = load_config(
        None,
        [
            "data.clients=8",
            "federation.clients_per_round=3",
            "federation.min_clients=3",
            "lora.ranks=[8, 8, 4, 4, 2, 2, 1, 1]",
            "train.epochs=0",
            "train.max_steps=1",
            "train.batch_size=6",
            "train.micro_batch_size=3",
            "lora.dropout=0.0",
            "seed=4294967295",
        ],
    )
    assert config.federation.min_clients == 3 and config.client_ranks()[-1] == 1


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model=5", "model.name=x"], "model"),
        (["data.clients=4", "data.clients.x=1"], "data.clients"),
        (["seed=1\nengine = 'flower'"], "seed"),
    ],
)
def test_an_override_that_breaks_the_config_shape_is_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_an_unreadable_config_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)  # a directory
    (tmp_path / "bad.toml").write_bytes(b"seed = 1\n\xff\xfe")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_config(tmp_path / "bad.toml")
    (tmp_path / "run.toml").write_text("[data]\nclients = 0\n")
    with pytest.raises(ConfigError, match=r"run\.toml: config key 'data.clients' must be at least 1; got 0"):
        load_config(tmp_path / "run.toml")


# --- branch names: one per branch, never shared ----------------------------------------------------------------------

taus = st.floats(0, 1, exclude_min=True)


def parsed_taus(spec: str) -> list[float]:
    """The taus of a spec FLoRIST's parser accepts."""
    values, problem = parse_taus(spec)
    assert problem == "", problem
    return values


@CHECKS
@given(st.lists(taus, min_size=1, max_size=30, unique=True))
def test_every_tau_gets_a_label_of_its_own_that_reads_back_as_it(values):
    parsed = parsed_taus(",".join(repr(t) for t in values))
    assert parsed == sorted(values)
    branches = make_branches(["fedit", "florist"], parsed)
    labels = [b.label for b in branches]
    assert len(set(labels)) == len(labels) == 1 + len(values)
    for b in branches[1:]:
        assert float(b.label.removeprefix("florist@")) == b.value  # distinct taus, distinct labels


def test_two_decimal_taus_keep_the_labels_saved_runs_have():
    for i in range(1, 101):
        assert branch_label("florist", i / 100) == f"florist@{i / 100:.2f}"
    grid = parsed_taus("0.80:1.00:0.02")
    assert [b.label for b in make_branches(["florist"], grid)] == [f"florist@{0.80 + 0.02 * i:.2f}" for i in range(11)]
    assert [branch_label("florist", t) for t in parsed_taus("0.9,0.901")] == ["florist@0.90", "florist@0.901"]


@pytest.mark.parametrize("spec", ["0.9,0.90", "0.9, 0.9000", "0.5,0.9,0.5", "1,1.0", "0.25,2.5e-1"])
def test_taus_equal_after_parsing_are_refused(spec):
    values, problem = parse_taus(spec)
    assert values == [] and re.fullmatch(r"gives tau \S+ twice", problem), problem
    refused("federation.thresholds", spec, match=problem)


def test_a_range_steps_in_exact_decimals():
    assert parsed_taus("0.80:1.00:0.03") == [0.8, 0.83, 0.86, 0.89, 0.92, 0.95, 0.98]  # stops before 1.01
    assert parsed_taus("0.1:1:0.1") == [round(0.1 * i, 1) for i in range(1, 11)]
    assert len(parsed_taus("0.001:1:0.001")) == MAX_TAUS
    assert len(parsed_taus("0.9,0.9000001")) == 2  # close taus stay two branches


def test_make_branches_refuses_a_branch_asked_for_twice():
    with pytest.raises(ValueError, match="'fedit' is asked for twice"):
        make_branches(["fedit", "flora", "fedit"], [])
    with pytest.raises(ValueError, match="florist@0.90"):
        make_branches(["florist"], [0.9, 0.9])


def test_the_results_table_tells_close_taus_apart():
    rows = [ResultRow("florist", t, 0.5, None, 1.0, 4.0, 1, 1, 1, 1, branch_label("florist", t)) for t in (0.9, 0.901)]
    lines = to_markdown(rows, marks=False).splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["0.90", "0.901"]


# --- devices and target modules: checked from the model's config before any weight loads -----------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A local model directory holding the tiny Llama's config.json (its weights are never needed)."""
    path = tmp_path_factory.mktemp("tiny")
    models.tiny_llama(0, vocab_size=256)[0].config.save_pretrained(path)
    return path


def model_config(name, *overrides):
    return load_config(None, ([f'model.name="{name}"'] if name else []) + list(overrides))


def checked_without_weights(config):
    with no_weights_loaded():
        run_setup.check_model_config(config)


FORMS = [
    ["q_proj", "v_proj"],
    ["self_attn.v_proj"],
    ["model.layers.1.self_attn.q_proj"],
    ["q_proj", "mlp.down_proj"],
    r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
    r".*\.k_proj",
    "all-linear",
]


@pytest.mark.parametrize("targets", FORMS, ids=str)
def test_every_peft_form_of_target_modules_adapts_what_peft_adapts(targets, tiny_dir):
    model, _ = models.tiny_llama(0, vocab_size=256)
    ours = adapted_module_names(model, targets)
    empty = adapted_module_names(models.empty_model(models.load_model_config(str(tiny_dir))), targets)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, task_type="CAUSAL_LM"))
    by_peft = [n.removeprefix("base_model.model.") for n, m in wrapped.named_modules() if hasattr(m, "lora_A")]
    assert ours == empty == by_peft and ours
    value = f"'{targets}'" if isinstance(targets, str) else str(targets).replace("'", '"')  # TOML: literal, list
    for name in (str(tiny_dir), None):  # a local directory, and the embedded default
        checked_without_weights(model_config(name, f"lora.target_modules={value}"))


@pytest.mark.parametrize(
    "value, says",
    [
        ('["qproj"]', "matches no module"),
        ('["model.layers.99.self_attn.q_proj"]', "matches no module"),
        ('"q_proj"', "a string is a regex for whole names"),
        ('["self_attn"]', "of type LlamaAttention"),
        ('["mlp"]', "of type LlamaMLP"),
        ('["embed_tokens"]', "of type Embedding"),
        ('["q_proj", "layers.0"]', "LlamaDecoderLayer"),
    ],
)
def test_target_modules_the_model_lacks_are_refused_before_weights_load(value, says, tiny_dir):
    for name in (str(tiny_dir), None):
        with pytest.raises(ConfigError, match="lora.target_modules") as error:
            checked_without_weights(model_config(name, f"lora.target_modules={value}"))
        assert says in str(error.value) and "\n" not in str(error.value)


def absent_devices() -> list[str]:
    devices = ["garbage", "", "cuda:-1", "meta", "cpu:1", "CPU", f"cuda:{torch.cuda.device_count()}", "cuda:99"]
    devices += [] if torch.cuda.is_available() else ["cuda", "cuda:0"]
    return devices + ([] if torch.backends.mps.is_available() else ["mps"])


@pytest.mark.parametrize("device", absent_devices())
def test_a_device_this_machine_lacks_is_refused_before_the_run_directory_exists(device, tmp_path):
    config = model_config(None, f'model.device="{device}"', f'output="{tmp_path / "run"}"')
    with pytest.raises(ConfigError, match="model.device"):
        checked_without_weights(config)
    with pytest.raises(ConfigError, match="model.device"):
        run_module.run(config, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_bad_target_modules_stop_a_run_before_the_run_directory_exists(tmp_path):
    config = model_config(None, 'lora.target_modules=["qkv"]', f'output="{tmp_path / "run"}"')
    with pytest.raises(ConfigError, match="lora.target_modules"):
        run_module.run(config, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_a_model_whose_config_cannot_be_read_is_refused_before_weights_load(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match=re.escape(str(tmp_path))):
        checked_without_weights(model_config(str(tmp_path)))
    with pytest.raises(models.ModelLoadError, match="is a file"):
        checked_without_weights(model_config(str(tmp_path / "config.json")))
    T5Config(num_layers=1, d_model=8, d_ff=8, num_heads=1, vocab_size=16).save_pretrained(tmp_path)
    with pytest.raises(models.ModelLoadError, match="'t5' is not a causal LM"):
        checked_without_weights(model_config(str(tmp_path)))


def test_a_cutoff_beyond_the_models_context_is_refused_before_any_weights_load(tmp_path):
    from florist.models import load_model_config

    context = load_model_config(None).max_position_embeddings
    run_setup.check_model_config(load_config(None, [f"data.cutoff={context}"]))  # the whole context is fine
    with pytest.raises(ConfigError, match=rf"'data.cutoff' is {context + 1}, beyond the {context} tokens"):
        run_setup.check_model_config(load_config(None, [f"data.cutoff={context + 1}"]))


def test_a_client_reads_a_run_of_methods_only_the_server_knows():
    """A SuperNode trains by the job's mode: a method registered on the server only is no error on the client, but
    the server (and any reader that is not a client) refuses a method it does not know."""
    toml = load_config(None, []).to_toml().replace('"fedit"', '"servers_own"')
    assert "servers_own" in config_from_toml(toml, "the run's config", client=True).federation.methods
    with pytest.raises(ConfigError, match=r"config key 'federation.methods\[\d\]' must be one of"):
        config_from_toml(toml, "the run's config")
    bad = load_config(None, []).to_toml().replace("clients = 8", "clients = 0")
    with pytest.raises(ConfigError, match="data.clients"):  # everything a client does read is still checked
        config_from_toml(bad, "the run's config", client=True)
