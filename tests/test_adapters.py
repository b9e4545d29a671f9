"""PEFT adapter directories in and out, checked against peft itself: its layers' factors and scalings
when reading, ``PeftModel.from_pretrained`` when writing."""

from __future__ import annotations

import copy
import json
import os
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from florist.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterError,
    read_adapter,
    write_adapter,
    write_adapters,
)
from florist.aggregation import ModuleAggregate

SETTINGS = settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(hidden: int = 32, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A random Llama small enough for unit tests: q_proj is 32x32, v_proj 16x32 (2 kv heads of 8)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


def lora_layers(peft_model) -> dict:
    """PEFT's LoRA layers keyed by module name relative to the base model."""
    modules = peft_model.base_model.model.named_modules()
    return {name: module for name, module in modules if hasattr(module, "lora_A") and "default" in module.lora_A}


def save_client_adapter(base, directory, seed: int, shared_a_seed: int | None = None, **lora_kwargs):
    """A real PEFT adapter: get_peft_model on a copy of ``base``, non-zero random factors, save_pretrained.

    Returns {module: (A, B, scaling)} as PEFT's own layers hold them. ``shared_a_seed`` draws every
    module's A from that seed (FFA-LoRA's frozen shared A), so clients with the same seed share A.
    """
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM"} | lora_kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    g_a = torch.Generator().manual_seed(shared_a_seed) if shared_a_seed is not None else g
    expected = {}
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            A.copy_(torch.randn(A.shape, generator=g_a))
            B.copy_(torch.randn(B.shape, generator=g))
            expected[name] = (A.detach().clone(), B.detach().clone(), layer.scaling["default"])
    model.save_pretrained(str(directory))
    return expected


def module_names(layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.self_attn.{p}" for i in range(layers) for p in TARGETS]


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize(
    "lora_kwargs",
    [
        {},
        {"r": 3, "lora_alpha": 7},
        {"alpha_pattern": {"v_proj": 2, "model.layers.1.self_attn.q_proj": 12}},
        {"rank_pattern": {"model.layers.0.self_attn.v_proj": 2, "layers.1.self_attn.q_proj": 6}},
        {"r": 8, "lora_alpha": 16, "use_rslora": True},
        {"r": 4, "lora_alpha": 5, "use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 9}},
    ],
    ids=["plain", "alpha", "alpha_pattern", "rank_pattern", "rslora", "rslora_patterns"],
)
def test_read_gives_peft_factors_and_scaling(base, tmp_path, lora_kwargs):
    expected = save_client_adapter(base, tmp_path / "client", seed=1, **lora_kwargs)
    modules, info = read_adapter(tmp_path / "client")
    assert sorted(modules) == sorted(expected) == module_names()
    for name, (A, B, scaling) in expected.items():
        assert torch.equal(modules[name].A, A) and torch.equal(modules[name].B, B)
        assert modules[name].scaling == pytest.approx(scaling, rel=1e-12)
    assert info.peft_type == "LORA" and info.task_type == "CAUSAL_LM"
    assert set(info.target_modules) == set(TARGETS)


@given(
    r=st.integers(1, 6),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    q_rank=st.none() | st.integers(1, 6),
    v_alpha=st.none() | st.integers(1, 64),
)
@SETTINGS
def test_read_scaling_matches_peft_for_random_configs(base, tmp_path_factory, r, alpha, rslora, q_rank, v_alpha):
    kwargs = {"r": r, "lora_alpha": alpha, "use_rslora": rslora}
    if q_rank is not None:
        kwargs["rank_pattern"] = {"model.layers.1.self_attn.q_proj": q_rank}
    if v_alpha is not None:
        kwargs["alpha_pattern"] = {"v_proj": v_alpha}
    directory = tmp_path_factory.mktemp("client")
    expected = save_client_adapter(base, directory, seed=r, **kwargs)
    modules, _ = read_adapter(directory)
    for name, (A, _, scaling) in expected.items():
        assert modules[name].rank == A.shape[0]
        assert modules[name].scaling == pytest.approx(scaling, rel=1e-12)


def test_read_accepts_keys_with_an_adapter_name(base, tmp_path):
    expected = save_client_adapter(base, tmp_path, seed=2)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    renamed = {re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k): v for k, v in tensors.items()}
    save_file(renamed, tmp_path / WEIGHTS_NAME)
    modules, _ = read_adapter(tmp_path)
    assert all(torch.equal(modules[n].B, B) for n, (_, B, _) in expected.items())


@pytest.fixture
def client_dir(base, tmp_path):
    directory = tmp_path / "client"
    save_client_adapter(base, directory, seed=3)
    return directory


def edit_config(directory, **changes):
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.update(changes)
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(directory, edit):
    tensors = load_file(directory / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, directory / WEIGHTS_NAME)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"
Q0_NAME = "module model.layers.0.self_attn.q_proj"


def replace_q0_a(directory, tensor):
    edit_tensors(directory, lambda t: t.update({f"{Q0}.lora_A.weight": tensor}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / WEIGHTS_NAME).rename(d / "adapter_model.bin"),
            "adapter_model.bin is a pickle file; florist reads",
        ),
        (lambda d: (d / WEIGHTS_NAME).unlink(), "no adapter_model.safetensors"),
        (lambda d: (d / CONFIG_NAME).unlink(), "no adapter_config.json"),
        (lambda d: (d / CONFIG_NAME).write_text("{not json"), "adapter_config.json is not valid JSON"),
        (lambda d: (d / CONFIG_NAME).write_text("[1, 2]"), "adapter_config.json is not a JSON object"),
        (lambda d: edit_config(d, peft_type="IA3"), "peft_type is 'IA3'; florist aggregates LoRA adapters only"),
        (lambda d: edit_config(d, use_dora=True), "DoRA"),
        (lambda d: edit_config(d, alora_invocation_tokens=[1, 2]), "alora_invocation_tokens"),
        (lambda d: edit_config(d, init_lora_weights="pissa_niter_4"), "changes the base weights"),
        (lambda d: edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda d: edit_config(d, lora_bias=True), "lora_bias"),
        (lambda d: edit_config(d, bias="all"), "bias='all'"),
        (lambda d: edit_config(d, r=8), f"{Q0_NAME}: the tensors have rank 4 but adapter_config.json gives r=8"),
        (
            lambda d: edit_config(d, rank_pattern={"v_proj": 2}),
            "module model.layers.0.self_attn.v_proj: the tensors have rank 4",
        ),
        (lambda d: edit_config(d, lora_alpha=-1), "lora_alpha -1"),
        (
            lambda d: (d / WEIGHTS_NAME).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
            "not a valid safetensors file",
        ),
        (lambda d: edit_tensors(d, lambda t: t.pop(f"{Q0}.lora_B.weight")), f"{Q0_NAME}: has lora_A but no lora_B"),
        (lambda d: replace_q0_a(d, torch.zeros(4, 32, 1)), f"{Q0_NAME}: lora_A is 3-D"),
        (lambda d: replace_q0_a(d, torch.zeros(4, 32, dtype=torch.int32)), "dtype torch.int32"),
        (
            lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_B.weight": torch.zeros(32, 3)})),
            "their ranks differ",
        ),
        (
            lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_magnitude_vector": torch.zeros(32)})),
            "is not a lora_A/lora_B weight",
        ),
        (
            lambda d: edit_tensors(d, lambda t: t.update({f"{Q0}.lora_A.other.weight": torch.zeros(4, 32)})),
            "two lora_A tensors",
        ),
        (lambda d: edit_tensors(d, lambda t: t.clear()), "holds no LoRA tensors"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_read_refuses_what_is_not_a_plain_safetensors_lora(client_dir, damage, message):
    damage(client_dir)
    with pytest.raises(AdapterError) as e:
        read_adapter(client_dir, client_id="site-7")
    assert message in str(e.value)
    assert str(e.value).startswith("site-7") and "\n" not in str(e.value)


def test_read_refuses_a_missing_path_or_a_file(tmp_path):
    with pytest.raises(AdapterError, match=f"^{tmp_path / 'nope'}: no such directory$"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterError, match="not a directory"):
        read_adapter(tmp_path / "file")


def test_read_refuses_files_over_the_size_limit(client_dir):
    size = (client_dir / WEIGHTS_NAME).stat().st_size
    read_adapter(client_dir, max_bytes=size)
    with pytest.raises(AdapterError, match=f"adapter_model.safetensors is {size} bytes, over the limit of {size - 1}"):
        read_adapter(client_dir, max_bytes=size - 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_read_refuses_an_unreadable_directory(client_dir):
    (client_dir / WEIGHTS_NAME).chmod(0)
    try:
        with pytest.raises(AdapterError, match="cannot read adapter_model.safetensors"):
            read_adapter(client_dir)
    finally:
        (client_dir / WEIGHTS_NAME).chmod(0o644)
    client_dir.chmod(0)
    try:
        with pytest.raises(AdapterError, match="cannot read the directory"):
            read_adapter(client_dir)
    finally:
        client_dir.chmod(0o755)


# ---------------------------------------------------------------- writing


def random_aggregate(seed: int, ranks: dict[str, int], layers: int = 2) -> dict[str, ModuleAggregate]:
    g = torch.Generator().manual_seed(seed)
    out_dims = {"q_proj": 32, "v_proj": 16}
    return {
        name: ModuleAggregate(
            A=torch.randn(r, 32, generator=g), B=torch.randn(out_dims[name.rsplit(".", 1)[1]], r, generator=g)
        )
        for name, r in ranks.items()
    }


def load_peft(base, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()


def merged(base, deltas: dict[str, torch.Tensor]):
    """``base`` with each module's weight plus its delta: what a correct adapter must compute."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, delta in deltas.items():
            model.get_submodule(name).weight += delta.to(torch.float32)
    return model


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@given(ranks=st.lists(st.integers(1, 7), min_size=4, max_size=4), seed=st.integers(0, 2**16))
@SETTINGS
def test_write_then_read_round_trips(tmp_path_factory, ranks, seed):
    modules = random_aggregate(seed, dict(zip(module_names(), ranks)))
    out = tmp_path_factory.mktemp("w") / "adapter"
    write_adapter(out, modules, "some/base")
    read, info = read_adapter(out)
    assert info.base_model == "some/base" and set(info.target_modules) == set(TARGETS)
    assert info.config["use_rslora"] is False
    for name, m in modules.items():
        assert torch.equal(read[name].A, m.A) and torch.equal(read[name].B, m.B)
        assert read[name].scaling == 1.0


def test_written_adapter_loads_in_peft_as_exactly_b_times_a(base, tmp_path):
    # Ranks that differ per module, including a layer-1 key that must not leak into layer 11-like names.
    modules = random_aggregate(
        5,
        {
            "model.layers.0.self_attn.q_proj": 5,
            "model.layers.0.self_attn.v_proj": 2,
            "model.layers.1.self_attn.q_proj": 1,
            "model.layers.1.self_attn.v_proj": 5,
        },
    )
    write_adapter(tmp_path / "g", modules, None)
    model = load_peft(base, tmp_path / "g")
    layers = lora_layers(model)
    for name, m in modules.items():
        assert layers[name].r["default"] == m.rank and layers[name].scaling["default"] == 1.0
        torch.testing.assert_close(layers[name].get_delta_weight("default"), m.delta(), rtol=0, atol=1e-6)
    expected = merged(base, {name: m.delta() for name, m in modules.items()})
    torch.testing.assert_close(logits(model), logits(expected), rtol=1e-5, atol=1e-5)


def test_pattern_keys_match_only_their_own_module(tmp_path):
    base12 = tiny_llama(layers=12)
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in TARGETS]
    modules = random_aggregate(6, {name: 1 + i % 4 for i, name in enumerate(names)})
    write_adapter(tmp_path / "g", modules, None)
    layers = lora_layers(load_peft(base12, tmp_path / "g"))
    assert {name: layers[name].r["default"] for name in names} == {name: m.rank for name, m in modules.items()}
    assert all(layers[name].scaling["default"] == 1.0 for name in names)


def test_write_casts_to_the_requested_dtype_contiguously(tmp_path):
    # A transposed view (not contiguous) and a float64 B: both must come out contiguous bfloat16.
    aggregate = random_aggregate(7, dict.fromkeys(module_names(), 3))
    modules = {n: ModuleAggregate(A=m.A.T.contiguous().T, B=m.B.double()) for n, m in aggregate.items()}
    write_adapter(tmp_path / "g", modules, None, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "g" / WEIGHTS_NAME)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16} and len(tensors) == 8


def test_write_refuses_an_existing_directory_and_overwrites_only_its_own(tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    modules = random_aggregate(8, dict.fromkeys(module_names(), 2))
    with pytest.raises(AdapterError, match="exists and is not empty"):
        write_adapter(out, modules, None)
    with pytest.raises(AdapterError, match=r"holds 1 file florist did not write \(keep.txt\); refusing to delete it"):
        write_adapter(out, modules, None, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    (out / "keep.txt").unlink()
    write_adapter(out, modules, None, extra_files={"note.txt": "old"})
    write_adapter(out, modules, None, overwrite=True, extra_files={"note.txt": "new"})
    assert sorted(os.listdir(out)) == sorted([CONFIG_NAME, WEIGHTS_NAME, "note.txt"])
    assert (out / "note.txt").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["g"], "no temporary siblings left behind"


def test_write_into_an_existing_empty_directory(tmp_path):
    (tmp_path / "g").mkdir()
    write_adapter(tmp_path / "g", random_aggregate(9, dict.fromkeys(module_names(), 2)), None)
    assert (tmp_path / "g" / WEIGHTS_NAME).is_file()


@pytest.mark.parametrize("bad", ["shapes", "extra_file_name"])
def test_a_failed_write_leaves_nothing(tmp_path, bad):
    modules = random_aggregate(10, dict.fromkeys(module_names(), 2))
    extra = {"aggregation.json": "{}"}
    if bad == "shapes":
        modules["model.layers.1.self_attn.v_proj"] = ModuleAggregate(A=torch.zeros(2, 32), B=torch.zeros(16, 3))
    else:
        extra["../escape.json"] = "{}"
    with pytest.raises(AdapterError):
        write_adapter(tmp_path / "g", modules, None, extra_files=extra)
    with pytest.raises(AdapterError):
        good = random_aggregate(1, dict.fromkeys(module_names(), 2))
        write_adapters(tmp_path / "many", {"client_0": good, "client_1": modules}, None, extra_files=extra)
    assert os.listdir(tmp_path) == []


def test_a_failed_overwrite_keeps_the_old_directory(tmp_path):
    out = tmp_path / "g"
    write_adapter(out, random_aggregate(11, dict.fromkeys(module_names(), 2)), None)
    before = (out / WEIGHTS_NAME).read_bytes()
    with pytest.raises(AdapterError):
        write_adapter(
            out, {"m.q_proj": ModuleAggregate(A=torch.zeros(2, 4), B=torch.zeros(4, 3))}, None, overwrite=True
        )
    assert (out / WEIGHTS_NAME).read_bytes() == before and sorted(os.listdir(tmp_path)) == ["g"]


def test_write_adapters_writes_every_adapter_and_the_extra_files(base, tmp_path):
    per_client = [random_aggregate(k, dict.fromkeys(module_names(), r)) for k, r in enumerate([4, 2, 1])]
    adapters = {f"client_{k}": a for k, a in enumerate(per_client)}
    write_adapters(tmp_path / "out", adapters, None, extra_files={"aggregation.json": b"{}"})
    assert sorted(os.listdir(tmp_path / "out")) == ["aggregation.json", "client_0", "client_1", "client_2"]
    for k, adapter in enumerate(per_client):
        layers = lora_layers(load_peft(base, tmp_path / "out" / f"client_{k}"))
        for name, m in adapter.items():
            torch.testing.assert_close(layers[name].get_delta_weight("default"), m.delta(), rtol=0, atol=1e-6)


def test_the_lora_variant_fields_are_peft_s():
    """florist reads adapters without loading PEFT, from its own copy of the variant fields: PEFT's must equal it."""
    import dataclasses

    from peft import LoraConfig

    from florist.adapters import LORA_VARIANT_FIELDS

    peft_variants = {f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")}
    assert peft_variants == set(LORA_VARIANT_FIELDS)


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True), max_size=5),
    module=st.from_regex(r"[a-z_]{1,6}(\.[a-z0-9_]{1,6}){0,4}", fullmatch=True),
)
def test_pattern_matching_is_peft_s(keys, module):
    from peft.utils.other import get_pattern_key

    from florist.adapters import pattern_key

    assert pattern_key(keys, module) == get_pattern_key(keys, module)


def test_the_written_config_is_what_peft_would_write(tmp_path):
    """Every key florist writes in adapter_config.json has the value PEFT's own LoraConfig gives it, and PEFT reads the
    file back to the same config."""
    from peft import LoraConfig, PeftConfig

    from florist.adapters import unit_scaling_config

    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 2}
    written = unit_scaling_config(ranks, "base/model", "CAUSAL_LM")
    pattern = {"model.layers.0.self_attn.v_proj": 2}
    peft_own = LoraConfig(
        r=4,
        lora_alpha=4,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        base_model_name_or_path="base/model",
        task_type="CAUSAL_LM",
    ).to_dict()
    for key, value in written.items():
        expected = peft_own[key]
        assert (sorted(expected) if isinstance(expected, set) else expected) == value, key
    (tmp_path / "adapter_config.json").write_text(json.dumps(written))
    loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert loaded.r == 4 and loaded.rank_pattern == pattern and set(loaded.target_modules) == {"q_proj", "v_proj"}
