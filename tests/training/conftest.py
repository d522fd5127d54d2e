"""Training tests run torch on one thread: on 2 shared, busy cores, two OpenMP threads make every small op wait for a
descheduled thread (test_unet steps took 1.4 s instead of 0.04 s under load); results do not depend on it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
