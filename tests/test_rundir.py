"""The run directory as a trust boundary: florist deletes only what it wrote, one process runs in a directory at a
time, a full disk or an unwritable place is one line and resumes, and torn or moved run directories resume.

Everything runs on the tiny model, most of it on copies of one finished two-round run without loading any model.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability import leftovers
from typer.testing import CliRunner

import florist.adapters as adapters
import florist.run as run_module
import florist.setup as run_setup
from florist.adapters import AdapterError, read_adapter, write_adapter
from florist.aggregation import ModuleAggregate
from florist.cli import app
from florist.config import load_config
from florist.files import WriteError, atomic_write_bytes
from florist.models import tiny_llama
from florist.rundir import RunDirectory, RunDirError
from florist.server import make_branches

QUICK = [
    "data.clients=2",
    "data.max_examples_per_client=4",
    "data.cutoff=32",
    'data.partition="iid"',
    "train.max_steps=1",
    "train.batch_size=2",
    "train.micro_batch_size=2",
    "lora.ranks=[2]",
    'federation.methods=["fedit"]',
    "federation.rounds=2",
    'eval.questions="none"',
    "eval.heldout_loss=false",
]
FLORIST_FILES = {
    ".florist.lock",
    "config.toml",
    "state.json",
    "metrics.jsonl",
    "results.md",
    "results.csv",
    "results.json",
    "rounds",
}
runner = CliRunner()


@pytest.fixture(autouse=True)
def tiny_model(monkeypatch):
    monkeypatch.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))


def config_toml(output: Path, *overrides: str) -> str:
    return load_config(None, QUICK + [f'output="{output}"', *overrides]).to_toml()


def run(output: Path, *overrides: str) -> Path:
    config = load_config(None, QUICK + [f'output="{output}"', *overrides])
    return run_module.run(config, progress=False, log=lambda m: None)


def cli_run(output: str, *args: str):
    sets = [x for o in QUICK for x in ("--set", o)]
    return runner.invoke(app, ["run", "--quiet", "--output", output, *sets, *args])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("florist: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, object]:
    """Every entry under ``root``: a file's bytes, "dir", or a symlink's target (never followed)."""
    out: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "dir" if p.is_dir() else p.read_bytes()
    return out


def same_adapters(a: Path, b: Path) -> int:
    """Every adapter of two run directories bit for bit; returns how many."""
    found = sorted(p.parent.relative_to(a) for p in a.rglob("adapter_model.safetensors"))
    assert found == sorted(p.parent.relative_to(b) for p in b.rglob("adapter_model.safetensors"))
    for rel in found:
        fa, fb = read_adapter(a / rel)[0], read_adapter(b / rel)[0]
        assert all(torch.equal(fa[n].A, fb[n].A) and torch.equal(fa[n].B, fb[n].B) for n in fa), rel
    return len(found)


def metric_rounds(path: Path) -> list[int]:
    return [json.loads(x)["round"] for x in (path / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-round run (FedIT, two clients); tests work on copies of it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_setup, "load_model", lambda name, dtype, device: tiny_llama(0))
        return run(tmp_path_factory.mktemp("finished") / "run")


def copy_run(finished: Path, target: Path) -> Path:
    shutil.copytree(finished, target, symlinks=True)
    return target


# --- deleting only what florist wrote ------------------------------------------------------------------------------


def add_notes(path: Path, outside: Path) -> list[str]:
    (path / "notes.txt").write_text("mine")
    return ["notes.txt"]


def add_round_file(path: Path, outside: Path) -> list[str]:
    (path / "rounds" / "001" / "fedit" / "README.md").write_text("mine")
    return ["rounds/001/fedit/README.md"]


def add_user_folder(path: Path, outside: Path) -> list[str]:
    (path / "data").mkdir()
    (path / "data" / "train.json").write_text("[]")
    return ["data/"]


def add_link_out(path: Path, outside: Path) -> list[str]:
    (path / "rounds" / "002" / "elsewhere").symlink_to(outside)
    (path / "plots").mkdir()
    (path / "plots" / "run-tradeoff.png").write_bytes(b"png")  # florist report's: no reason to refuse
    (path / "plots" / "photo.jpg").write_bytes(b"jpg")
    return ["plots/photo.jpg", "rounds/002/elsewhere"]


@pytest.mark.parametrize("add", [add_notes, add_round_file, add_user_folder, add_link_out])
def test_overwrite_refuses_a_run_directory_holding_files_florist_did_not_write(finished, tmp_path, add):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    path = copy_run(finished, tmp_path / "run")
    foreign = add(path, outside)
    before = tree(path)
    with pytest.raises(RunDirError) as refused:
        RunDirectory(path, None).open(config_toml(path), overwrite=True)
    message = str(refused.value)
    count = f"{len(foreign)} file{'s' if len(foreign) > 1 else ''}"
    assert message.startswith(f"{path} holds {count} florist did not write ({', '.join(foreign)})"), message
    assert "refusing to delete it" in message and "\n" not in message
    assert tree(path) == before and tree(outside) == {"precious.txt": b"keep"}


def test_overwrite_deletes_a_run_florist_wrote_and_nothing_else(finished, tmp_path):
    path = copy_run(finished, tmp_path / "run")
    (path / "rounds" / "001" / ".fedit.0a1b2c3d.old").mkdir()  # what a kill leaves of an atomic replace
    rundir = RunDirectory(path, None)
    assert rundir.open(config_toml(path, "federation.rounds=3"), overwrite=True) == 0
    rundir.close()
    assert sorted(p.name for p in path.iterdir()) == [".florist.lock", "config.toml"]


@pytest.mark.parametrize("output", ["", "."])
def test_run_refuses_an_empty_output_and_a_working_directory_of_user_files(tmp_path, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.tex").write_text("mine")
    for overwrite in ([], ["--overwrite"]):
        result = cli_run(output, *overwrite)
        line = one_line_error(result)
        assert ("output" in line and "empty" in line) if output == "" else ("thesis.tex" in line)
        assert tree(tmp_path) == {"thesis.tex": b"mine"}


def test_a_directory_that_is_no_run_is_refused_naming_what_it_holds(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "a.txt").write_text("a")
    (path / "state.json").write_text('{"completed_rounds": 5}')  # florist's name, but no config.toml beside it
    with pytest.raises(
        RunDirError, match=r"not a florist run directory \(no config.toml; it holds a.txt, state.json\)"
    ):
        RunDirectory(path, None).open(config_toml(path))
    assert tree(path) == {"a.txt": b"a", "state.json": b'{"completed_rounds": 5}'}


# --- one process per run directory -----------------------------------------------------------------------------------

HOLDER = """
import sys, time
from florist.rundir import RunDirectory
rundir = RunDirectory(sys.argv[1], None)
rundir.open(sys.argv[2])
print("holding", flush=True)
time.sleep(600)
"""


def test_a_second_process_is_refused_while_the_first_holds_the_directory(finished, tmp_path):
    path = copy_run(finished, tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), config_toml(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        before = tree(path)
        with pytest.raises(RunDirError, match=rf"another florist process \(pid {holder.pid}\) is running in this"):
            RunDirectory(path, None).open(config_toml(path))
        one_line_error(cli_run(str(path)), f"pid {holder.pid}")
        one_line_error(cli_run(str(path), "--overwrite"), f"pid {holder.pid}")  # and deletes nothing
        assert tree(path) == before
    finally:
        holder.kill()  # SIGKILL: no chance to clean up, yet the lock goes with the process
        holder.wait(timeout=60)
    rundir = RunDirectory(path, None)
    assert rundir.open(config_toml(path)) == 2
    # in one process too: a second opening waits for the first to close, however the first run ended
    with pytest.raises(RunDirError, match=rf"pid {os.getpid()}"):
        RunDirectory(path, None).open(config_toml(path))
    rundir.close()
    with RunDirectory(path, None) as again:
        assert again.open(config_toml(path)) == 2


def test_a_run_that_fails_releases_the_directory(tmp_path, monkeypatch):
    def fails(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "_run_in_process", fails)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "r")
    with RunDirectory(tmp_path / "r", None) as rundir:
        assert rundir.open(config_toml(tmp_path / "r")) == 0


# --- a full disk and unwritable places -----------------------------------------------------------------------------

TINY_CLI = """
import sys
import florist.setup as run_setup
from florist.models import tiny_llama
run_setup.load_model = lambda name, dtype, device: tiny_llama(0)
from florist.cli import app
app(sys.argv[1:], prog_name="florist")
"""


def test_a_file_size_limit_is_one_line_leaves_nothing_half_written_and_the_run_resumes(finished, tmp_path):
    """``ulimit -f``: past it the system sends SIGXFSZ, which would kill Python; florist gets EFBIG instead."""
    path = tmp_path / "run"
    limit = 4096  # room for config.toml and round 0's metrics, not for a client's adapter
    sets = [x for o in QUICK for x in ("--set", o)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TINY_CLI, "run", "--quiet", "--output", str(path), *sets],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"florist: cannot write {path}/rounds/001/") and last.endswith(": File too large"), last
    assert leftovers(path) == [] and not (path / "state.json").exists()
    for adapter in path.rglob("adapter_config.json"):  # whatever was written is whole
        read_adapter(adapter.parent)
    assert run(path) == path
    assert metric_rounds(path) == [0, 1, 2] and same_adapters(finished, path) == 2 * (2 + 1)


@pytest.mark.parametrize("output", ["/dev/null/x", "{tmp}/file/run"])
def test_an_output_under_a_file_is_one_line_and_nothing_is_written(tmp_path, output):
    (tmp_path / "file").write_text("a file")
    output = output.format(tmp=tmp_path)
    parent = str(Path(output).parent)
    one_line_error(cli_run(output), f"cannot write {output}: {parent} is not a directory")
    with pytest.raises(WriteError, match=f"cannot write {output}/x.json: {parent} is not a directory"):
        atomic_write_bytes(Path(output) / "x.json", b"{}")
    modules = {"m.q_proj": ModuleAggregate(A=torch.ones(2, 4), B=torch.ones(4, 2))}
    with pytest.raises(WriteError, match=f"cannot write {output}: {parent} is not a directory"):
        write_adapter(output, modules, None)
    assert tree(tmp_path) == {"file": b"a file"}


def enospc(*args, **kwargs):
    raise OSError(28, "No space left on device")


def safetensors_disk_full(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("fail", ["os", "safetensors"])
def test_a_full_disk_is_a_write_error_that_keeps_the_old_files(tmp_path, monkeypatch, fail):
    modules = {"m.q_proj": ModuleAggregate(A=torch.ones(2, 4), B=torch.ones(4, 2))}
    write_adapter(tmp_path / "adapter", modules, None, extra_files={"client.json": "{}"})
    atomic_write_bytes(tmp_path / "state.json", b"old")
    before = tree(tmp_path)
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path}/state.json: No space left on device$"):
        atomic_write_bytes(tmp_path / "state.json", b"new")
    monkeypatch.setattr(adapters, "save_file", enospc if fail == "os" else safetensors_disk_full)
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path}/adapter: No space left on device$"):
        write_adapter(tmp_path / "adapter", modules, None, overwrite=True, extra_files={"client.json": "{}"})
    with pytest.raises(WriteError, match=f"^cannot write {tmp_path}/new: No space left on device$"):
        write_adapter(tmp_path / "new", modules, None)
    assert tree(tmp_path) == before


# --- torn files and moved directories --------------------------------------------------------------------------------


def whole_rounds(metrics: bytes, upto: int) -> int:
    """The spec: rounds 1..n each have their FedIT line among the complete JSON lines before the first broken one."""
    seen = set()
    for raw in metrics.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            seen.add((line["round"], line["branch"]))
        except (ValueError, KeyError, TypeError):
            break
    n = 0
    while n < upto and (n + 1, "fedit") in seen:
        n += 1
    return n


damage = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1)),  # the file ends early, at any byte
    st.tuples(st.just("garbage"), st.binary(max_size=40)),  # whatever bytes instead
)


@given(state=st.one_of(st.none(), damage), metrics=st.one_of(st.none(), damage))
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_torn_state_or_metrics_file_is_repaired_to_the_last_round_saved_whole(
    finished, tmp_path_factory, state, metrics
):
    path = copy_run(finished, tmp_path_factory.mktemp("torn") / "run")
    for name, how in (("state.json", state), ("metrics.jsonl", metrics)):
        if how is not None:
            data = (path / name).read_bytes()
            (path / name).write_bytes(data[: int(len(data) * how[1])] if how[0] == "cut" else how[1])
    try:
        claimed = json.loads((path / "state.json").read_bytes())["completed_rounds"]
        claimed = claimed if type(claimed) is int and claimed >= 0 else 2
    except (ValueError, KeyError, TypeError):
        claimed = 2  # unreadable: as many as were saved
    expected = whole_rounds((path / "metrics.jsonl").read_bytes(), claimed)
    rundir = RunDirectory(path, None)
    assert rundir.open(config_toml(path)) == expected
    rundir.close()
    assert metric_rounds(path) == ([0] + list(range(1, expected + 1)) if expected else [])
    assert json.loads((path / "state.json").read_text())["completed_rounds"] == expected
    assert sorted(p.name for p in (path / "rounds").iterdir()) == [f"{r:03d}" for r in range(1, expected + 1)]
    assert rundir.notes or expected == 2  # a round given up is said


def test_a_moved_and_torn_run_resumes_from_its_last_whole_round_to_the_same_adapters(finished, tmp_path):
    first = copy_run(finished, tmp_path / "first")
    lines = (first / "metrics.jsonl").read_text().splitlines()
    (first / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])  # round 2's line torn
    moved = first.rename(tmp_path / "moved")
    assert run(moved) == moved  # the stored output is the old path: a moved directory is the same run
    assert f'output = "{moved}"' in (moved / "config.toml").read_text()
    assert metric_rounds(moved) == [0, 1, 2] and same_adapters(finished, moved) == 2 * (2 + 1)


def test_a_different_configuration_is_refused_naming_the_keys(finished, tmp_path):
    path = copy_run(finished, tmp_path / "run")
    with pytest.raises(RunDirError, match=r"different configuration \(federation.rounds, train.lr differ\)"):
        RunDirectory(path, None).open(config_toml(path, "federation.rounds=3", "train.lr=0.5"))


def test_a_run_begun_before_a_setting_existed_resumes_at_its_default_and_only_there(finished, tmp_path):
    path = copy_run(finished, tmp_path / "run")
    text = (path / "config.toml").read_text()
    assert "resplit = false\n" in text
    (path / "config.toml").write_text(text.replace("resplit = false\n", ""))  # as a run written before it was
    rundir = RunDirectory(path, None)
    assert rundir.open(config_toml(path)) == 2
    rundir.close()
    with pytest.raises(RunDirError, match=r"different configuration \(data.resplit differ\)"):
        RunDirectory(path, None).open(config_toml(path, "data.resplit=true"))


@pytest.mark.parametrize("torn", [b"seed = 0\n[model", b"\xff\xfe", b'[federation]\nrounds = "2'])
def test_a_torn_config_is_one_line_naming_it(finished, tmp_path, torn):
    path = copy_run(finished, tmp_path / "run")
    (path / "config.toml").write_bytes(torn)
    with pytest.raises(RunDirError) as refused:
        RunDirectory(path, None).open(config_toml(path))
    assert str(refused.value).startswith(f"{path}/config.toml: not a valid TOML file (") and "\n" not in str(
        refused.value
    )
    assert (path / "config.toml").read_bytes() == torn


@pytest.mark.parametrize("damage", ["truncate", "delete", "config"])
def test_a_damaged_saved_adapter_stops_the_resume_naming_it(finished, tmp_path, damage):
    path = copy_run(finished, tmp_path / "run")
    saved = path / "rounds" / "002" / "fedit"
    if damage == "truncate":
        data = (saved / "adapter_model.safetensors").read_bytes()
        (saved / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "delete":
        (saved / "adapter_model.safetensors").unlink()
    else:
        (saved / "adapter_config.json").write_text("{")
    rundir = RunDirectory(path, None)
    done = rundir.open(config_toml(path))
    branches = make_branches(["fedit"])
    with pytest.raises(RunDirError) as refused:
        rundir.restore_history(branches, done, 2)
    message = str(refused.value)
    assert message.startswith("cannot resume: round 2's saved adapter is damaged (") and str(saved) in message
    assert "\n" not in message
    rundir.close()


def test_a_metrics_file_torn_while_running_is_one_line(finished, tmp_path):
    path = copy_run(finished, tmp_path / "run")
    with (path / "metrics.jsonl").open("ab") as f:
        f.write(b'{"round": 3, "bra')
    with pytest.raises(RunDirError, match=r"metrics.jsonl: line 4 is cut short or not a record; run the same command"):
        RunDirectory(path, None).metrics()


def test_an_adapter_directory_is_overwritten_only_if_florist_wrote_it(tmp_path):
    modules = {"m.q_proj": ModuleAggregate(A=torch.ones(2, 4), B=torch.ones(4, 2))}
    out = write_adapter(tmp_path / "g", modules, None, extra_files={"aggregation.json": "{}"})
    write_adapter(out, modules, None, overwrite=True)  # florist's own: replaced
    (out / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    with pytest.raises(AdapterError, match=r"holds 1 file florist did not write \(notes.txt\); refusing to delete it"):
        write_adapter(out, modules, None, overwrite=True)
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "aggregation.json").write_text("{}")  # a name florist writes, but no adapter beside it
    with pytest.raises(AdapterError, match="not an adapter directory florist wrote"):
        write_adapter(tmp_path / "plain", modules, None, overwrite=True)
    with pytest.raises(AdapterError, match="the output path is empty"):
        write_adapter("", modules, None, overwrite=True)
    assert tree(tmp_path) == before | {"plain": "dir", "plain/aggregation.json": b"{}"}
