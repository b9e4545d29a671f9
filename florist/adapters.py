"""PEFT LoRA adapter directories in and out: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reading turns a directory into one ``LoraFactors`` per adapted module, with the scaling PEFT
would apply (``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``), and refuses
whatever is not a plain LoRA update ``s * B @ A`` (DoRA and other variants, pickles, broken files).

Writing stores aggregated modules (scaling already folded into B) so that
``peft.PeftModel.from_pretrained(base, path)`` adds exactly ``B @ A`` to each module:
every module gets alpha = r, hence scaling 1. Output directories appear atomically.

Module names are PEFT's keys relative to the base model, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .aggregation import LoraFactors, ModuleAggregate
from .files import check_writable_place, describe_foreign, make_directory, scan, writing
from .reading import reason

# PEFT (and through it transformers) is never imported here: reading and writing an adapter directory is plain
# safetensors and JSON in PEFT's layout, so `florist aggregate` starts in a second. What this module copies of PEFT's
# rules (the variant fields, pattern matching, the config keys) is held to PEFT's by tests/test_adapters.py.

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RESIDUAL_NAME = "residual"  # an update for the base weights written beside an adapter, as its own (FedEx-LoRA's)
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
DEFAULT_MAX_BYTES = 16 * 2**30  # a full-rank-ish adapter of a 7B model is well under this
MAX_CONFIG_BYTES = 16 * 2**20

# base_model.model.<module>.lora_A[.<adapter name>].weight
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")

# Initialisations that subtract the initial adapter from the base weights: the saved pair is then
# relative to a modified base, not to the model every client shares.
BASE_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# VeLoRA changes only the backward pass; its forward is plain LoRA, so its pairs aggregate exactly.
EXACT_VARIANTS = {"velora_config"}


class AdapterError(ValueError):
    """An adapter directory that cannot be read or written; the message names the directory (and module)."""


@dataclass(frozen=True)
class AdapterInfo:
    """What the adapter's config says besides the factors."""

    path: Path
    base_model: str | None
    target_modules: list[str] | str | None
    peft_type: str
    task_type: str | None
    config: dict[str, Any]


# ---------------------------------------------------------------- reading


