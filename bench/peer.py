#!/usr/bin/env python
"""florist's FLoRIST against the authors' own, on the same factors: speed, accuracy, and where the two differ.

Give it the authors' ``fed_utils/model_aggregation.py`` (from their public repository; florist does not ship it):

    python bench/peer.py PATH/TO/fed_utils/model_aggregation.py
    python bench/peer.py PATH --models tinyllama --repeats 3

For each model's q_proj and v_proj shapes, 8 clients at r = 16 send the random float32 factors of
``bench/aggregation.py`` (seeded; alpha = 2r). Their ``FedAvg(..., florist=True)`` reads the clients'
``pytorch_model.bin`` files in their layout and writes ``adapter_model.bin``; florist's step is
``florist.methods.aggregate`` on the same factors in memory, and ``florist aggregate`` on them as PEFT directories.

- **In-process**: their ``FedAvg`` call (which includes reading the 8 files and writing one; that I/O is timed alone
  and reported) against florist's step, interleaved, best of ``--repeats``.
- **From a fresh process**: ``florist aggregate`` against a fresh interpreter that imports their module and calls
  ``FedAvg``, interleaved, best of ``--cli-repeats``.
- **Accuracy**: both results against an exact float64 reference (the float64 stacked SVD of the exact update, cut at
  each result's own rank), as ||B A - best rank-p||_F / ||ΔW||_F, the worst module; and whether each picks the
  rank the reference's energy gives at τ.
- **Differences**, measured on their code: the α/r scaling (their code multiplies the factors as stored, so a
  PEFT adapter with α/r = 2 aggregates to half its update), and FlexLoRA with heterogeneous ranks (the rank
  each client's returned adapter has).

Their function takes these factors with the scaling already folded into B (the timing and accuracy runs), so that
both compute the same update. Results go to bench/results/peer.json (``--json``), rendered into docs/peer.md by
``bench/render.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import inspect
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import torch
from aggregation import (
    MODELS,
    RESULTS,
    client_updates,
    florist_command,
    machine_line,
    print_markdown,
    timed_process,
    write_client_dirs,
    write_json,
)

from florist.aggregation import ClientUpdate, LoraFactors, energy_rank
from florist.aggregation.base import fold_scaling
from florist.aggregation.svd import householder_svd
from florist.aggregation.validate import normalized_weights
from florist.methods import aggregate

RANK = 16
CLIENTS = 8
HETEROGENEOUS = (64, 32, 16, 16, 8, 8, 4, 4)
PREFIX = "base_model.model."


# ---------------------------------------------------------------- their layout


def load_theirs(path: Path) -> ModuleType:
    """Their ``model_aggregation.py`` as a module (it imports torch, numpy and peft)."""
    spec = importlib.util.spec_from_file_location("their_model_aggregation", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"peer bench: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "FedAvg", None)):
        raise SystemExit(f"peer bench: {path} has no FedAvg function")
    return module


def write_their_clients(updates: Sequence[ClientUpdate], root: Path, epoch: int, fold: bool) -> None:
    """Each client's pairs as ``root/epoch/local_output_k/pytorch_model.bin`` (PEFT's key names), B with the
    scaling folded in when ``fold`` (else as PEFT stores it)."""
    for k, u in enumerate(updates):
        state = {}
        for name, f in u.modules.items():
            state[f"{PREFIX}{name}.lora_A.weight"] = f.A.contiguous()
            state[f"{PREFIX}{name}.lora_B.weight"] = (fold_scaling(f) if fold else f.B).contiguous()
        folder = root / str(epoch) / f"local_output_{k}"
        folder.mkdir(parents=True)
        torch.save(state, folder / "pytorch_model.bin")


def their_arguments(fedavg: Callable, root: Path, epoch: int, counts: Sequence[int], ranks: Sequence[int], **flags):
    """Keyword arguments for their ``FedAvg`` from its own signature (its versions name the FLoRA flag ``stacking``
    or ``flora``): the method's flag set, every other flag False."""
    known = {
        "model": torch.nn.Linear(1, 1),  # one of their versions reads the device of the model's parameters
        "selected_clients_set": list(range(len(counts))),
        "output_dir": str(root) + os.sep,
        "local_dataset_len_dict": dict(enumerate(counts)),
        "epoch": epoch,
        "threshold": flags.pop("threshold", 1.0),
        "lora_r": max(ranks),
        "heter": len(set(ranks)) > 1,
        "local_ranks": list(ranks),
    }
    kwargs = {}
    for name in inspect.signature(fedavg).parameters:
        kwargs[name] = known[name] if name in known else bool(flags.get(name, False))
    return kwargs


