"""How florist's processes use the CPUs: passive waiting for OpenMP's idle threads, and torch's thread count from the
CPUs a process is allotted (its affinity and a cgroup's quota) or FLORIST_THREADS."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from florist.threads import (
    THREADS_VARIABLE,
    ThreadsError,
    allotted_cpus,
    cgroup_cpu_quota,
    set_wait_policy,
    thread_count,
)


@pytest.mark.parametrize(
    ("environ", "policy"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"), ({"GOMP_SPINCOUNT": "10000"}, None)],
)
def test_idle_threads_wait_passively_unless_the_environment_says_how(environ, policy):
    environ = dict(environ)
    set_wait_policy(environ)
    assert environ.get("OMP_WAIT_POLICY") == policy


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # one and a half CPUs: two threads
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_a_cgroups_cpu_quota_is_read_in_whole_cpus(tmp_path, files, cpus):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == cpus


def test_the_cpus_allotted_are_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert allotted_cpus(tmp_path) == affinity  # no quota
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert allotted_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text(f"{(affinity + 5) * 100000} 100000\n")
    assert allotted_cpus(tmp_path) == affinity  # a quota above the affinity does not add CPUs


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_one_line_naming_the_variable(value):
    with pytest.raises(ThreadsError, match=rf"^{THREADS_VARIABLE}='{value}': not a number of threads"):
        thread_count({THREADS_VARIABLE: value})


def test_the_thread_count_is_the_variables_else_the_cpus_allotted():
    assert thread_count({THREADS_VARIABLE: "3"}) == 3
    assert thread_count({}) == allotted_cpus()


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", THREADS_VARIABLE)}
    return subprocess.run([sys.executable, "-c", code], env=environ | env, capture_output=True, text=True, timeout=120)


def test_florist_sets_the_wait_policy_on_import_and_torch_gets_the_threads_asked_for():
    code = (
        "import florist, os\n"
        "from florist.threads import configure_torch\n"
        "import torch\n"
        "print(os.environ['OMP_WAIT_POLICY'], configure_torch(), torch.get_num_threads())"
    )
    assert _python(code, FLORIST_THREADS="1").stdout.split() == ["PASSIVE", "1", "1"]
    chosen = _python(code, OMP_NUM_THREADS="1").stdout.split()  # the environment's choice (Ray's, a user's) stays
    assert chosen == ["PASSIVE", "1", "1"]


def test_the_command_refuses_a_bad_thread_count_in_one_line():
    done = _python("from florist.cli import main; main()", FLORIST_THREADS="lots")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"florist: {THREADS_VARIABLE}='lots': not a number of threads (a whole number, at least 1)"
    ]
