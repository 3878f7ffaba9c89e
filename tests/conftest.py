"""Shared test fixtures: where the real images are, and tiny model configurations."""

from __future__ import annotations

import os
from pathlib import Path

# Triton's CPU interpreter runs the CUDA fast path's kernels in the suite (tests/test_fast.py). It must be
# set before triton is first imported; the fast path itself only uses Triton on CUDA tensors.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Tests run on 2 cores next to each other; one thread each keeps them from fighting.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data; tests that need real photos skip clearly without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real images not found at {SHARED_DATA} (the project's shared data folder)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`):
    tiny training runs are faster without thread hand-offs, and two processes do not fight for cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
