import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test workers: a thread each, for them and their children
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Dolly clients and the MMLU subset, read in place (never copied into the project)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} not found: tests expect ../shared/data beside the checkout")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Ray gives each simulated SuperNode one thread; an in-process run compared with one gets the same, since
    float32 kernels split their sums by thread and so round differently with another count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
