"""The package's layers: every florist module belongs to one layer and imports only from its own layer and lower ones,
no florist modules import each other in a cycle, and ``florist report`` and ``florist aggregate`` run without
importing transformers or peft.

Imports are read from the source with ``ast``, at any depth: inside functions and under ``if TYPE_CHECKING:`` too,
since those are dependencies all the same.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from florist.communication import RoundCommunication

ROOT = Path(__file__).resolve().parents[1]
FLORIST = ROOT / "florist"

# Lowest first; a module may import its own layer and lower ones. "x.*" is the package x and every module in it.
LAYERS = [
    ("aggregation math", ["florist.aggregation.*"]),
    ("vocabulary and declarations", ["florist.jobs", "florist.history", "florist.methods.*", "florist.communication"]),
    (
        "files and terminal output",
        [
            "florist.files",
            "florist.reading",
            "florist.adapters",
            "florist.progress",
            "florist.tables",
            "florist.threads",
        ],
    ),
    (
        "settings, models and data",
        [
            "florist.config",
            "florist.models",
            "florist.data.*",
            "florist.loss",
            "florist.base_weights",
            "florist.evaluation.*",
            "florist.synthetic",
        ],
    ),
    ("client and server", ["florist.client", "florist.server", "florist.rundir"]),
    ("results and reports", ["florist.results", "florist.report.*"]),
    ("assembly and engines", ["florist.setup", "florist.engines.*"]),
    ("entry points", ["florist.run", "florist.cli.*", "florist"]),
]


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(FLORIST.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def florist_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(FLORIST.rglob("*.py")) if "__pycache__" not in p.parts}


MODULES = florist_modules()


def package_of(module: str) -> str:
    """The package a module's relative imports start from: itself for a package, else its parent."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def imported_names(module: str, tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Every module name the module imports, made absolute, with its line: ``from x import y`` names the module
    x.y where there is one, else x (of which y is a name)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = package_of(module).split(".")
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            for alias in node.names:
                yield (f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base), node.lineno


def florist_imports() -> tuple[list[Import], list[Import]]:
    """(imports of one florist module by another, imports of a florist module that does not exist), each import
    once per pair of modules (its first line)."""
    found: dict[tuple[str, str], Import] = {}
    missing = []
    for module, path in MODULES.items():
        for name, line in imported_names(module, ast.parse(path.read_text(), str(path))):
            if name != "florist" and not name.startswith("florist."):
                continue
            if name not in MODULES:
                missing.append(Import(module, name, line))
            elif name != module and ((module, name) not in found or line < found[module, name].line):
                found[module, name] = Import(module, name, line)
    return sorted(found.values(), key=lambda i: (i.importer, i.imported)), missing


IMPORTS, MISSING = florist_imports()


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return module == pattern


def layers_of(module: str) -> list[int]:
    """The indices (0 lowest) of the layers whose patterns match the module."""
    return [i for i, (_, patterns) in enumerate(LAYERS) if any(matches(module, p) for p in patterns)]


def layer_label(module: str) -> str:
    i = layers_of(module)[0]
    return f"layer {i + 1}, {LAYERS[i][0]}"


def test_every_module_is_in_exactly_one_layer():
    problems = [
        f"{m}: in no layer" if not layers_of(m) else f"{m}: in layers {[i + 1 for i in layers_of(m)]}"
        for m in MODULES
        if len(layers_of(m)) != 1
    ]
    assert not problems, "modules not assigned to one layer of tests/test_layers.py's LAYERS:\n" + "\n".join(problems)


def test_every_florist_import_names_a_module_here():
    assert not MISSING, "imports of florist modules that do not exist:\n" + "\n".join(map(str, MISSING))