def run_theirs(module: ModuleType, kwargs: dict) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        module.FedAvg(**kwargs)


def their_output(root: Path, epoch: int, method: str, client: str | None = None) -> dict[str, torch.Tensor]:
    folder = root / str(epoch) / method / (client or "")
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def their_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(B, A) per module name from their output's keys."""
    pairs = {}
    for key, A in state.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            pairs[name] = (state[key.replace(".lora_A.weight", ".lora_B.weight")], A)
    return pairs


# ---------------------------------------------------------------- accuracy


def reference_errors(
    updates: Sequence[ClientUpdate], results: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], tau: float
) -> dict[str, dict]:
    """For each result (name -> {module: (B, A)}): the worst ||B A - best rank-p||_F / ||ΔW||_F over modules against
    the float64 reference, and the modules whose rank is not the reference's energy rank at ``tau``."""
    weights = normalized_weights(updates, None)
    out = {label: {"max_rel_error": 0.0, "rank_mismatches": 0} for label in results}
    for name in updates[0].modules:
        B = torch.cat([fold_scaling(u.modules[name]).double() for u in updates], dim=1)
        A = torch.cat([w * u.modules[name].A.double() for u, w in zip(updates, weights)], dim=0)
        U, S, Vh = householder_svd(B, A)
        full = float(S.norm())
        for label, pairs in results.items():
            B_r, A_r = (t.double() for t in pairs[name])
            p = A_r.shape[0]
            # ||B_r A_r - U_p S_p Vh_p||_F from factors: stack [B_r, -U_p S_p] [A_r; Vh_p], never m x n
            diff = torch.linalg.matrix_norm(
                torch.linalg.qr(torch.cat([B_r, -U[:, :p] * S[:p]], 1))[1] @ torch.cat([A_r, Vh[:p]], 0)
            )
            out[label]["max_rel_error"] = max(out[label]["max_rel_error"], float(diff) / full)
            out[label]["rank_mismatches"] += int(p != energy_rank(S, tau))
    return out


# ---------------------------------------------------------------- the comparisons


