"""What the training, evaluation and memory benchmarks share: the machine line, clocks, resident memory, matmul peak.

On a shared machine other processes' load stretches wall time; the CPU time a process consumed hardly moves
(with one torch thread: more threads add spin-waits), so every figure is given both ways, with the load average
before and after.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass

import torch

MIB = 2**20


@dataclass
class Elapsed:
    wall: float
    cpu: float


class Stopwatch:
    """Wall and CPU time (all threads of this process) since it was made."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def elapsed(self) -> Elapsed:
        return Elapsed(time.perf_counter() - self.wall0, time.process_time() - self.cpu0)


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line.split(":", 1)[1].split() for line in f if line.startswith("flags")))
    except (OSError, StopIteration):
        return set()


def machine_line(threads: int) -> str:
    flags = cpu_flags()
    extras = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 matrix instructions"
    return (
        f"{cpu_model()} ({extras}), {os.cpu_count()} cores; Python {platform.python_version()}, "
        f"torch {torch.__version__}; torch threads {threads}; load average (1/5/15 min) {load_average()}"
    )


def announce_machine(threads: int) -> str:
    """Set torch's thread count, print the machine line to stderr, and return it for the report."""
    torch.set_num_threads(threads)
    line = machine_line(threads)
    print(f"Machine: {line}", file=sys.stderr)
    return line


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: peak resident), None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float:
    kib = status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def release_free_memory() -> None:
    """Collect garbage and have glibc hand its freed pages back to the kernel.

    glibc keeps memory an earlier measurement freed, and the next one reuses it without growing the resident set,
    so without this a variant run after another would show almost no peak of its own.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    kib = status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024


@dataclass
class MatmulPeak:
    dtype: str
    shape: tuple[int, int, int]  # (m, k, n): an m×k by k×n product
    gflops_wall: float  # FLOP per wall second
    gflops_cpu: float  # FLOP per CPU second of this process, times the threads: the cores' rate when they run

    def as_dict(self) -> dict:
        return self.__dict__.copy()

    @property
    def label(self) -> str:
        m, k, n = self.shape
        return f"{m}×{k} @ {k}×{n} {self.dtype}"


def matmul_peak(
    dtype: torch.dtype,
    threads: int,
    shape: tuple[int, int, int] = (2048, 2048, 2048),
    seconds: float = 3.0,
    device: str = "cpu",
) -> MatmulPeak:
    """The best rate of repeated m×k @ k×n products: the machine's attainable matrix-multiply FLOP/s.

    Six timed bursts of about ``seconds / 6`` each; the fastest burst counts (the one least disturbed). On a CUDA
    ``device`` each burst ends in a synchronize, so the kernels' time is counted, not their launches.
    """
    m, k, n = shape
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    a, b = torch.randn(m, k).to(dtype).to(device), torch.randn(k, n).to(dtype).to(device)
    for _ in range(3):
        a @ b  # warm-up: kernel selection, packing buffers
    sync()
    flop = 2 * m * k * n
    clock = Stopwatch()
    a @ b
    sync()
    one = max(clock.elapsed().wall, 1e-4)
    reps = max(1, int(seconds / 6 / one))
    best_wall = best_cpu = 0.0
    for _ in range(6):
        clock = Stopwatch()
        for _ in range(reps):
            a @ b
        sync()
        t = clock.elapsed()
        best_wall = max(best_wall, flop * reps / t.wall / 1e9)
        best_cpu = max(best_cpu, flop * reps / max(t.cpu, 1e-9) / 1e9 * threads)
    return MatmulPeak(str(dtype).removeprefix("torch."), shape, best_wall, best_cpu)