def test_no_module_imports_from_a_higher_layer():
    upward = [
        f"{i}: {layer_label(i.importer)} -> {layer_label(i.imported)}"
        for i in IMPORTS
        if len(layers_of(i.importer)) == len(layers_of(i.imported)) == 1
        and layers_of(i.imported)[0] > layers_of(i.importer)[0]
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Cycles that together pass through every module on one: within each group of modules that reach each other
    (Tarjan's strongly connected components), the shortest cycle through each member no earlier cycle passed,
    each as the modules along it, the first again at the end."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    cycles = []
    for group in sorted(groups):
        passed: set[str] = set()
        for member in group:
            if member not in passed:
                cycles.append(_cycle_through(member, set(group), edges))
                passed.update(cycles[-1])
    return cycles


def _cycle_through(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest path from ``start`` back to it through ``members`` (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges.get(node, set()) & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if nxt not in came_from:
                    came_from[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component")


def test_import_cycles_pass_through_every_module_on_a_cycle():
    edges = {"a": {"b", "c"}, "b": {"d"}, "c": {"a"}, "d": {"a", "e"}, "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert import_cycles(edges) == [["a", "c", "a"], ["b", "d", "a", "b"], ["e", "f", "e"]]


def test_no_import_cycles_between_florist_modules():
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        edges.setdefault(i.importer, set()).add(i.imported)
    cycles = import_cycles(edges)
    assert not cycles, "import cycles between florist modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


# ---------------------------------------------------------------------------------------------------------------------
# Commands that need neither transformers nor peft

HEAVY = ("transformers", "peft")

# florist's console entry point, run in-process: argv is the JSON file to write, the florist directory, the modules
# to watch (comma-separated) and the command's own arguments. The file says how the command exited, which watched
# modules got imported, and for each the florist frames on the stack when it was first looked for.
RUN_COMMAND = """
import json, sys, traceback

out, florist_dir, watched, *args = sys.argv[1:]
watched = watched.split(",")
first_asked = {}


class Watch:
    def find_spec(self, name, path=None, target=None):
        if name in watched and name not in first_asked:
            stack = traceback.extract_stack()
            here = [f for f in stack if f.filename.startswith(florist_dir + "/")]
            first_asked[name] = [f"florist/{f.filename[len(florist_dir) + 1:]}:{f.lineno} ({f.name})" for f in here]
        return None


sys.meta_path.insert(0, Watch())
sys.argv = ["florist", *args]
from florist.cli import main

try:
    main()
    code = 0
except SystemExit as e:
    code = e.code or 0
loaded = [name for name in watched if name in sys.modules]
with open(out, "w") as f:
    json.dump({"exit": code, "loaded": loaded, "via": {name: first_asked.get(name, []) for name in loaded}}, f)
"""


def run_florist(tmp_path: Path, *args: str) -> dict:
    """Run ``florist ARGS`` in a fresh interpreter; what it imported of HEAVY, and where florist first asked for it."""
    out = tmp_path / "imports.json"
    done = subprocess.run(
        [sys.executable, "-c", RUN_COMMAND, str(out), str(FLORIST), ",".join(HEAVY), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"},
        timeout=600,
    )
    assert out.exists(), f"florist {' '.join(args)} did not finish:\n{done.stdout}\n{done.stderr}"
    result = json.loads(out.read_text())
    assert result["exit"] == 0, f"florist {' '.join(args)} failed ({result['exit']}):\n{done.stdout}\n{done.stderr}"
    return result


def assert_light(result: dict, command: str) -> None:
    chains = [f"{name}, first asked for by " + " -> ".join(result["via"][name]) for name in result["loaded"]]
    assert not result["loaded"], f"florist {command} imported " + "; ".join(chains)


def write_adapter(path: Path, seed: int, rank: int = 2) -> None:
    """A PEFT LoRA adapter directory for two 8 x 8 projections, written by hand."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    tensors = {}
    for module in ("q_proj", "v_proj"):
        key = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, 8, generator=g)
        tensors[f"{key}.lora_B.weight"] = torch.randn(8, rank, generator=g)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


def round_record(branch: str, accuracy: float, loss: float) -> dict:
    """A finished round's metrics.jsonl record, as the server writes one: 4 clients, rank 4 on 2 64 x 64 modules."""
    method, _, tau = branch.partition("@")
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.self_attn.v_proj": 4}
    up = [2 * 4 * 128] * 4
    return {
        "round": 1,
        "branch": branch,
        "method": method,
        "threshold": float(tau) if tau else None,
        "participants": [0, 1, 2, 3],
        "ranks": ranks,
        "communication": RoundCommunication(method, up, up, 4, 8.0).to_dict(),
        "evaluation": {"accuracy": accuracy, "micro_accuracy": accuracy, "n_questions": 40, "heldout_loss": loss},
        "train": {"final_loss_mean": 1.0, "tokens": 1000, "seconds": 2.0},
        "server_seconds": 0.01,
        "rejected": {},
    }


def write_run(path: Path) -> None:
    """A run directory as ``florist run`` leaves one, by hand: config.toml and metrics.jsonl (base model, one round)."""
    path.mkdir()
    (path / "config.toml").write_text(
        'seed = 0\noutput = "x"\n[data]\ntrain = "builtin"\nclients = 4\n[lora]\nranks = [4]\n'
        '[federation]\nmethods = ["fedit", "flora"]\nrounds = 1\n'
    )
    base = {
        "round": 0,
        "branch": "base",
        "method": "base",
        "threshold": None,
        "participants": [],
        "ranks": {},
        "communication": {},
        "evaluation": {"accuracy": 0.25, "micro_accuracy": 0.25, "n_questions": 40, "heldout_loss": 2.5},
        "train": {},
        "server_seconds": 0.0,
        "rejected": {},
    }
    records = [base, round_record("fedit", 0.30, 2.1), round_record("flora", 0.28, 2.2)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_aggregate_runs_without_transformers_or_peft(tmp_path):
    clients = [tmp_path / "site0", tmp_path / "site1"]
    for k, client in enumerate(clients):
        write_adapter(client, seed=k, rank=2 + k)
    out = tmp_path / "global"
    args = ["--method", "florist", "--threshold", "0.9", "--output", str(out)]
    result = run_florist(tmp_path, "aggregate", *map(str, clients), *args)
    assert json.loads((out / "aggregation.json").read_text())["clients"] == list(map(str, clients))
    assert_light(result, "aggregate")


def test_report_runs_without_transformers_or_peft(tmp_path):
    run = tmp_path / "run"
    write_run(run)
    result = run_florist(tmp_path, "report", str(run), "--no-plots")
    assert "fedit" in (run / "report.md").read_text().lower()
    assert_light(result, "report")