def best_interleaved(runs: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """The fastest of ``repeats`` wall times of each callable, run in turn (so a load change hits both)."""
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def in_process(theirs: ModuleType, model: str, tau: float, repeats: int, seed: int) -> dict:
    updates = client_updates(MODELS[model].modules(), (RANK,) * CLIENTS, seed, shared_a=False)
    counts = [u.num_examples for u in updates]
    with tempfile.TemporaryDirectory(prefix="florist-peer-") as tmp:
        root = Path(tmp)
        write_their_clients(updates, root, 0, fold=True)
        kwargs = their_arguments(theirs.FedAvg, root, 0, counts, (RANK,) * CLIENTS, florist=True, threshold=tau)
        aggregate("florist", updates, value=tau)  # warm both
        run_theirs(theirs, kwargs)
        ours_s, theirs_s = best_interleaved(
            [lambda: aggregate("florist", updates, value=tau), lambda: run_theirs(theirs, kwargs)], repeats
        )
        io_s = best_interleaved([lambda: their_io(root, 0, len(updates))], repeats)[0]
        theirs_pairs = their_pairs(their_output(root, 0, "florist"))
    ours = aggregate("florist", updates, value=tau).modules
    errors = reference_errors(
        updates, {"florist": {n: (m.B, m.A) for n, m in ours.items()}, "theirs": theirs_pairs}, tau
    )
    return {
        "model": model,
        "threshold": tau,
        "modules": len(ours),
        "florist_seconds": ours_s,
        "their_seconds": theirs_s,
        "their_io_seconds": io_s,
        "speedup": theirs_s / ours_s,
        "florist_error": errors["florist"],
        "their_error": errors["theirs"],
    }


def their_io(root: Path, epoch: int, clients: int) -> None:
    """What their FedAvg spends reading and writing, alone: the 8 torch.load calls and one torch.save."""
    states = [torch.load(root / str(epoch) / f"local_output_{k}" / "pytorch_model.bin") for k in range(clients)]
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(states[0], Path(tmp) / "adapter_model.bin")


DRIVER = """
import contextlib, importlib.util, io, json, sys
spec = importlib.util.spec_from_file_location("their_model_aggregation", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
kwargs = json.loads(sys.argv[2])
import torch
kwargs["model"] = torch.nn.Linear(1, 1)
kwargs["local_dataset_len_dict"] = {int(k): v for k, v in kwargs["local_dataset_len_dict"].items()}
with contextlib.redirect_stdout(io.StringIO()):
    module.FedAvg(**kwargs)
"""


def fresh_process(path: Path, theirs: ModuleType, model: str, tau: float, repeats: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="florist-peer-") as tmp:
        root = Path(tmp)
        # one set of factors for both: florist's PEFT directories, and the same pairs in their layout
        dirs, counts = write_client_dirs(model, f"{RANK}", seed, root / "ours")
        updates = client_updates(MODELS[model].modules(), (RANK,) * CLIENTS, seed, shared_a=False)
        assert [u.num_examples for u in updates] == counts
        write_their_clients(updates, root / "theirs", 0, fold=True)
        kwargs = their_arguments(
            theirs.FedAvg, root / "theirs", 0, counts, (RANK,) * CLIENTS, florist=True, threshold=tau
        )
        kwargs.pop("model")  # the driver makes its own
        their_argv = [sys.executable, "-c", DRIVER, str(path), json.dumps(kwargs)]
        out = root / "out"
        our_argv = [*florist_command(), "aggregate", *map(str, dirs), "--method", "florist", "--threshold", f"{tau:g}"]
        our_argv += ["--weights", ",".join(map(str, counts)), "--output", str(out), "--overwrite"]
        best = {"florist": float("inf"), "theirs": float("inf")}
        for _ in range(repeats):
            best["florist"] = min(best["florist"], timed_process(our_argv)[0])
            best["theirs"] = min(best["theirs"], timed_process(their_argv)[0])
    return {
        "model": model,
        "threshold": tau,
        "florist_seconds": best["florist"],
        "their_seconds": best["theirs"],
        "speedup": best["theirs"] / best["florist"],
    }


def differences(theirs: ModuleType, seed: int) -> list[str]:
    """Where their code differs from the method, each measured on a small model of two modules."""
    modules = [("layers.0.q_proj", (64, 48)), ("layers.0.v_proj", (32, 48))]
    found = []
    with tempfile.TemporaryDirectory(prefix="florist-peer-") as tmp:
        # the scaling: PEFT stores B unscaled and applies alpha / r in the forward pass. Their code stacks the factors
        # as stored; one alpha / r for every client can be re-applied by whoever loads the result, clients at
        # different alpha / r cannot: the best single rescaling of their aggregate is measured against the update
        base = client_updates(modules, (RANK,) * CLIENTS, seed, shared_a=False)
        updates = [
            ClientUpdate(
                {n: LoraFactors(f.A, f.B, 1.0 if k % 2 else 2.0) for n, f in u.modules.items()}, u.num_examples
            )
            for k, u in enumerate(base)
        ]
        counts = [u.num_examples for u in updates]
        write_their_clients(updates, Path(tmp), 0, fold=False)
        run_theirs(theirs, their_arguments(theirs.FedAvg, Path(tmp), 0, counts, (RANK,) * CLIENTS, florist=True))
        pairs = their_pairs(their_output(Path(tmp), 0, "florist"))
        weights = normalized_weights(updates, None)
        worst = 0.0
        for name, _ in modules:
            exact = sum(w * u.modules[name].delta().double() for u, w in zip(updates, weights))
            got = pairs[name][0].double() @ pairs[name][1].double()
            best = float((got * exact).sum() / (got * got).sum())  # the least-squares common rescaling
            worst = max(worst, float((best * got - exact).norm() / exact.norm()))
        found.append(
            "α/r: their code stacks the factors as PEFT stores them (B unscaled) and applies no α/r, which a "
            "loader can re-apply only when every client has the same; with clients at α/r = 1 and 2 in turn, their "
            f"FLoRIST at τ = 1 is {worst:.0%} off the update even after the best single rescaling (florist folds each "
            "client's own "
            "α/r into B before stacking)."
        )
        # FlexLoRA with heterogeneous ranks: each client should get its own rank back
        het = client_updates(modules, HETEROGENEOUS, seed, shared_a=False)
        root = Path(tmp) / "flex"
        write_their_clients(het, root, 0, fold=True)
        kwargs = their_arguments(theirs.FedAvg, root, 0, [u.num_examples for u in het], HETEROGENEOUS, flex=True)
        try:
            run_theirs(theirs, kwargs)
            got = [
                their_output(root, 0, "flex", str(k))[f"{PREFIX}{modules[0][0]}.lora_A.weight"].shape[0]
                for k in range(len(het))
            ]
        except Exception as e:  # their code, their failure: say so rather than stop
            found.append(f"FlexLoRA with ranks {HETEROGENEOUS}: their code fails ({type(e).__name__}: {e})")
        else:
            verdict = "as it should" if list(got) == list(HETEROGENEOUS) else "not each client's own rank"
            found.append(
                f"FlexLoRA with ranks {', '.join(map(str, HETEROGENEOUS))}: their clients get back ranks "
                f"{', '.join(map(str, got))}, {verdict} (florist: each client its own)."
            )
    return found


# ---------------------------------------------------------------- report


IN_HEADER = [
    "model",
    "τ",
    "florist s",
    "theirs s",
    "of it their I/O s",
    "speed-up",
    "without their I/O",
    "florist error",
    "their error",
]
FRESH_HEADER = ["model", "τ", "florist aggregate s", "theirs (fresh python) s", "speed-up"]


def in_rows(rows: Sequence[dict]) -> list[list[str]]:
    def error(e: dict) -> str:
        return f"{e['max_rel_error']:.1e}" + (f" ({e['rank_mismatches']} ranks off)" if e["rank_mismatches"] else "")

    return [
        [
            MODELS[r["model"]].title,
            f"{r['threshold']:g}",
            f"{r['florist_seconds']:.3f}",
            f"{r['their_seconds']:.3f}",
            f"{r['their_io_seconds']:.3f}",
            f"{r['speedup']:.1f}×",
            f"{(r['their_seconds'] - r['their_io_seconds']) / r['florist_seconds']:.1f}×",
            error(r["florist_error"]),
            error(r["their_error"]),
        ]
        for r in rows
    ]


def fresh_rows(rows: Sequence[dict]) -> list[list[str]]:
    return [
        [
            MODELS[r["model"]].title,
            f"{r['threshold']:g}",
            f"{r['florist_seconds']:.2f}",
            f"{r['their_seconds']:.2f}",
            f"{r['speedup']:.1f}×",
        ]
        for r in rows
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("theirs", type=Path, help="the authors' fed_utils/model_aggregation.py")
    parser.add_argument("--models", default="tinyllama,llama-7b", help="comma-separated (default tinyllama,llama-7b)")
    parser.add_argument("--threshold", type=float, default=0.9, help="τ (default 0.9)")
    parser.add_argument("--repeats", type=int, default=5, help="in-process runs of each, the fastest kept (default 5)")
    parser.add_argument("--cli-repeats", type=int, default=3, help="fresh processes of each (default 3; 0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", type=Path, default=RESULTS / "peer.json")
    args = parser.parse_args(argv)
    if not args.theirs.is_file():
        parser.error(f"{args.theirs}: no such file (their fed_utils/model_aggregation.py)")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        parser.error(
            f"--models: unknown model {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(MODELS)}"
        )
    if not 0 < args.threshold <= 1:
        parser.error(f"--threshold: must be in (0, 1], got {args.threshold}")
    if args.repeats < 1 or args.cli_repeats < 0:
        parser.error("--repeats must be at least 1 and --cli-repeats at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    theirs = load_theirs(args.theirs.resolve())
    load_before = f"{os.getloadavg()[0]:.1f}"
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    inproc, fresh = [], []
    for model in args.models:
        say(f"{MODELS[model].title}: in-process, {args.repeats} runs of each")
        inproc.append(in_process(theirs, model, args.threshold, args.repeats, args.seed))
        if args.cli_repeats:
            say(f"{MODELS[model].title}: fresh processes, {args.cli_repeats} of each")
            fresh.append(
                fresh_process(args.theirs.resolve(), theirs, model, args.threshold, args.cli_repeats, args.seed)
            )
    say("differences")
    found = differences(theirs, args.seed)
    machine = machine_line(torch.get_num_threads())
    load_after = f"{os.getloadavg()[0]:.1f}"
    print(f"{machine}; load average before / after: {load_before} / {load_after}\n")
    print_markdown(IN_HEADER, in_rows(inproc))
    if fresh:
        print_markdown(FRESH_HEADER, fresh_rows(fresh))
    for line in found:
        print(f"- {line}")
    write_json(
        args.json_path,
        {
            "machine": machine,
            "load_before": load_before,
            "load_after": load_after,
            "args": {k: v for k, v in vars(args).items() if k not in ("json_path", "theirs")},
            "their_file": {"name": args.theirs.name, "sha256": hashlib.sha256(args.theirs.read_bytes()).hexdigest()},
            "in_process": {"header": IN_HEADER, "rows": in_rows(inproc)},
            "fresh_process": {"header": FRESH_HEADER, "rows": fresh_rows(fresh)},
            "differences": found,
            "results": {"in_process": inproc, "fresh_process": fresh},
        },
    )


if __name__ == "__main__":
    main()
