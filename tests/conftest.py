import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# one intra-op thread per pytest-xdist worker (`make test` runs one worker per core), else
# up to 2: the suite's models are tiny, and more threads than cores only fight each other
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast and does not fight the busy cores
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
