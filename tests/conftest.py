"""Shared test fixtures: paths to the golden data, one intra-op thread for tiny nets, and a skip for GPU-only tests
on CPU machines."""
import os
from pathlib import Path
import sys

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter (must be set before they are built).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Golden outputs of the official Wan2.1 modules (tests/golden/README.md says where they come from); WAN_GOLDEN
# overrides the place.
GOLDEN = Path(os.environ.get("WAN_GOLDEN", ROOT / "tests" / "golden"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def golden():
    if not GOLDEN.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN} (tests/golden, or WAN_GOLDEN)")
    return GOLDEN


@pytest.fixture
def one_thread():
    """Tiny nets: a second intra-op thread only contends (for the 2 cores other test runs share), so run on one.
    Test files of tiny nets opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