def read_adapter(
    path: str | os.PathLike, client_id: str | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[dict[str, LoraFactors], AdapterInfo]:
    """The LoRA pairs of a PEFT adapter directory, keyed by module name, and its config.

    ``client_id`` names the adapter in error messages (default: the path). Files larger than
    ``max_bytes`` are refused before they are read.
    """
    path = Path(path)
    who = client_id or str(path)
    status = file_status(path, who, "the directory")
    if status is None:
        raise AdapterError(f"{who}: no such directory")
    if not stat.S_ISDIR(status.st_mode):
        raise AdapterError(f"{who}: not a directory (expected a PEFT adapter directory)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise AdapterError(f"{who}: cannot read the directory (permission denied)")
    config = read_config(path, who)
    check_plain_lora(config, who)
    tensors = read_tensors(path, who, max_bytes)
    modules = lora_modules(tensors, config, who)
    info = AdapterInfo(
        path=path,
        base_model=config.get("base_model_name_or_path"),
        target_modules=config.get("target_modules"),
        peft_type=config.get("peft_type"),
        task_type=config.get("task_type"),
        config=config,
    )
    return modules, info


def file_status(path: Path, who: str, label: str) -> os.stat_result | None:
    """``stat`` of ``path`` (links followed); None when nothing is there. A symbolic link loop or a folder that may
    not be searched is an ``AdapterError``, where ``Path.exists`` would answer a misleading False."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise AdapterError(f"{who}: cannot read {label} ({reason(e)})") from None


def is_regular_file(file: Path, who: str) -> bool:
    """True for a regular file; False when absent; a directory, FIFO or device where the file should be is refused
    (reading a FIFO would block)."""
    status = file_status(file, who, file.name)
    if status is not None and not stat.S_ISREG(status.st_mode):
        raise AdapterError(f"{who}: {file.name} is not a regular file")
    return status is not None


def read_config(path: Path, who: str) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not is_regular_file(file, who):
        raise AdapterError(f"{who}: no {CONFIG_NAME}; not a PEFT adapter directory")
    text = read_bytes(file, who, MAX_CONFIG_BYTES)
    try:
        config = json.loads(text)
    # ValueError: broken JSON, bytes that are not UTF-8, an integer of over 4,300 digits; RecursionError: nesting
    except (ValueError, RecursionError) as e:
        raise AdapterError(f"{who}: {CONFIG_NAME} is not valid JSON ({reason(e)})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{who}: {CONFIG_NAME} is not a JSON object")
    return config


def read_bytes(file: Path, who: str, max_bytes: int) -> bytes:
    try:
        size = file.stat().st_size
        if size > max_bytes:
            raise AdapterError(f"{who}: {file.name} is {size} bytes, over the limit of {max_bytes}")
        return file.read_bytes()
    except OSError as e:
        raise AdapterError(f"{who}: cannot read {file.name} ({reason(e)})") from None


def check_plain_lora(config: Mapping[str, Any], who: str) -> None:
    """Refuse configs whose update is not ``s * B @ A`` on the shared base weights."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{who}: peft_type is {peft_type!r}; florist aggregates LoRA adapters only")
    if config.get("use_dora"):
        raise AdapterError(
            f"{who}: a DoRA adapter (use_dora); its magnitude vector makes the update non-linear in B @ A, "
            "so it cannot be aggregated exactly"
        )
    for name in LORA_VARIANT_FIELDS:
        if name not in EXACT_VARIANTS and config.get(name):
            raise AdapterError(
                f"{who}: a LoRA variant ({name}) whose update is not s * B @ A; florist aggregates plain LoRA only"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and (init.startswith(BASE_MUTATING_INITS) or init == "mica"):
        raise AdapterError(
            f"{who}: init_lora_weights={init!r} changes the base weights, so the adapter is not an update of the "
            "shared base; save it with path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    refusals = {
        "use_qalora": "QALoRA pools the input before A",
        "lora_bias": "lora_bias adds a bias to B",
        "layer_replication": "layer_replication changes the base model's layers",
        "target_parameters": "target_parameters adapts raw parameters, not modules",
        "modules_to_save": "modules_to_save holds full module copies, not LoRA pairs",
        "trainable_token_indices": "trainable_token_indices trains embedding rows, not LoRA pairs",
    }
    for key, why in refusals.items():
        if config.get(key):
            raise AdapterError(f"{who}: {why}; florist aggregates plain LoRA only")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{who}: bias={config['bias']!r} trains base biases; florist aggregates plain LoRA only")


# The LoraConfig fields PEFT marks as switching on a LoRA variant (DoRA, aLoRA, ...; ``is_lora_variant`` in their
# metadata), as PEFT 0.21 lists them. Written out so that reading an adapter loads no peft; a test compares the list
# with the installed PEFT's, so an upgrade that adds a variant fails there rather than passing a variant here.
LORA_VARIANT_FIELDS = (
    "use_dora",
    "velora_config",
    "alora_invocation_tokens",
    "monteclora_config",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
)


def read_tensors(path: Path, who: str, max_bytes: int) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_NAME
    if not is_regular_file(file, who):
        if file_status(path / PICKLE_NAME, who, PICKLE_NAME) is not None:
            raise AdapterError(f"{who}: {PICKLE_NAME} is a pickle file; florist reads only safetensors")
        raise AdapterError(f"{who}: no {WEIGHTS_NAME}")
    try:
        size = file.stat().st_size
    except OSError as e:
        raise AdapterError(f"{who}: cannot read {WEIGHTS_NAME} ({reason(e)})") from None
    if size > max_bytes:
        raise AdapterError(f"{who}: {WEIGHTS_NAME} is {size} bytes, over the limit of {max_bytes}")
    try:
        with safe_open(file, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except OSError as e:
        raise AdapterError(f"{who}: cannot read {WEIGHTS_NAME} ({reason(e)})") from None
    except Exception as e:  # safetensors raises its own error type (and others) on a corrupt file
        raise AdapterError(f"{who}: {WEIGHTS_NAME} is not a valid safetensors file ({reason(e)})") from None


def lora_modules(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], who: str) -> dict[str, LoraFactors]:
    """Pair lora_A/lora_B tensors per module and attach PEFT's scaling."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key.removeprefix(PEFT_PREFIX))
        if match is None:
            raise AdapterError(f"{who}: tensor {key} is not a lora_A/lora_B weight; florist aggregates plain LoRA only")
        module, factor = match["module"], match["factor"]
        if factor in pairs.setdefault(module, {}):
            raise AdapterError(f"{who}, module {module}: two lora_{factor} tensors (several adapters in one file?)")
        pairs[module][factor] = tensor
    if not pairs:
        raise AdapterError(f"{who}: {WEIGHTS_NAME} holds no LoRA tensors")
    return {module: module_factors(module, pair, config, who) for module, pair in sorted(pairs.items())}


def module_factors(module: str, pair: Mapping[str, torch.Tensor], config: Mapping[str, Any], who: str) -> LoraFactors:
    where = f"{who}, module {module}"
    for factor in "AB":
        if factor not in pair:
            other = "B" if factor == "A" else "A"
            raise AdapterError(f"{where}: has lora_{other} but no lora_{factor}")
        t = pair[factor]
        if t.ndim != 2:
            raise AdapterError(
                f"{where}: lora_{factor} is {t.ndim}-D {tuple(t.shape)}; florist aggregates 2-D (linear) LoRA only"
            )
        if not t.is_floating_point():
            raise AdapterError(f"{where}: lora_{factor} has dtype {t.dtype}, expected a floating point type")
    A, B = pair["A"], pair["B"]
    rank = A.shape[0]
    if B.shape[1] != rank:
        raise AdapterError(f"{where}: lora_B is {tuple(B.shape)} but lora_A is {tuple(A.shape)}; their ranks differ")
    if rank < 1:
        raise AdapterError(f"{where}: lora_A and lora_B have rank 0")
    return LoraFactors(A=A, B=B, scaling=module_scaling(module, rank, config, where))


def module_scaling(module: str, rank: int, config: Mapping[str, Any], where: str) -> float:
    """PEFT's scaling for ``module``: alpha / r (alpha / sqrt(r) under rsLoRA), patterns matched as PEFT does."""
    r = pattern_value(config, "rank_pattern", module, config.get("r", 8), where)
    alpha = pattern_value(config, "alpha_pattern", module, config.get("lora_alpha", 8), where)
    if not isinstance(r, int) or isinstance(r, bool) or r != rank:
        raise AdapterError(f"{where}: the tensors have rank {rank} but {CONFIG_NAME} gives r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha {alpha!r} in {CONFIG_NAME} is not a positive number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def pattern_value(config: Mapping[str, Any], field: str, module: str, default: Any, where: str) -> Any:
    """The value of ``config[field]`` (a PEFT pattern dict) for ``module``, or ``default`` if no key matches."""
    pattern = config.get(field) or {}
    if not isinstance(pattern, Mapping):
        raise AdapterError(f"{where}: {field} in {CONFIG_NAME} is not an object")
    try:
        return pattern.get(pattern_key(pattern.keys(), module), default)
    except re.error as e:
        raise AdapterError(f"{where}: a {field} key in {CONFIG_NAME} is not a valid pattern ({e})") from None


def check_finite(modules: Mapping[str, LoraFactors], who: str) -> None:
    """Refuse NaN or Inf in any factor: applied to a model, a single such entry makes every output NaN. (The
    aggregation front checks client updates itself, with the client's name; this is for applying an adapter.)"""
    for module, f in modules.items():
        for label, t in (("lora_A", f.A), ("lora_B", f.B)):
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{who}, module {module}: {label} contains NaN or Inf")


# ---------------------------------------------------------------- writing


def write_adapter(
    path: str | os.PathLike,
    modules: Mapping[str, ModuleAggregate],
    base_model: str | None,
    *,
    extra_files: Mapping[str, bytes | str] | None = None,
    extra_adapters: Mapping[str, Mapping[str, ModuleAggregate]] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write ``modules`` (update ``B @ A`` each) as a PEFT LoRA directory at ``path``, atomically.

    ``extra_files`` (name -> content) are written beside the adapter, ``extra_adapters`` (name -> modules) as
    adapters of their own in ``path/<name>`` (FedEx-LoRA's ``residual``). An existing non-empty
    ``path`` is refused unless ``overwrite``, and even then unless it is an adapter directory florist wrote.
    A write that fails (a full disk, a file-size limit, no permission) is a ``WriteError``; ``path`` stays as it was.
    """
    with atomic_directory(path, overwrite, (extra_files or {}).keys()) as tmp:
        fill_adapter_dir(tmp, modules, base_model, dtype=dtype, task_type=task_type, where=str(path))
        for name, extra in (extra_adapters or {}).items():
            check_file_name(name, Path(path))
            (tmp / name).mkdir()
            fill_adapter_dir(tmp / name, extra, base_model, dtype=dtype, task_type=task_type, where=f"{path}/{name}")
        write_extra_files(tmp, extra_files or {})
    return Path(path)


def write_adapters(
    path: str | os.PathLike,
    adapters: Mapping[str, Mapping[str, ModuleAggregate]],
    base_model: str | None,
    *,
    extra_files: Mapping[str, bytes | str] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Several adapters under one directory (``path/<name>`` each, e.g. client_0, client_1), atomically as a whole."""
    with atomic_directory(path, overwrite, (extra_files or {}).keys()) as tmp:
        for name, modules in adapters.items():
            check_file_name(name, Path(path))
            sub = tmp / name
            sub.mkdir()
            fill_adapter_dir(sub, modules, base_model, dtype=dtype, task_type=task_type, where=str(Path(path) / name))
        write_extra_files(tmp, extra_files or {})
    return Path(path)


def fill_adapter_dir(
    directory: Path,
    modules: Mapping[str, ModuleAggregate],
    base_model: str | None,
    *,
    dtype: torch.dtype,
    task_type: str | None,
    where: str,
) -> None:
    """Config and tensors of one adapter into ``directory``; ``where`` (the final path) names it in errors."""
    if not modules:
        raise AdapterError(f"{where}: no modules to write")
    ranks = {}
    for name, m in modules.items():
        if m.A.ndim != 2 or m.B.ndim != 2 or m.B.shape[1] != m.A.shape[0] or m.rank < 1:
            shapes = f"B {tuple(m.B.shape)} and A {tuple(m.A.shape)}"
            raise AdapterError(f"{where}, module {name}: cannot write {shapes} as a LoRA pair")
        ranks[name] = m.rank
    config = unit_scaling_config(ranks, base_model, task_type)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {}
    for name, m in modules.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.A.detach().to("cpu", dtype).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.B.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def unit_scaling_config(ranks: Mapping[str, int], base_model: str | None, task_type: str | None) -> dict[str, Any]:
    """An adapter_config.json (as a dict) whose scaling is 1 on every module: r = lora_alpha = the max rank, and
    rank_pattern = alpha_pattern = {module: rank} for the others.

    Pattern keys are full module names. PEFT matches a key as the regex ``(.*\\.)?key$`` against
    each module's full name, so a full name matches only itself (its dots, regex wildcards, could
    in principle match another character; ``check_patterns_exact`` rules that out among the written modules).
    """
    r = max(ranks.values())
    pattern = {name: rank for name, rank in sorted(ranks.items()) if rank != r}
    check_patterns_exact(pattern, ranks)
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": False,
        "modules_to_save": None,
        "base_model_name_or_path": base_model,
        "task_type": task_type,
    }


def pattern_key(pattern_keys: Iterable[str], module: str) -> str:
    """The first pattern key that names ``module`` as PEFT matches them (``peft.utils.other.get_pattern_key``): the
    regex ``(.*\\.)?key$`` against the module's full name; the name itself when none does. A copy, so that reading and
    writing adapters loads no PEFT; a test holds it to PEFT's."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def check_patterns_exact(pattern: Mapping[str, int], modules: Mapping[str, int]) -> None:
    """Every written module must resolve, under PEFT's matching, to its own rank (first match wins)."""
    r = max(modules.values())
    for name, rank in modules.items():
        resolved = pattern.get(pattern_key(pattern.keys(), name), r)
        if resolved != rank:
            raise AdapterError(f"module {name}: another module's rank_pattern entry would match it; cannot write it")


def write_extra_files(directory: Path, files: Mapping[str, bytes | str]) -> None:
    for name, content in files.items():
        check_file_name(name, directory)
        target = directory / name
        if isinstance(content, str):
            target.write_text(content, encoding="utf-8")
        else:
            target.write_bytes(content)


def check_file_name(name: str, where: Path) -> None:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise AdapterError(f"{where}: {name!r} is not a plain file name")


# Besides its config and tensors, what florist writes in an adapter directory (``extra_files``).
WRITTEN_EXTRA_FILES = frozenset({"aggregation.json", "client.json", "spectra.json"})


def check_output(path: str | os.PathLike, overwrite: bool = False, extra_names: Iterable[str] = ()) -> None:
    """Refuse an output location that is empty, exists and is not an empty directory (unless ``overwrite``), holds
    the working directory, or (``overwrite``) is not an adapter directory florist wrote: the one it replaces must
    hold only adapters (each its config and tensors), the extra files florist writes and ``extra_names``."""
    if not os.fspath(path):
        raise AdapterError("the output path is empty; name the directory to write")
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise AdapterError(f"{path}: exists and is not a directory")
    if not path.is_dir():
        check_writable_place(path)
        return
    with contextlib.suppress(OSError):  # a working directory that was removed is in no output
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise AdapterError(f"{path}: holds the working directory, which replacing it would remove; choose another")
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise AdapterError(f"{path}: exists and is not empty (use --overwrite to replace it)")
    own = frozenset(extra_names) | WRITTEN_EXTRA_FILES
    found = scan(path, lambda parts, is_dir: written_in_adapter_dir(parts, is_dir, own))
    if found.foreign:
        raise AdapterError(
            f"{describe_foreign(path, found.foreign)}; refusing to delete it (move them out or choose another output)"
        )
    adapters = [path] if (path / CONFIG_NAME).is_file() else [p for p in path.iterdir() if p.is_dir()]
    if not adapters or not all((p / CONFIG_NAME).is_file() for p in adapters):
        raise AdapterError(f"{path}: not an adapter directory florist wrote (no {CONFIG_NAME}); refusing to delete it")


def written_in_adapter_dir(parts: tuple[str, ...], is_dir: bool, extra_names: frozenset[str]) -> bool:
    """Whether ``write_adapter`` or ``write_adapters`` writes an entry at the relative path ``parts``."""
    if is_dir:
        return len(parts) == 1
    return parts[-1] in (CONFIG_NAME, WEIGHTS_NAME) or (len(parts) == 1 and parts[-1] in extra_names)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool, extra_names: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``, on failure it vanishes.

    File-system failures (permissions, a full disk, a file-size limit; safetensors' own error type included)
    become one-line ``WriteError``s naming ``path``.
    """
    check_output(path, overwrite, extra_names)
    target = Path(path).absolute()  # "." and "dir/.." have no name to put a sibling beside
    make_directory(target.parent, path)
    with writing(path):
        tmp = sibling(target, "tmp")
    try:
        with writing(path, SafetensorError):
            yield tmp
            replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sibling(path: Path, kind: str) -> Path:
    """A new hidden directory beside ``path`` (created with the umask's permissions, like any mkdir)."""
    while True:
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}.{kind}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def replace_directory(new: Path, path: Path) -> None:
    """Rename ``new`` onto ``path``; an existing directory is moved aside first and removed only after."""
    if not path.exists():
        new.rename(path)
        return
    if path.is_symlink() or not path.is_dir():  # it became one since check_output
        raise AdapterError(f"{path}: exists and is not a directory")
    old = sibling(path, "old")
    try:
        path.rename(old / path.name)
    except BaseException:
        old.rmdir()
        raise
    try:
        new.rename(path)
    except BaseException:
        (old / path.name).rename(path)
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
